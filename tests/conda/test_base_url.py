"""CEP-15 info.base_url: repodata naming another host for its packages, rewritten and mapped back."""

from __future__ import annotations

import asyncio
import bz2
import functools
import hashlib
import io
import json
import random
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trustme
import zstandard
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.conda import baseurl
from condaproxy.conda.baseurl import Sniffer, Verdict, foreign_base
from condaproxy.config.model import ChannelConfig, Config

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


def trusting(cdn: FakeUpstream) -> dict[str, tuple[str, ...]]:
    """basechan trusts the second host its metadata names (plain http on 127.0.0.1)."""
    return {"basechan": (cdn.url,)}


async def test_install_fetches_packages_from_the_base_through_the_proxy(
    proxy_factory, upstream: FakeUpstream, cdn: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    proxy = await proxy_factory(trusted=trusting(cdn))
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
    proxy_factory, upstream: FakeUpstream, cdn: FakeUpstream, channel: Channel
) -> None:
    """A lockfile install on a cold cache: no repodata was read through the proxy yet."""
    proxy = await proxy_factory(trusted=trusting(cdn))
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
    first = await proxy_factory(cache_dir=tmp_path / "cache", trusted=trusting(cdn))
    assert (await first.get(f"{CH}/linux-64/repodata.json.zst")).status == 200
    await settle(first)
    await first.close()
    second = await proxy_factory(cache_dir=tmp_path / "cache", trusted=trusting(cdn))
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


# -- metadata naming a host that is not the channel's own (SSRF) ----------------------------------

SECRET = b"AKIA-INTERNAL-SECRET-CREDENTIALS"
SSRF = "/ssrfchan"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    """A test CA (and its PEM file) that ssrfchan trusts: only addresses stand in the way."""
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(path)
    return authority, path


@pytest.fixture(params=["http", "https"])
async def internal(
    request: pytest.FixtureRequest, ca: tuple[trustme.CA, Path]
) -> AsyncIterator[FakeUpstream]:
    """An internal service on 127.0.0.1 (over http, or https with a certificate ssrfchan trusts)."""
    server = FakeUpstream()
    context = None
    if request.param == "https":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca[0].issue_cert("127.0.0.1", "localhost").configure_cert(context)
    await server.start(ssl_context=context)
    try:
        yield server
    finally:
        await server.close()


def naming(upstream: FakeUpstream, channel: Channel, tmp_path: Path, base: str) -> None:
    """/ssrfchan: the channel, its linux-64 packages gone and its repodata naming base as base_url."""
    root = channel.shardless_copy(tmp_path / "ssrfchan")
    for pkg in channel.packages.values():
        if pkg.subdir == "linux-64":
            (root / "linux-64" / pkg.filename).unlink()
    doc = upstream_doc(root)
    doc["info"]["base_url"] = base
    raw = json.dumps(doc).encode()
    (root / "linux-64" / "repodata.json").write_bytes(raw)
    (root / "linux-64" / "repodata.json.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    upstream.mount("ssrfchan", root)


def naming_shards(upstream: FakeUpstream, channel: Channel, tmp_path: Path, base: str) -> None:
    """/ssrfchan: the channel without its shards, its noarch shard index naming base as shards_base_url."""
    root = channel.shardless_copy(tmp_path / "ssrfchan")
    raw = (channel.path / "noarch" / "repodata_shards.msgpack.zst").read_bytes()
    index = msgpack.unpackb(unzstd(raw), raw=False)
    index["info"]["shards_base_url"] = base
    packed = zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
    (root / "noarch" / "repodata_shards.msgpack.zst").write_bytes(packed)
    upstream.mount("ssrfchan", root)


def ssrf_config(upstream: FakeUpstream, tmp_path: Path, ca: Path, *trusted: str) -> Config:
    """ssrfchan from the fake upstream, trusting the test CA and the origins trusted, if any."""
    chan = ChannelConfig("ssrfchan", f"{upstream.url}{SSRF}", 5.0, 5.0, ca_bundle=ca, trusted_origins=trusted)
    return replace(make_config(tmp_path / "cache", upstream.url), channels={"ssrfchan": chan})


def forged(size: int) -> bytes:
    """The secret, padded to size: a forgery of a file whose size the channel states."""
    return (SECRET * (size // len(SECRET) + 1))[:size]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_base_url_naming_an_internal_host_reads_nothing_there(
    upstream: FakeUpstream,
    channel: Channel,
    internal: FakeUpstream,
    ca: tuple[trustme.CA, Path],
    tmp_path: Path,
    host: str,
) -> None:
    """A compromised upstream points base_url at an internal service: not one byte comes back.

    http is refused as the redirect rules say; https to 127.0.0.1 because it is not public, and
    to localhost because the name resolves (when connecting) to non-public addresses only.
    """
    base = f"{internal.url.replace('127.0.0.1', host)}/latest/meta-data/"
    naming(upstream, channel, tmp_path, base)
    internal.replace("/latest/meta-data/secret-1.0-0.conda", SECRET, "application/octet-stream")
    proxy = await Proxy(ssrf_config(upstream, tmp_path, ca[1])).start()
    try:
        # Not in the metadata: was passed through unverified (200 MISS with the secret).
        resp = await proxy.get(f"{SSRF}/linux-64/secret-1.0-0.conda")
        assert resp.status == 502 and SECRET not in resp.body, (resp.status, resp.body)
        why = "non-https" if base.startswith("http:") else "non-public address"
        assert why in resp.body.decode()
        # Listed in the metadata: asked for at the named base, which is refused just the same.
        pkg = channel.by_name("cp-tools")
        listed = await proxy.get(f"{SSRF}/{pkg.url_path}")
        assert listed.status == 502 and why in listed.body.decode()
        assert internal.requests == []  # never even connected to
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)
    finally:
        await proxy.close()


async def test_a_shards_base_url_naming_an_internal_host_reads_nothing_there(
    upstream: FakeUpstream,
    channel: Channel,
    internal: FakeUpstream,
    ca: tuple[trustme.CA, Path],
    tmp_path: Path,
) -> None:
    naming_shards(upstream, channel, tmp_path, f"{internal.url}/latest/meta-data/")
    shard = next((channel.path / "noarch" / "shards").iterdir()).name
    internal.replace(f"/latest/meta-data/{shard}", SECRET, "application/octet-stream")
    proxy = await Proxy(ssrf_config(upstream, tmp_path, ca[1])).start()
    try:
        assert (await proxy.get(f"{SSRF}/noarch/repodata_shards.msgpack.zst")).status == 200
        resp = await proxy.get(f"{SSRF}/noarch/shards/{shard}")
        assert resp.status == 502 and SECRET not in resp.body, (resp.status, resp.body)
        assert internal.requests == []
    finally:
        await proxy.close()


async def test_a_trusted_origin_serves_only_what_the_channel_verifies(
    upstream: FakeUpstream,
    channel: Channel,
    internal: FakeUpstream,
    ca: tuple[trustme.CA, Path],
    tmp_path: Path,
) -> None:
    """trusted_origins lets metadata name an internal host; still, no unverified byte comes back."""
    naming(upstream, channel, tmp_path, f"{internal.url}/pkgs/linux-64/")
    internal.mount("pkgs/linux-64", channel.path / "linux-64")
    internal.replace("/pkgs/linux-64/secret-1.0-0.conda", SECRET, "application/octet-stream")
    big = channel.by_name("cp-big")
    internal.replace(f"/pkgs/linux-64/{big.filename}", forged(big.size), "application/octet-stream")
    proxy = await Proxy(ssrf_config(upstream, tmp_path, ca[1], internal.url)).start()
    try:
        pkg = channel.by_name("cp-tools")
        good = await proxy.get(f"{SSRF}/{pkg.url_path}")
        assert good.status == 200 and good.body == pkg.read_bytes()
        assert internal.count(f"/pkgs/linux-64/{pkg.filename}") == 1
        # Not listed: nothing vouches for it, so it is refused rather than passed through.
        unlisted = await proxy.get(f"{SSRF}/linux-64/secret-1.0-0.conda")
        assert unlisted.status == 502 and SECRET not in unlisted.body
        assert "lists no sha256" in unlisted.body.decode()
        # Listed, right size, wrong bytes: refused before any byte (was: all but the last, then cut).
        bad = await proxy.get(f"{SSRF}/{big.url_path}")
        assert bad.status == 502 and SECRET not in bad.body, (bad.status, bad.body[:64])
        await proxy.idle()
        rows = check_invariants(proxy.config.cache.directory)
        assert ("ssrfchan", "linux-64", pkg.filename) in rows
        assert ("ssrfchan", "linux-64", big.filename) not in rows
    finally:
        await proxy.close()


async def test_a_trusted_shard_host_gets_no_byte_out_unverified(
    upstream: FakeUpstream,
    channel: Channel,
    internal: FakeUpstream,
    ca: tuple[trustme.CA, Path],
    tmp_path: Path,
) -> None:
    naming_shards(upstream, channel, tmp_path, f"{internal.url}/shardhost/noarch/")
    internal.mount("shardhost/noarch", channel.path / "noarch" / "shards")
    good, bad = sorted((channel.path / "noarch" / "shards").iterdir())[:2]
    internal.replace(f"/shardhost/noarch/{bad.name}", forged(bad.stat().st_size), "application/octet-stream")
    proxy = await Proxy(ssrf_config(upstream, tmp_path, ca[1], internal.url)).start()
    try:
        assert (await proxy.get(f"{SSRF}/noarch/repodata_shards.msgpack.zst")).status == 200
        ok = await proxy.get(f"{SSRF}/noarch/shards/{good.name}")
        assert ok.status == 200 and ok.body == good.read_bytes()
        # Shards are verified by their name, and from another origin before any byte goes out.
        resp = await proxy.get(f"{SSRF}/noarch/shards/{bad.name}")
        assert resp.status == 502 and SECRET not in resp.body, (resp.status, resp.body[:64])
        assert internal.count(f"/shardhost/noarch/{bad.name}") == 1
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)
    finally:
        await proxy.close()


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
    proxy_factory, upstream: FakeUpstream, late_cdn: FakeUpstream, tmp_path: Path, channel: Channel
) -> None:
    proxy = await proxy_factory(trusted=trusting(late_cdn))
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
