"""Cost as the work grows (condaproxy alone): hits and start-up with few vs many catalog rows, and
hits while eviction removes a great many units.

The catalogs start as condaproxy's own (a warm cache it made, so the schema is the product's),
then get unit rows written into SQLite directly: the columns are read from the table itself,
so a column added later is noticed rather than silently left out.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import wrk
from benchmarks.bench import Bench, ScenarioResult, ms, percentile, turns
from benchmarks.clients import Latencies
from benchmarks.peers import Running
from benchmarks.procs import MB
from condaproxy.cache.catalog.db import SCHEMA_VERSION
from condaproxy.cache.unit import COMPLETE
from condaproxy.conda.paths import Kind

CATALOG = "catalog.sqlite3"
SYNTH = "synth"


def warm_template(b: Bench, res: ScenarioResult) -> Path | None:
    """A cache directory condaproxy filled itself with every small file of benchchan."""
    directory = b.prefix("template-cache")
    [peer] = b.start(["condaproxy"], cache_dir=directory)
    try:
        ok = b.warm(res, peer, b.chan.small_files)
    finally:
        peer.stop()
    return directory if ok else None


def _rows(count: int, now: float, accessed_at: float, size: int, headers: str) -> Iterator[dict[str, Any]]:
    # In primary-key order (channel, subdir, filename): appending to the B-tree is what is fast.
    channels = max(1, min(1000, count // 100))
    for i in range(count):
        channel = f"{SYNTH}{i * channels // count:03d}"
        filename = f"synth-pkg{i:07d}-1.0-h0000000_0.conda"
        blob = hashlib.sha256(f"{SYNTH}:{i}".encode()).hexdigest()
        yield {
            "channel": channel,
            "subdir": "linux-64",
            "filename": filename,
            "kind": Kind.PACKAGE.value,
            "upstream_url": f"http://127.0.0.1:9/{channel}/linux-64/{filename}",
            "state": COMPLETE,
            "blob_key": blob,
            "sha256": blob,
            "size": size,
            "headers": headers,
            "etag": None,
            "last_modified": None,
            "fetched_at": now,
            "validated_at": now,
            "accessed_at": accessed_at,
            "hits": 0,
            "source_blob": None,
        }


def add_units(catalog: Path, count: int, *, accessed_at: float, size: int) -> float:
    """Write count unit rows (their blobs absent: nothing serves them); returns the seconds it took."""
    t0 = time.monotonic()
    db = sqlite3.connect(catalog)
    # A scratch copy, written once before condaproxy opens it: no need for durability per page,
    # and a large cache keeps the random blob_key index in memory.
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{catalog}: schema {version}, this condaproxy's is {SCHEMA_VERSION}")
        info = db.execute("PRAGMA table_info(units)").fetchall()
        columns = [r[1] for r in info]
        known = next(_rows(1, 0, 0, 0, ""))
        missing = [r[1] for r in info if r[1] not in known and r[3] and r[4] is None]
        if missing:
            raise RuntimeError(f"units has required columns the benchmark does not fill: {missing}")
        columns = [c for c in columns if c in known]
        real = db.execute("SELECT headers FROM units WHERE kind=? LIMIT 1", (Kind.PACKAGE.value,)).fetchone()
        headers = real[0] if real else json.dumps({"Content-Type": "application/octet-stream"})
        sql = f"INSERT INTO units ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        rows = _rows(count, time.time(), accessed_at, size, headers)
        while batch := [tuple(r[c] for c in columns) for r in itertools.islice(rows, 50_000)]:
            db.executemany(sql, batch)
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.monotonic() - t0


def _copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def _first_hit(peer: Running, path: str, timeout: float = 120.0) -> float:
    """Seconds from the process's start until it answered path from its cache."""
    deadline = time.monotonic() + timeout

    async def probe() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{peer.url}/{path}") as resp:
            await resp.read()
            return resp.status == 200 and resp.headers.get("X-Cache") == "HIT"

    while time.monotonic() < deadline:
        try:
            if asyncio.run(probe()):
                return time.monotonic() - peer.servers[0].started
        except (aiohttp.ClientError, OSError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"no cache hit for {path} within {timeout:.0f} s")


def catalog_scale(b: Bench, res: ScenarioResult) -> None:
    s = b.settings
    few, many = s.catalog_rows
    template = warm_template(b, res)
    if template is None:
        return
    paths = ["/" + p for p in b.chan.small_files]
    dirs: dict[str, Path] = {}
    for label, rows in (("few", few), ("many", many)):
        directory = _copy(template, b.work / f"catalog-{label}")
        existing = sqlite3.connect(directory / CATALOG).execute("SELECT COUNT(*) FROM units").fetchone()[0]
        seconds = add_units(
            directory / CATALOG, max(0, rows - existing), accessed_at=time.time() - 86400, size=15_000
        )
        res.notes.append(f"{rows:,} units: {rows - existing:,} rows written in {seconds:.1f} s")
        dirs[label] = directory
    res.notes.append(
        f"condaproxy only; wrk -t{s.wrk_threads} -c{s.connections} -d{s.wrk_seconds}s rotating over "
        f"{len(paths)} warm small files; start-up = process start until the first cache hit is answered"
    )
    for run in range(s.runs):
        for label in turns(["few", "many"], run):
            [peer] = b.start(["condaproxy"], cache_dir=dirs[label])
            try:
                res.sample("condaproxy", f"startup_{label}_s", _first_hit(peer, b.chan.shard))
                res.sample("condaproxy", f"rss_{label}_mb", peer.rss() / MB)
                r = wrk.run(
                    b.tools.wrk, peer.url, paths, b.work,
                    threads=s.wrk_threads, connections=s.connections, seconds=s.wrk_seconds,
                )  # fmt: skip
                if r.non2xx or r.errors:
                    res.fail("condaproxy", f"{label}: wrk saw {r.non2xx} non-2xx and {r.errors} errors")
                    continue
                res.sample("condaproxy", f"rps_{label}", r.rps)
                res.sample("condaproxy", f"p99_{label}_ms", r.p99_ms)
            finally:
                peer.stop()


def _synthetic_left(catalog: Path) -> int:
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM units WHERE channel >= ? AND channel < ?", (SYNTH, SYNTH + "\uffff")
        ).fetchone()
    return int(row[0])


def eviction(b: Bench, res: ScenarioResult) -> None:
    s = b.settings
    template = warm_template(b, res)
    if template is None:
        return
    files = b.chan.small_files
    real = sum(b.chan.file(p).size for p in files)
    res.notes.append(
        f"condaproxy only; {s.evict_units:,} old units (1 MB each) over max_size, evicted by the pass that "
        f"runs at start-up, while {s.latency_clients} clients in {b.pool.procs} processes loop over "
        f"{len(files)} warm small files (measured for at most {s.evict_cap_s:.0f} s)"
    )
    for run in range(s.heavy_runs):
        directory = _copy(template, b.work / f"evict-{run}")
        add_units(directory / CATALOG, s.evict_units, accessed_at=1e9, size=MB)
        # Just under real + one unit: every old unit must go, and nothing else.
        cache = {"max_size": str(real + MB // 2), "evict_interval": "3600"}
        urls: dict[str, str] = {}
        stop_file = b.work / f"stop-evict-{run}"
        [peer] = b.start(["condaproxy"], cache_dir=directory, condaproxy_cache=cache)
        try:
            urls = {b.url(peer, p): b.chan.file(p).sha256 for p in files}
            t_lat = time.monotonic() + 0.1
            lat_async = b.pool.latency(
                list(urls), urls, s.latency_clients, t_lat, t_lat + s.evict_cap_s + 30, str(stop_file)
            )
            left0 = _synthetic_left(directory / CATALOG)
            t0 = time.monotonic()
            left = left0
            while left and time.monotonic() < t0 + s.evict_cap_s:
                time.sleep(0.1)
                left = _synthetic_left(directory / CATALOG)
            t_end = time.monotonic()
            after_until = t_end + (0.5 if s.quick else 2.0)
            time.sleep(max(0.0, after_until - time.monotonic()))
            stop_file.touch()
            lats: list[Latencies] = lat_async.get(timeout=120)
        finally:
            stop_file.touch()
            peer.stop()
        evicted = s.evict_units - left
        res.sample("condaproxy", "evicted", evicted)
        res.sample("condaproxy", "evicted_before_hits", s.evict_units - left0)
        rate = (left0 - left) / max(t_end - t0, 1e-9)
        if left:
            res.notes.append(
                f"run {run}: NOT FINISHED: {left:,} of {s.evict_units:,} units still there after "
                f"{s.evict_cap_s:.0f} s; at {rate:,.0f} units/s all would take ~{s.evict_units / max(rate, 1e-9):,.0f} s"
            )
        else:
            res.sample("condaproxy", "evict_s", t_end - peer.servers[0].started)
        res.sample("condaproxy", "evict_rate", rate)
        during = [lt for x in lats for st, lt in zip(x.starts, x.latencies, strict=True) if t0 <= st <= t_end]
        after = [lt for x in lats for st, lt in zip(x.starts, x.latencies, strict=True) if st > t_end]
        pr = res.peer("condaproxy")
        pr.bodies += sum(x.ok + x.bad for x in lats)
        pr.verified += sum(x.ok for x in lats)
        res.sample("condaproxy", "hits_p99_ms", ms(percentile(during, 99)))
        res.sample("condaproxy", "hits_max_ms", ms(max(during, default=float("nan"))))
        res.sample("condaproxy", "hits_after_p99_ms", ms(percentile(after, 99)))
        res.sample("condaproxy", "hits_during", len(during))
        bad = sum(x.bad for x in lats)
        if bad:
            res.fail(
                "condaproxy", f"{bad} hits failed during eviction: {[e for x in lats for e in x.errors][:3]}"
            )
