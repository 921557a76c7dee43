"""CEP-15 info.base_url: repodata naming another host for its packages, rewritten and mapped back."""

from __future__ import annotations

import asyncio
import bz2
import functools
import hashlib
import io
import json
import random
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from channel import Channel
from proxy import Proxy, check_invariants
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.conda import baseurl
from condaproxy.conda.baseurl import Sniffer, Verdict, foreign_base

CH = "/basechan"
JSON = f"{CH}/linux-64/repodata.json"


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()


def decode(name: str, data: bytes) -> Any:
    if name.endswith(".zst"):
        data = unzstd(data)
    elif name.endswith(".bz2"):
        data = bz2.decompress(data)
    return json.loads(data)


async def settle(proxy: Proxy) -> None:
    await proxy.idle()
    await asyncio.sleep(0.05)
    await proxy.idle()


@pytest.fixture
async def cdn(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> AsyncIterator[FakeUpstream]:
    """A second host serving the linux-64 packages of a copy whose repodata names it as base_url."""
    server = FakeUpstream()
    await server.start()
    root = channel.shardless_copy(tmp_path / "basechan")
    elsewhere = tmp_path / "cdn" / "linux-64"
    elsewhere.mkdir(parents=True)
    for pkg in channel.packages.values():
        if pkg.subdir == "linux-64":  # served ONLY by the second host
            (root / "linux-64" / pkg.filename).rename(elsewhere / pkg.filename)
    server.mount("pkgs", tmp_path / "cdn")
    doc = json.loads((root / "linux-64" / "repodata.json").read_bytes())
    doc["info"]["base_url"] = f"{server.url}/pkgs/linux-64/"
    raw = json.dumps(doc).encode()
    (root / "linux-64" / "repodata.json").write_bytes(raw)
    (root / "linux-64" / "repodata.json.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    upstream.mount("basechan", root)
    yield server
    await server.close()


def upstream_etag(path: Path) -> str:
    """The ETag FakeUpstream gives a file (a derived variant has none: any string will do)."""
    return f'"{hashlib.sha256(path.read_bytes()).hexdigest()[:32]}"' if path.exists() else "-"


def upstream_doc(channel_root: Path) -> Any:
    return json.loads((channel_root / "linux-64" / "repodata.json").read_bytes())


# -- through the proxy ----------------------------------------------------------------------------


async def test_every_variant_names_no_base_and_the_base_is_mapped(
    proxy: Proxy, upstream: FakeUpstream, cdn: FakeUpstream, tmp_path: Path
) -> None:
    want = upstream_doc(tmp_path / "basechan")
    assert want["info"]["base_url"].startswith(cdn.url)
    want["info"]["base_url"] = ""
    for name in ("repodata.json", "repodata.json.zst", "repodata.json.bz2"):  # .bz2: derived
        resp = await proxy.get(f"{CH}/linux-64/{name}")
        assert resp.status == 200, (name, resp.status, resp.body)
        assert decode(name, resp.body) == want, name
        assert resp.headers["ETag"] != upstream_etag(tmp_path / "basechan" / "linux-64" / name)
    assert await proxy.services.catalog.package_base("basechan", "linux-64") == f"{cdn.url}/pkgs/linux-64/"
    assert await proxy.services.catalog.package_base("basechan", "noarch") is None
    assert cdn.requests == []
    await settle(proxy)
    rows = check_invariants(proxy.config.cache.directory)
    assert {f for c, s, f in rows if s == "linux-64"} >= {"repodata.json", "repodata.json.zst"}


async def test_install_fetches_packages_from_the_base_through_the_proxy(
    proxy: Proxy, upstream: FakeUpstream, cdn: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    names = await solve_and_install(f"{proxy.url}{CH}", tmp_path / "env", tmp_path / "client", sharded=False)
    assert any(n.startswith("cp-extra-") for n in names)
    # Every package of linux-64 came from the second host, and only through the proxy.
    linux = {p.filename for p in channel.packages.values() if p.subdir == "linux-64"}
    assert {r.path.rsplit("/", 1)[-1] for r in cdn.requests} == linux & set(names)
    assert all(r.headers.get("User-Agent", "").startswith("condaproxy/") for r in cdn.requests)
    assert not any(r.path.endswith(tuple(linux)) for r in upstream.requests)
    await settle(proxy)
    rows = check_invariants(proxy.config.cache.directory)
    assert {f for _, _, f in rows} >= set(names)  # verified against the repodata, then cached


async def test_a_package_asked_for_first_is_found_at_the_base(
    proxy: Proxy, upstream: FakeUpstream, cdn: FakeUpstream, channel: Channel
) -> None:
    """A lockfile install on a cold cache: no repodata was read through the proxy yet."""
    pkg = channel.by_name("cp-tools")
    resp = await proxy.get(f"{CH}/{pkg.url_path}")
    assert resp.status == 200 and resp.body == pkg.read_bytes()
    assert [r.path for r in cdn.requests] == [f"/pkgs/linux-64/{pkg.filename}"]
    assert upstream.count(f"{CH}/{pkg.url_path}") == 1  # asked where it is not, once
    await settle(proxy)
    assert ("basechan", "linux-64", pkg.filename) in check_invariants(proxy.config.cache.directory)
    assert (await proxy.get(f"{CH}/{pkg.url_path}")).xcache == "HIT"


async def test_the_mapping_outlives_a_restart(
    proxy_factory, upstream: FakeUpstream, cdn: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    first = await proxy_factory(cache_dir=tmp_path / "cache")
    assert (await first.get(f"{CH}/linux-64/repodata.json.zst")).status == 200
    await settle(first)
    await first.close()
    second = await proxy_factory(cache_dir=tmp_path / "cache")
    pkg = channel.by_name("cp-data")
    assert (await second.get(f"{CH}/{pkg.url_path}")).body == pkg.read_bytes()
    assert upstream.count(f"{CH}/{pkg.url_path}") == 0  # straight to the recorded base
    assert cdn.count(f"/pkgs/linux-64/{pkg.filename}") == 1


async def test_a_cut_foreign_document_is_neither_served_nor_recorded(
    proxy: Proxy, upstream: FakeUpstream, cdn: FakeUpstream
) -> None:
    upstream.truncate(JSON, 0.6, times=1)
    cut = await proxy.get(JSON)
    assert cut.status == 502  # held back: refused before headers, never a short body
    assert await proxy.services.catalog.package_base("basechan", "linux-64") is None
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)
    whole = await proxy.get(JSON)
    assert whole.status == 200 and json.loads(whole.body)["info"]["base_url"] == ""


async def test_rewritten_repodata_revalidates_with_upstream_validators(
    proxy_factory, upstream: FakeUpstream, cdn: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    first = await proxy.get(JSON)
    assert first.status == 200 and json.loads(first.body)["info"]["base_url"] == ""
    await settle(proxy)
    await asyncio.sleep(1.2)
    again = await proxy.get(JSON)
    assert again.xcache == "REVALIDATED" and again.body == first.body
    assert again.headers["ETag"] == first.headers["ETag"]
    # Upstream is asked with its own validator; clients keep seeing ours.
    theirs = upstream_etag(tmp_path / "basechan" / "linux-64" / "repodata.json")
    assert upstream.requests_for(JSON)[-1].headers.get("If-None-Match") == theirs != first.headers["ETag"]
    assert (await proxy.get(JSON, headers={"If-None-Match": first.headers["ETag"]})).status == 304


async def test_a_document_without_the_base_clears_the_mapping(
    proxy_factory, upstream: FakeUpstream, cdn: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    await proxy.get(JSON)
    await settle(proxy)
    assert await proxy.services.catalog.package_base("basechan", "linux-64") is not None
    doc = upstream_doc(tmp_path / "basechan")
    del doc["info"]["base_url"]
    plain = json.dumps(doc).encode()
    upstream.replace(JSON, plain, "application/json")
    await asyncio.sleep(1.2)
    resp = await proxy.get(JSON)
    assert resp.body == plain  # passed through byte for byte
    assert await proxy.services.catalog.package_base("basechan", "linux-64") is None


async def test_a_foreign_document_is_held_back_whole(
    proxy: Proxy, upstream: FakeUpstream, cdn: FakeUpstream
) -> None:
    hold = upstream.hold(JSON, 0.5)
    answer = asyncio.ensure_future(proxy.get(JSON))
    await asyncio.wait_for(hold.reached.wait(), 10)
    await asyncio.sleep(0.3)
    assert not answer.done()  # not even headers: they would name the upstream's length and ETag
    hold.release()
    resp = await answer
    assert resp.status == 200 and json.loads(resp.body)["info"]["base_url"] == ""


@functools.cache
def big_repodata(records: int, base_url: str | None, seed: int = 1) -> bytes:
    """A generated repodata.json of about records * 400 bytes, info first as indexers write it."""
    rng = random.Random(seed)
    info: dict[str, Any] = {"subdir": "linux-64"}
    if base_url is not None:
        info["base_url"] = base_url
    packages = {
        f"pkg{i}-1.{i}-h{rng.getrandbits(32):08x}_0.conda": {
            "name": f"pkg{i}",
            "version": f"1.{i}",
            "build": "h0_0",
            "depends": [f"dep{rng.randrange(1000)} >=1.{rng.randrange(9)}", 'quote"and\\slash'],
            "sha256": f"{rng.getrandbits(256):064x}",
            "size": rng.randrange(1 << 24),
            "license": "BSD-3-Clause",
        }
        for i in range(records)
    }
    doc = {"info": info, "packages": {}, "packages.conda": packages, "repodata_version": 1}
    return json.dumps(doc, indent=1).encode()


async def test_plain_repodata_still_streams(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    root = channel.shardless_copy(tmp_path / "bigchan")
    raw = big_repodata(20_000, None)
    (root / "linux-64" / "repodata.json").write_bytes(raw)
    upstream.mount("bigchan", root)
    path = "/bigchan/linux-64/repodata.json"
    hold = upstream.hold(path, 0.5)
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
        got = await asyncio.wait_for(resp.content.readexactly(len(raw) // 4), 10)
        assert not hold.released.is_set()
        hold.release()
        rest = await resp.read()
    assert got + rest == raw
    assert await proxy.services.catalog.package_base("bigchan", "linux-64") is None


# -- the parts ------------------------------------------------------------------------------------


ENCODE = {
    "repodata.json": lambda b: b,
    "repodata.json.zst": lambda b: zstandard.ZstdCompressor(level=3).compress(b),
    "repodata.json.bz2": lambda b: bz2.compress(b, 1),
}


@pytest.mark.parametrize("name", list(ENCODE))
def test_streaming_rewrite_changes_only_the_base(tmp_path: Path, name: str) -> None:
    raw = big_repodata(60_000, "https://cdn.example/conda-forge/linux-64/")
    assert len(raw) > 16 << 20
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(ENCODE[name](raw))
    # Sniffed as it would arrive off the network, in chunks of any size.
    rng = random.Random(7)
    data = src.read_bytes()
    sniffer = Sniffer(name, "https://up.example/conda-forge/linux-64/repodata.json")
    offset = 0
    while sniffer.verdict is Verdict.PENDING and offset < len(data):
        step = rng.choice([1, 13, 4096, 65536])
        sniffer.feed(data[offset : offset + step])
        offset += step
    assert sniffer.verdict is Verdict.FOREIGN
    assert sniffer.base == "https://cdn.example/conda-forge/linux-64/"
    tracemalloc.start()
    try:
        started = time.monotonic()
        baseurl.rewrite(src, dst, name)
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Never the whole document: a few MiB of buffers (bzip2 itself works in ~8 MiB at level 9).
    assert peak < 12 << 20, f"the rewrite held {peak >> 20} MiB"
    want = json.loads(raw)
    want["info"]["base_url"] = ""
    assert decode(name, dst.read_bytes()) == want
    assert took < 30


def test_sniffer_verdicts() -> None:
    here = "http://up/chan/linux-64/repodata.json"

    def verdict(doc: bytes, name: str = "repodata.json", *, encode: bool = True) -> Verdict:
        sniffer = Sniffer(name, here)
        sniffer.feed(ENCODE[name](doc) if encode else doc)
        if sniffer.verdict is Verdict.PENDING:
            sniffer.feed(b"", True)
        return sniffer.verdict

    assert verdict(b'{"info": {"subdir": "linux-64"}, "packages": {}}') is Verdict.PLAIN
    assert verdict(b'{"info": {"base_url": ""}, "packages": {}}') is Verdict.PLAIN
    assert verdict(b'{"info": {"base_url": "./"}}', "repodata.json.zst") is Verdict.PLAIN
    assert verdict(b'{"info": {"base_url": "https://cdn/x/"}}', "repodata.json.bz2") is Verdict.FOREIGN
    assert verdict(b'{"info": {"n": {"base_url": "https://cdn/x/"}}}') is Verdict.PLAIN  # not info's own
    assert verdict(b'{"x": {"base_url": "https://cdn/x/"}, "info": {}}') is Verdict.PLAIN
    assert verdict(b'{"info": {"base_url": "https://cdn/x/"') is Verdict.UNKNOWN  # cut short
    assert verdict(b"<html>not found</html>") is Verdict.UNKNOWN
    assert verdict(b"\x28\xb5\x2f\xfd garbage", "repodata.json.zst", encode=False) is Verdict.UNKNOWN
    assert verdict(b"BZh9 garbage", "repodata.json.bz2", encode=False) is Verdict.UNKNOWN
    # info not in the head of a document bigger than it: held back whole, read once in (lateinfo).
    late = json.dumps(
        {"packages": {f"p{i}": "x" * 100 for i in range(5000)}, "info": {"base_url": "https://c/"}}
    )
    assert verdict(late.encode()) is Verdict.LATE
    # A decompression bomb: the head stops at HEAD_LIMIT, whatever the body inflates to.
    bomb = zstandard.ZstdCompressor().compress(b'{"info": {"subdir": "' + b"a" * (64 << 20))
    tracemalloc.start()
    try:
        assert verdict(bomb, "repodata.json.zst", encode=False) is Verdict.LATE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    ("value", "base"),
    [
        ("", None),
        ("./", None),
        (".", None),
        ("../linux-64/", None),
        ("https://cdn.example/x/linux-64", "https://cdn.example/x/linux-64/"),
        ("//cdn.example/x/", "http://cdn.example/x/"),
        ("/chan/linux-64/", "http://up/chan/linux-64/"),  # clients would resolve it against us
        ("../pkgs/", "http://up/chan/pkgs/"),
        ("https://user:secret@cdn.example/t/tok/x/", "https://cdn.example/t/<redacted>/x/"),
    ],
)
def test_foreign_base(value: str, base: str | None) -> None:
    assert foreign_base("http://up/chan/linux-64/repodata.json", value) == base


def test_foreign_base_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        foreign_base("http://up/chan/linux-64/repodata.json", "s3://bucket/x/")


# -- info past the head (CEP-15 anywhere in the document) -------------------------------------------


def _late_doc(root: Path, base: str) -> bytes:
    """The linux-64 repodata with info moved to the end, past a head's worth of other keys."""
    doc = upstream_doc(root)
    info = doc.pop("info")
    info["base_url"] = base
    doc["x-padding"] = ["p" * 100] * 4000  # an unknown key, kept as it is
    doc["info"] = info
    return json.dumps(doc).encode()


@pytest.fixture
async def late_cdn(cdn: FakeUpstream, tmp_path: Path) -> FakeUpstream:
    root = tmp_path / "basechan"
    raw = _late_doc(root, f"{cdn.url}/pkgs/linux-64/")
    (root / "linux-64" / "repodata.json").write_bytes(raw)
    (root / "linux-64" / "repodata.json.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    return cdn


async def test_a_late_info_base_url_is_rewritten_in_every_encoding(
    proxy: Proxy, upstream: FakeUpstream, late_cdn: FakeUpstream, tmp_path: Path, channel: Channel
) -> None:
    want = upstream_doc(tmp_path / "basechan")
    want["info"]["base_url"] = ""
    for name in ("repodata.json", "repodata.json.zst", "repodata.json.bz2"):
        resp = await proxy.get(f"{CH}/linux-64/{name}")
        assert resp.status == 200, (name, resp.body)
        assert decode(name, resp.body) == want, name
    assert (
        await proxy.services.catalog.package_base("basechan", "linux-64") == f"{late_cdn.url}/pkgs/linux-64/"
    )
    names = await solve_and_install(f"{proxy.url}{CH}", tmp_path / "env", tmp_path / "client", sharded=False)
    assert any(n.startswith("cp-extra-") for n in names)
    assert late_cdn.requests, "packages were fetched from the base, through the proxy"
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)


async def test_a_late_plain_info_leaves_the_bytes_alone(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    root = channel.shardless_copy(tmp_path / "latechan")
    raw = _late_doc(root, "")
    (root / "linux-64" / "repodata.json").write_bytes(raw)
    upstream.mount("latechan", root)
    resp = await proxy.get("/latechan/linux-64/repodata.json")
    assert resp.status == 200 and resp.body == raw
    assert resp.headers["ETag"] == upstream_etag(root / "linux-64" / "repodata.json")


def test_late_rewrite_streams_in_bounded_memory(tmp_path: Path) -> None:
    from condaproxy.conda.lateinfo import rewrite_late

    records = {f"p-{i}-0.conda": {"name": "p", "version": str(i), "sha256": "ab" * 32} for i in range(60000)}
    doc = {
        "packages.conda": records,
        "v3": {"whl": {"q-1-0.whl": {"name": "q"}}},
        "info": {"base_url": "https://c/x/"},
    }
    src = tmp_path / "repodata.json.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()))
    dst = tmp_path / "out.zst"
    tracemalloc.start()
    try:
        value, base = rewrite_late(src, dst, "repodata.json.zst", "http://up/chan/linux-64/repodata.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (value, base) == ("https://c/x/", "https://c/x/")
    assert peak < 16 << 20, f"the rewrite held {peak >> 20} MiB"
    got = decode("repodata.json.zst", dst.read_bytes())
    assert got == {**doc, "info": {"base_url": ""}}
