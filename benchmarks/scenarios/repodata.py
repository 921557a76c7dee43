"""Conda-forge-sized repodata through a cold peer while warm clients keep asking for small files.

The ingest: repodata.json, repodata.json.zst, the shard index and a sample of shards, all cold,
then (for condaproxy) until every record's digest is learned and the zstd-coded representation
of repodata.json is derived. Meanwhile latency clients in their own processes loop over warm
small files: their p99 during the ingest, against a baseline second before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import zstandard

from benchmarks import clients
from benchmarks.bench import Bench, ScenarioResult, ms, percentile, turns
from benchmarks.clients import Fetch, Got, Latencies
from benchmarks.procs import MB


class DigestWatch:
    """Polls condaproxy's catalog (read-only) until it has learned every record of the channel."""

    def __init__(self, catalog: Path, channel: str, want: int, t0: float, cap: float) -> None:
        self.catalog, self.channel, self.want, self.t0, self.cap = catalog, channel, want, t0, cap
        self.learned_at: float | None = None
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while time.monotonic() < self.t0 + self.cap:
            try:
                with sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True, timeout=1) as db:
                    row = db.execute(
                        "SELECT COUNT(*) FROM digests WHERE channel=?", (self.channel,)
                    ).fetchone()
                self.count = int(row[0])
            except sqlite3.Error:
                pass
            if self.count >= self.want:
                self.learned_at = time.monotonic()
                return
            time.sleep(0.25)

    def join(self) -> None:
        self._thread.join()


async def _coded_ready(
    s: aiohttp.ClientSession, url: str, want_sha: str, deadline: float
) -> tuple[float | None, str]:
    """Ask (HEAD) until repodata.json comes zstd-coded, then GET it and check the decoded sha256."""
    headers = {"Accept-Encoding": "zstd"}
    while time.monotonic() < deadline:
        async with s.head(url, headers=headers) as resp:
            coded = resp.headers.get("Content-Encoding") == "zstd"
        if coded:
            ready = time.monotonic()
            h = hashlib.sha256()
            d = zstandard.ZstdDecompressor().decompressobj()
            async with s.get(url, headers=headers) as resp:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    h.update(d.decompress(chunk))
            ok = h.hexdigest() == want_sha
            return ready, "" if ok else "the zstd-coded repodata.json does not decode to repodata.json"
        await asyncio.sleep(0.1)
    return None, ""


@dataclass
class Ingest:
    main: list[Got]  # repodata.json, .zst, the shard index
    shards: list[Got]
    shards_started: float
    coded_at: float | None = None
    coded_error: str = ""


async def _ingest(
    urls: list[str], shard_urls: list[str], coded: tuple[str, str] | None, t0: float, cap: float
) -> Ingest:
    """The cold fetches; the shards once the rest is in, the coded variant polled meanwhile."""
    async with clients.session() as s:
        main_task = asyncio.gather(*(clients.get(s, Fetch(u, t0)) for u in urls))
        coded_task = None
        if coded is not None:
            url, sha = coded

            async def after_json() -> tuple[float | None, str]:
                await main_task
                return await _coded_ready(s, url, sha, t0 + cap)

            coded_task = asyncio.create_task(after_json())
        main = list(await main_task)
        started = time.monotonic()
        shards = list(await asyncio.gather(*(clients.get(s, Fetch(u, started)) for u in shard_urls)))
        out = Ingest(main, shards, started)
        if coded_task is not None:
            out.coded_at, out.coded_error = await coded_task
        return out


def _check_ingest(b: Bench, res: ScenarioResult, kind: str, got: Ingest) -> float:
    """Check every body and sample the times; returns when the last fetch ended."""
    c = b.chan
    for path, g in zip([c.cf_json, c.cf_zst, c.cf_index], got.main, strict=True):
        b.check(res, kind, g, path)
    json_got, zst_got, _ = got.main
    res.sample(kind, "json_s", json_got.ended - json_got.started)
    res.sample(kind, "json_ttfb_ms", ms(json_got.ttfb))
    res.sample(kind, "zst_s", zst_got.ended - zst_got.started)
    pr = res.peer(kind)
    for path, g in zip(c.cf_shards, got.shards, strict=True):
        pr.bodies += 1
        name = path.rsplit("/", 1)[1].split(".")[0]
        if g.status == 200 and g.complete and g.sha256 == name:
            pr.verified += 1
        else:
            res.fail(kind, f"{path}: status {g.status}, sha256 {g.sha256[:12]} {g.error}")
    res.sample(kind, "shards_s", max(g.ended for g in got.shards) - got.shards_started)
    if got.coded_error:
        res.fail(kind, got.coded_error)
    return max(g.ended for g in [*got.main, *got.shards])


def repodata(b: Bench, res: ScenarioResult) -> None:
    s = b.settings
    c = b.chan
    cap = 300.0 if not s.quick else 60.0
    base_s = 0.5 if s.quick else 2.0
    count = 16 if s.quick else 40
    warm_files = c.small_files[:: max(1, len(c.small_files) // count)][:count]
    res.notes.append(
        f"cold: repodata.json ({c.file(c.cf_json).size / MB:.0f} MB, {c.cf_records:,} records), .zst "
        f"({c.file(c.cf_zst).size / MB:.0f} MB), the shard index and {len(c.cf_shards)} shards; "
        f"{s.latency_clients} clients in {b.pool.procs} processes loop over {len(warm_files)} warm small "
        f"files; hits p99 during the ingest vs the {base_s:g} s before it; digests learned = every record "
        f"in condaproxy's catalog (polled, capped at {cap:.0f} s)"
    )
    expected_by_path = {p: c.file(p).sha256 for p in warm_files}
    for run in range(s.heavy_runs):
        for kind in turns(b.peers, run):
            [peer] = b.start([kind])
            stop_file = b.work / f"stop-{kind}-{run}"
            try:
                if not b.warm(res, peer, warm_files):
                    continue
                urls = {b.url(peer, p): sha for p, sha in expected_by_path.items()}
                t_lat = time.monotonic() + 0.3
                lat_async = b.pool.latency(
                    list(urls), urls, s.latency_clients, t_lat, t_lat + cap + 60, str(stop_file)
                )
                time.sleep(max(0.0, t_lat + base_s - time.monotonic()))
                sampler = peer.sampler()
                t0 = time.monotonic()
                watch = None
                if peer.cache_dir is not None:
                    watch = DigestWatch(peer.cache_dir / "catalog.sqlite3", "cfscale", c.cf_records, t0, cap)
                # Only condaproxy makes coded variants (a front nginx caches by URI, not by coding).
                coded = (b.url(peer, c.cf_json), c.file(c.cf_json).sha256) if kind == "condaproxy" else None
                got = asyncio.run(
                    _ingest(
                        [b.url(peer, p) for p in (c.cf_json, c.cf_zst, c.cf_index)],
                        [b.url(peer, p) for p in c.cf_shards],
                        coded,
                        t0,
                        cap,
                    )
                )
                ended = _check_ingest(b, res, kind, got)
                coded_at = got.coded_at
                if watch is not None:
                    watch.join()
                learned_at = watch.learned_at if watch is not None else None
                t_end = max(ended, coded_at or 0.0, learned_at or 0.0)
                peak = sampler.finish()
                stop_file.touch()
                lats: list[Latencies] = lat_async.get(timeout=cap + 120)
                _latency_samples(res, kind, lats, t_lat, t0, t_end)
                res.sample(kind, "ingest_s", t_end - t0)
                res.sample(kind, "rss_peak_mb", peak / MB)
                if watch is not None:
                    if watch.learned_at is None:
                        res.notes.append(
                            f"{kind}: run {run}: {watch.count:,} of {c.cf_records:,} digests learned "
                            f"after {cap:.0f} s"
                        )
                    else:
                        res.sample(kind, "learned_s", watch.learned_at - t0)
                if coded_at is not None:
                    res.sample(kind, "coded_s", coded_at - t0)
                if not peer.alive():
                    res.fail(kind, f"exited during the run:\n{peer.tail()}")
            finally:
                stop_file.touch()
                peer.stop()


def _latency_samples(
    res: ScenarioResult, kind: str, lats: list[Latencies], t_lat: float, t0: float, t_end: float
) -> None:
    during = [lt for x in lats for st, lt in zip(x.starts, x.latencies, strict=True) if t0 <= st <= t_end]
    base = [lt for x in lats for st, lt in zip(x.starts, x.latencies, strict=True) if st < t0]
    bad = sum(x.bad for x in lats)
    pr = res.peer(kind)
    pr.bodies += sum(x.ok + x.bad for x in lats)
    pr.verified += sum(x.ok for x in lats)
    if bad:
        errors = [e for x in lats for e in x.errors][:3]
        res.fail(kind, f"{bad} warm small-file requests failed or had the wrong body: {errors}")
    res.sample(kind, "hits_base_p99_ms", ms(percentile(base, 99)))
    res.sample(kind, "hits_p50_ms", ms(percentile(during, 50)))
    res.sample(kind, "hits_p99_ms", ms(percentile(during, 99)))
    res.sample(kind, "hits_max_ms", ms(max(during, default=float("nan"))))
    res.sample(kind, "hits_during", len(during))
