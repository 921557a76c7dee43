"""paths: the pure request-target parser (URL path -> UnitKey, or a Rejection)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condaproxy.conda.paths import Kind, Rejection, Request, UnitKey, kind_of, parse_path

SHA = "0123456789abcdef" * 4


def accepted(raw: str) -> Request:
    result = parse_path(raw)
    assert isinstance(result, Request), f"{raw!r} was rejected: {result}"
    return result


# -- valid targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "channel", "subdir", "filename", "kind"),
    [
        ("/conda-forge/noarch/repodata.json", "conda-forge", "noarch", "repodata.json", Kind.REPODATA),
        (
            "/conda-forge/linux-64/repodata.json.zst",
            "conda-forge",
            "linux-64",
            "repodata.json.zst",
            Kind.REPODATA,
        ),
        (
            "/conda-forge/osx-arm64/repodata.json.bz2",
            "conda-forge",
            "osx-arm64",
            "repodata.json.bz2",
            Kind.REPODATA,
        ),
        (
            "/conda-forge/win-64/current_repodata.json",
            "conda-forge",
            "win-64",
            "current_repodata.json",
            Kind.REPODATA,
        ),
        (
            "/conda-forge/linux-aarch64/repodata_shards.msgpack.zst",
            "conda-forge",
            "linux-aarch64",
            "repodata_shards.msgpack.zst",
            Kind.SHARD_INDEX,
        ),
        (f"/c/noarch/shards/{SHA}.msgpack.zst", "c", "noarch", f"shards/{SHA}.msgpack.zst", Kind.SHARD),
        (
            "/conda-forge/linux-64/numpy-1.26.4-py311h64a7726_0.conda",
            "conda-forge",
            "linux-64",
            "numpy-1.26.4-py311h64a7726_0.conda",
            Kind.PACKAGE,
        ),
        (
            "/conda-forge/linux-64/libfoo-1.0+cuda12.2-h1234ABC_0.tar.bz2",
            "conda-forge",
            "linux-64",
            "libfoo-1.0+cuda12.2-h1234ABC_0.tar.bz2",
            Kind.PACKAGE,
        ),
        (
            "/conda-forge/noarch/tzdata-1!2024a-h0c530f3_0.conda",
            "conda-forge",
            "noarch",
            "tzdata-1!2024a-h0c530f3_0.conda",
            Kind.PACKAGE,
        ),
        (
            "/conda-forge/linux-64/_openmp_mutex-4.5-2_gnu.tar.bz2",
            "conda-forge",
            "linux-64",
            "_openmp_mutex-4.5-2_gnu.tar.bz2",
            Kind.PACKAGE,
        ),
        ("/conda-forge/channeldata.json", "conda-forge", "", "channeldata.json", Kind.OTHER),
        ("/pkgs/main/linux-64/x-1-0.conda", "pkgs/main", "linux-64", "x-1-0.conda", Kind.PACKAGE),
        (
            "/conda-forge/label/dev/noarch/repodata.json",
            "conda-forge/label/dev",
            "noarch",
            "repodata.json",
            Kind.REPODATA,
        ),
        ("/pkgs/main/channeldata.json", "pkgs/main", "", "channeldata.json", Kind.OTHER),
        ("/a/b/c/d/noarch/x-1-0.conda", "a/b/c/d", "noarch", "x-1-0.conda", Kind.PACKAGE),
        # Unreserved characters may arrive percent-encoded; they decode to the same unit.
        ("/conda-forge/noarch/%72epodata.json", "conda-forge", "noarch", "repodata.json", Kind.REPODATA),
    ],
)
def test_valid_targets(raw: str, channel: str, subdir: str, filename: str, kind: Kind) -> None:
    req = accepted(raw)
    assert req.key == UnitKey(channel, subdir, filename, kind)
    assert req.token is None


def test_unit_key_path_and_str() -> None:
    key = accepted("/pkgs/main/linux-64/x-1-0.conda").key
    assert key.path == "linux-64/x-1-0.conda"
    assert str(key) == "pkgs/main/linux-64/x-1-0.conda"
    root = accepted("/conda-forge/channeldata.json").key
    assert root.path == "channeldata.json"
    assert str(root) == "conda-forge/channeldata.json"
    shard = accepted(f"/c/noarch/shards/{SHA}.msgpack.zst").key
    assert shard.path == f"noarch/shards/{SHA}.msgpack.zst"


def test_token_is_separated_from_the_key() -> None:
    tok = "cf-0123456789ABCDEF_abc.def"
    req = accepted(f"/t/{tok}/conda-forge/linux-64/x-1-0.conda")
    assert req.token == tok
    assert req.key == UnitKey("conda-forge", "linux-64", "x-1-0.conda", Kind.PACKAGE)
    assert tok not in str(req.key)
    # Same unit with and without a token: the catalog/lock key is shared.
    assert req.key == accepted("/conda-forge/linux-64/x-1-0.conda").key


def test_token_with_channel_root_file() -> None:
    req = accepted("/t/abc123/conda-forge/channeldata.json")
    assert req.token == "abc123"
    assert req.key == UnitKey("conda-forge", "", "channeldata.json", Kind.OTHER)


def test_nested_token_never_becomes_part_of_the_channel() -> None:
    # Access logs redact only the first /t/<token>/: a second one must not reach a key either.
    result = parse_path("/t/tok1/t/secrettok2/conda-forge/noarch/repodata.json")
    assert isinstance(result, Rejection) and result.status == 400


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        ("repodata.json", Kind.REPODATA),
        ("repodata.json.zst", Kind.REPODATA),
        ("repodata.json.bz2", Kind.REPODATA),
        ("repodata.json.gz", Kind.REPODATA),
        ("current_repodata.json", Kind.REPODATA),
        ("current_repodata.json.zst", Kind.REPODATA),
        ("repodata_from_packages.json", Kind.REPODATA),
        ("repodata_shards.msgpack.zst", Kind.SHARD_INDEX),
        (f"shards/{SHA}.msgpack.zst", Kind.SHARD),
        ("x-1-0.conda", Kind.PACKAGE),
        ("x-1-0.tar.bz2", Kind.PACKAGE),
        ("channeldata.json", Kind.OTHER),
        ("index.html", Kind.OTHER),
        ("repodata.jsonx", Kind.OTHER),
        ("x-1-0.tar.gz", Kind.OTHER),
    ],
)
def test_kind_of(filename: str, kind: Kind) -> None:
    assert kind_of(filename) is kind


def test_kind_immutability() -> None:
    assert Kind.PACKAGE.immutable
    assert Kind.SHARD.immutable
    assert not Kind.REPODATA.immutable
    assert not Kind.SHARD_INDEX.immutable
    assert not Kind.OTHER.immutable


# -- hostile or malformed targets ------------------------------------------------------------

HOSTILE = [
    "/conda-forge/../etc/passwd",
    "/conda-forge/noarch/../../etc/passwd",
    "/../conda-forge/noarch/repodata.json",
    "/conda-forge/noarch/..",
    "/conda-forge/%2e%2e/noarch/repodata.json",
    "/conda-forge/noarch/%2e%2e",
    "/conda-forge/noarch/%2E%2E",
    "/conda-forge/%252e%252e/noarch/repodata.json",
    "/conda-forge/noarch/%252e%252e%252fetc",
    "/conda-forge/..%2fnoarch/repodata.json",
    "/conda-forge/noarch/..%2f..%2fetc%2fpasswd",
    "/conda-forge%2fnoarch/repodata.json",
    "/conda-forge/noarch%2frepodata.json",
    "/conda-forge/noarch/%2fetc%2fpasswd",
    "/conda-forge/noarch/%5c..%5crepodata.json",
    "/conda-forge/noarch/x%5cy.conda",
    "/conda-forge\\noarch\\repodata.json",
    "/conda-forge/noarch/..\\..\\x.conda",
    "//conda-forge/noarch/repodata.json",
    "/conda-forge//noarch/repodata.json",
    "/conda-forge/noarch//repodata.json",
    "/conda-forge/./noarch/repodata.json",
    "/conda-forge/noarch/./repodata.json",
    "/conda-forge/%2e/noarch/repodata.json",
    "/conda-forge/noarch/repodata.json;jsessionid=1",
    "/conda-forge;x/noarch/repodata.json",
    "/conda-forge/noarch/x-1-0.conda%3bfoo",
    "/conda-forge/noarch/repodata.json%00",
    "/conda-forge/noarch/x%00.conda",
    "/conda-forge/noarch/repodata.json\x00",
    "/conda-forge/%c0%ae%c0%ae/noarch/repodata.json",
    "/conda-forge/noarch/%c0%ae%c0%ae%c0%afetc",
    "/conda-forge/noarch/%ff.conda",
    "/conda-forge/noarch/caf\u00e9-1-0.conda",
    "/conda-forge/noarch/caf%c3%a9-1-0.conda",
    "/c\u043enda-forge/noarch/repodata.json",  # Cyrillic o
    "/Conda-Forge/noarch/repodata.json",
    "/CONDA-FORGE/noarch/repodata.json",
    "/conda-Forge/label/dev/noarch/repodata.json",
    "/pkgs/Main/linux-64/x-1-0.conda",
    "/conda-forge/noarch/repodata.json?x=1",
    "/conda-forge/noarch/repodata.json?",
    "/conda-forge/noarch/repodata.json#frag",
    "/conda-forge/noarch/repodata.json%3fx=1",
    "http://other-host/x",
    "http://other-host/conda-forge/noarch/repodata.json",
    "https://example.org/conda-forge/noarch/x-1-0.conda",
    "other-host/conda-forge/noarch/repodata.json",
    "*",
    "",
    "/",
    "/conda-forge",
    "/conda-forge/",
    "/conda-forge/noarch/",
    "/conda-forge/noarch/repodata.json/",
    "/a/b/c/d/e/noarch/x-1-0.conda",
    "/a/b/c/d/e/f/g/h/noarch/repodata.json",
    f"/conda-forge/noarch/shards/{SHA.upper()}.msgpack.zst",
    f"/conda-forge/noarch/shards/{SHA[:-1]}.msgpack.zst",
    f"/conda-forge/noarch/shards/{SHA}0.msgpack.zst",
    f"/conda-forge/noarch/shards/{SHA}.msgpack",
    f"/conda-forge/noarch/shards/{SHA}.json",
    "/conda-forge/noarch/shards/x-1-0.conda",
    "/conda-forge/noarch/shards/..",
    f"/conda-forge/shards/{SHA}.msgpack.zst",  # no subdir
    "/conda-forge/linux64/repodata.json",
    "/conda-forge/Linux-64/repodata.json",
    "/conda-forge/amiga-68k/repodata.json",
    "/conda-forge/repodata.json",
    "/conda-forge/repodata_shards.msgpack.zst",
    "/conda-forge/x-1-0.conda",
    "/conda-forge/linux64/x-1-0.tar.bz2",
    "/conda-forge/noarch/.hidden",
    "/conda-forge/noarch/-x-1-0.conda",
    "/conda-forge/noarch/x 1-0.conda",
    "/conda-forge/noarch/x%201-0.conda",
    "/conda-forge/noarch/x%0a.conda",
    "/conda-forge/noarch/x%09.conda",
    "/conda-forge/noarch/x:1.conda",
    "/conda-forge/noarch/x%25.conda",
    "/conda-forge/noarch/" + "a" * 300 + ".conda",
    "/" + "a" * 200 + "/noarch/repodata.json",
    "/.conda-forge/noarch/repodata.json",
    "/-x/noarch/repodata.json",
    "/t/",
    "/t//conda-forge/noarch/repodata.json",
    "/t/tok/",
    "/t/tok",
    "/t/tok/repodata.json",
    "/t/to%2fk/conda-forge/noarch/repodata.json",
    "/t/to%00k/conda-forge/noarch/repodata.json",
    "/t/tok en/conda-forge/noarch/repodata.json",
    "/t/" + "a" * 300 + "/conda-forge/noarch/repodata.json",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_targets_are_rejected(raw: str) -> None:
    result = parse_path(raw)
    assert isinstance(result, Rejection), f"{raw!r} accepted as {result}"
    assert result.status in (400, 404)
    assert result.reason and "\n" not in result.reason


def test_rejection_statuses_say_what_is_wrong() -> None:
    # Syntax problems are 400; well-formed paths that name no unit are 404.
    assert parse_path("/conda-forge/%2e%2e/noarch/repodata.json") == Rejection(
        400, "empty, '.' or '..' path segment"
    )
    bad_utf8 = parse_path("/conda-forge/%c0%ae/repodata.json")
    assert isinstance(bad_utf8, Rejection) and bad_utf8.status == 400
    assert isinstance(r := parse_path("http://x/y"), Rejection) and r.status == 400
    assert isinstance(r := parse_path("/conda-forge/linux64/repodata.json"), Rejection) and r.status == 404
    assert isinstance(r := parse_path("/a/b/c/d/e/noarch/x-1-0.conda"), Rejection) and r.status == 404
    shard = parse_path(f"/c/noarch/shards/{SHA.upper()}.msgpack.zst")
    assert isinstance(shard, Rejection) and shard.status == 404


# -- property: whatever is accepted is safe to use as a storage/URL component ---------------

_SAFE_ALPHABET = string.ascii_letters + string.digits + "._-+!~%/\\;:?#@&=* \x00\u00e9"
_SEGMENTS = st.sampled_from(
    [
        "conda-forge",
        "t",
        "tok",
        "label",
        "dev",
        "noarch",
        "linux-64",
        "shards",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2f",
        "%5c",
        "%00",
        "%25",
        "%c0%ae",
        "repodata.json",
        "x-1-0.conda",
        f"{SHA}.msgpack.zst",
        "channeldata.json",
    ]
)


def _check_safe(req: Request) -> None:
    key = req.key
    for part in (key.channel, key.subdir, key.filename):
        assert "\\" not in part and "\x00" not in part and "%" not in part
        assert "/.." not in f"/{part}"
        assert part.isascii() and part.isprintable()
    for seg in key.channel.split("/") + key.filename.split("/"):
        assert seg not in ("", ".", "..")
    assert "/" not in key.subdir
    assert key.filename.count("/") == (1 if key.kind is Kind.SHARD else 0)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(_SEGMENTS, min_size=0, max_size=8))
def test_accepted_paths_are_safe_from_known_segments(segments: list[str]) -> None:
    result = parse_path("/" + "/".join(segments))
    if isinstance(result, Request):
        _check_safe(result)
    else:
        assert result.status in (400, 404)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.text(alphabet=_SAFE_ALPHABET, max_size=12), min_size=1, max_size=7))
def test_accepted_paths_are_safe_from_random_segments(segments: list[str]) -> None:
    result = parse_path("/" + "/".join(segments))
    if isinstance(result, Request):
        _check_safe(result)
    else:
        assert result.status in (400, 404)


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=60))
def test_arbitrary_text_never_raises(raw: str) -> None:
    result = parse_path(raw)
    if isinstance(result, Request):
        _check_safe(result)
    else:
        assert result.status in (400, 404)
