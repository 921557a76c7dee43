"""A hostile upstream against the real proxy: documents built to exhaust it are refused cheaply, once.

A configured upstream is trusted to name the bytes it serves, not to make them harmless: an
85-byte repodata.json.zst nesting 60,000 deep, a 3 KB shard or index inflating to 100 MB of
one-byte maps, and derivations asked for in bulk. Each test serves the attack from the fake
upstream to the real proxy and checks what it costs (peak RSS of the `condaproxy serve`
process, from /proc) and that the refusal is counted once and survives a restart. CPU work is
checked structurally: a CPU pool job is held at a gate, and hits are served meanwhile.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zstandard
from cpugate import CpuGate
from proxy import Proxy, ProxyProcess, check_invariants, free_port, write_config
from upstream import FakeUpstream

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")


def zst(path: Path, *parts: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=19).stream_writer(f) as w:
        for part in parts:
            w.write(part)
    return path.read_bytes()


def packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def maps(mib: int) -> list[bytes]:
    """An array of mib arrays of 1 Mi empty maps (one byte each), as parts to compress."""
    return [
        b"\xdc" + mib.to_bytes(2, "big"),
        *(b"\xdd" + MiB.to_bytes(4, "big") + b"\x80" * MiB for _ in range(mib)),
    ]


async def metric(session: aiohttp.ClientSession, url: str, sample: str) -> float | None:
    """The value of one sample on /metrics (None if absent)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


async def wait_for_metric(session: aiohttp.ClientSession, url: str, sample: str, value: float) -> None:
    """Poll /metrics until sample reaches value (the proxy's own code never polls)."""
    deadline = time.monotonic() + 30
    while await metric(session, url, sample) != value:
        assert time.monotonic() < deadline, f"{sample} never reached {value}"
        await asyncio.sleep(0.05)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def start(tmp_path: Path, upstream: FakeUpstream) -> ProxyProcess:
    port = free_port()
    ini = write_config(tmp_path / "proxy.ini", tmp_path / "cache", upstream.url, port)
    return await ProxyProcess(ini, port).start()


REFUSED = 'condaproxy_refused_documents_total{reason="%s"}'


# -- 1: a JSON nesting bomb in repodata ---------------------------------------------------------


async def test_a_nesting_bomb_in_repodata_is_refused_once_and_never_learned_again(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    depth = 60_000
    bomb = zst(
        tmp_path / "bombchan" / "noarch" / "repodata.json.zst",
        b'{"packages": {"a-1-0.conda": {"sha256": ',
        b"[" * depth,
        b"]" * depth,
        b"}}}",
    )
    assert len(bomb) < 100
    upstream.mount("bombchan", tmp_path / "bombchan")
    refused = REFUSED % "depth"
    proc = await start(tmp_path, upstream)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            base = proc.peak_rss()
            status, body = await fetch(session, proc.url + "/bombchan/noarch/repodata.json.zst")
            assert (status, body) == (200, bomb)  # served as upstream sent it: the client's parser decides
            await wait_for_metric(session, proc.url, refused, 1)
            # A package asked for without its digest: the resolver would read the document again,
            # and the repodata.json it derives from it; neither is read.
            status, _ = await fetch(session, proc.url + "/bombchan/noarch/a-1-0.conda")
            assert status == 404
            assert await metric(session, proc.url, refused) == 1
            # ijson.parse took this process from 44 MiB to 8.45 GiB.
            assert proc.peak_rss() - base < 32 * MiB, (proc.peak_rss() - base) >> 20
        assert proc.stop() == 0
        # As after an OOM kill: a new process on the same cache never reads the document again.
        proc = await ProxyProcess(proc.config_file, proc.port).start()
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            status, _ = await fetch(session, proc.url + "/bombchan/noarch/a-1-0.conda")
            assert status == 404
            assert await metric(session, proc.url, refused) is None
        assert proc.stop() == 0
        log = proc.log.read_text()
        assert log.count("refused to read") == 1, log
        assert "its document was refused before (depth)" in log
        check_invariants(tmp_path / "cache")
    finally:
        proc.kill()


# -- 2: msgpack object bombs in a shard index and a shard ------------------------------------------


async def test_an_object_bomb_index_and_shard_cost_no_memory_and_the_shard_is_refused_once(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    chan = tmp_path / "packchan" / "noarch"
    (chan / "shards").mkdir(parents=True)
    shard = zst(tmp_path / "shard", b"\x81" + packb("packages") + b"\x81" + packb("a-1-0.conda"), *maps(60))
    digest = hashlib.sha256(shard).hexdigest()  # a shard is named by its sha256, and checked against it
    (tmp_path / "shard").rename(chan / "shards" / f"{digest}.msgpack.zst")
    index_head = b"\x83" + packb("info") + packb({"subdir": "noarch"}) + packb("shards")
    index_head += packb({"a": bytes.fromhex(digest)}) + packb("junk")
    index = zst(chan / "repodata_shards.msgpack.zst", index_head, *maps(90))
    assert len(index) < 8 * 1024 and len(shard) < 8 * 1024
    upstream.mount("packchan", tmp_path / "packchan")
    refused = REFUSED % "objects"
    proc = await start(tmp_path, upstream)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            base = proc.peak_rss()
            # Walked as a stream to find its bases: served as it is.
            status, body = await fetch(session, proc.url + "/packchan/noarch/repodata_shards.msgpack.zst")
            assert (status, body) == (200, index)
            status, body = await fetch(session, proc.url + f"/packchan/noarch/shards/{digest}.msgpack.zst")
            assert (status, body) == (200, shard)
            await wait_for_metric(session, proc.url, refused, 1)  # its one record: 60 MiB
            # The resolver looks the package up in the index (walked again, in bounded memory)
            # and finds the shard refused: never read again.
            status, _ = await fetch(session, proc.url + "/packchan/noarch/a-1-0.conda")
            assert status == 404
            assert await metric(session, proc.url, refused) == 1
            # msgpack.unpackb took 6.87 GiB for 100 MB of one-byte maps; zstd's own state remains.
            assert proc.peak_rss() - base < 96 * MiB, (proc.peak_rss() - base) >> 20
        assert proc.stop() == 0
        check_invariants(tmp_path / "cache")
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        # 3 KB inflating past the index's 128 MiB cap.
        ((b"\x82" + packb("info") + packb({}) + packb("junk"), *maps(160)), "inflated"),
        # One bin of 64 MiB: past the longest object the reader holds (conda.packed.MAX_STR).
        (
            (b"\x82" + packb("info") + packb({}) + packb("junk") + b"\xc6" + (64 * MiB).to_bytes(4, "big"),)
            + (bytes(MiB),) * 64,
            "objects",
        ),
    ],
    ids=["inflated", "objects"],
)
async def test_an_index_past_a_bound_fails_its_download_with_502_counted_once(
    upstream: FakeUpstream, tmp_path: Path, parts: tuple[bytes, ...], reason: str
) -> None:
    zst(tmp_path / "idxchan" / "noarch" / "repodata_shards.msgpack.zst", *parts)
    upstream.mount("idxchan", tmp_path / "idxchan")
    path = "/idxchan/noarch/repodata_shards.msgpack.zst"
    proc = await start(tmp_path, upstream)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            base = proc.peak_rss()
            for _ in range(2):  # the second within the cooldown: not fetched, not read
                status, _ = await fetch(session, proc.url + path)
                assert status == 502  # never 4xx: conda would give up shards for 7 days
            assert upstream.count(path) == 1
            assert await metric(session, proc.url, REFUSED % reason) == 1
            async with session.get(proc.url + "/healthz") as resp:
                assert resp.status == 200
            assert proc.peak_rss() - base < 64 * MiB, (proc.peak_rss() - base) >> 20
        assert proc.stop() == 0
        check_invariants(tmp_path / "cache")
    finally:
        proc.kill()


# -- 7: CPU work does not starve file I/O --------------------------------------------------------


def big_channels(tmp_path: Path, upstream: FakeUpstream, count: int) -> list[bytes]:
    """count unlisted channels big0..big<count-1> whose noarch has only repodata.json."""
    bodies = []
    for i in range(count):
        records = {
            f"p{n}-1.0-0.tar.bz2": {"name": f"p{n}", "sha256": f"{n:064x}", "size": n} for n in range(2000)
        }
        body = json.dumps({"info": {"subdir": "noarch"}, "packages": records, "channel": i}).encode()
        (tmp_path / f"big{i}" / "noarch").mkdir(parents=True)
        (tmp_path / f"big{i}" / "noarch" / "repodata.json").write_bytes(body)
        upstream.mount(f"big{i}", tmp_path / f"big{i}")
        bodies.append(body)
    return bodies


async def wait_until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.services.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("settings", "admitted", "why"),
    [
        ({"cpu_workers": 1, "cpu_queue": 2, "derivations_per_client": 100}, 3, "pool"),
        ({"cpu_workers": 1, "cpu_queue": 8, "derivations_per_client": 2}, 2, "client"),
    ],
    ids=["pool-queue-full", "per-client"],
)
async def test_bulk_derivations_are_bounded_and_never_hold_up_a_hit(
    proxy_factory: Callable[..., Awaitable[Proxy]],
    upstream: FakeUpstream,
    tmp_path: Path,
    settings: dict[str, int],
    admitted: int,
    why: str,
) -> None:
    """8 concurrent .bz2 requests whose transcoding is held at the CPU gate: as long as any
    transcoding would take. The bounds decide how many are admitted; the rest get 503 at once;
    a hit is served meanwhile; no CPU job ever ran on the executor that serves hits."""
    bodies = big_channels(tmp_path, upstream, 8)
    gate = CpuGate("transcode")
    proxy = await proxy_factory(cpu_hook=gate, **settings)
    for i in range(8):  # the sources, fetched and learned first
        assert (await proxy.get(f"/big{i}/noarch/repodata.json")).status == 200
    hit = "/testchan/noarch/repodata.json"
    assert (await proxy.get(hit)).status == 200
    await proxy.idle()

    tasks = [asyncio.ensure_future(proxy.get(f"/big{i}/noarch/repodata.json.bz2")) for i in range(8)]
    jobs = "condaproxy_cpu_jobs"  # admitted to the pool: running or queued for its thread
    await wait_until(
        lambda: (
            gate.held == 1
            and sample(proxy, jobs) == admitted
            and sum(t.done() for t in tasks) == 8 - admitted
        )
    )
    assert admitted <= 1 + settings["cpu_queue"]
    assert sample(proxy, "condaproxy_overloaded_total", reason=why) == 8 - admitted
    refused = [t.result() for t in tasks if t.done()]
    assert all(r.status == 503 and r.headers["Retry-After"] for r in refused)

    # The CPU pool is full and its one thread is held: a hit needs none of it.
    served = await proxy.get(hit)
    assert (served.status, served.xcache) == (200, "HIT")

    gate.release()
    done = [r for r in await asyncio.gather(*tasks) if r.status == 200]
    assert len(done) == admitted
    assert all(bz2.decompress(r.body) in bodies for r in done)
    assert gate.peak_running == 1
    assert {"learn", "transcode", "hash_file"} <= gate.names()
    assert all(thread.startswith("condaproxy-cpu") for thread in gate.threads()), gate.ran
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
