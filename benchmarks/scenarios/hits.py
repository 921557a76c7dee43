"""Warm hits: small files with wrk (requests/s, p50/p99), large files with aiohttp clients (MB/s)."""

from __future__ import annotations

import time

from benchmarks import profile, wrk
from benchmarks.bench import Bench, ScenarioResult, turns
from benchmarks.clients import Fetch, fetch_now
from benchmarks.peers import Running
from benchmarks.procs import MB


def _wrk_checked(
    b: Bench, res: ScenarioResult, peer: Running, path: str, connections: int, seconds: int
) -> wrk.WrkResult | None:
    s = b.settings
    try:
        r = wrk.run(
            b.tools.wrk,
            peer.url,
            ["/" + path],
            b.work,
            threads=s.wrk_threads,
            connections=connections,
            seconds=seconds,
        )
    except RuntimeError as exc:
        res.fail(peer.kind, str(exc))
        return None
    size = b.chan.file(path).size
    # A slow peer may finish no large response within the run: then only its bytes are counted.
    short = r.bytes_per_request < size if r.requests else r.bytes == 0
    if r.non2xx or r.errors or short:
        res.fail(
            peer.kind,
            f"wrk {path}: {r.non2xx} non-2xx, {r.errors} errors, {r.bytes_per_request:.0f} bytes/response "
            f"for a {size}-byte body",
        )
        return None
    return r


def _verify(b: Bench, res: ScenarioResult, peers: list[Running], paths: list[str]) -> None:
    """Every body once more after the load, sha256 checked."""
    for peer in peers:
        now = time.monotonic()
        for path, got in zip(paths, fetch_now([Fetch(b.url(peer, p), now) for p in paths]), strict=True):
            b.check(res, peer.kind, got, path)


def _profile(b: Bench, res: ScenarioResult, peer: Running, path: str) -> None:
    pid = peer.pid
    if b.tools.pyspy is None or pid is None:
        res.notes.append("profile: py-spy not installed (pip install py-spy)")
        return
    seconds = max(2, b.settings.wrk_seconds)
    raw = b.work / "profile-hit-small.txt"
    spy = profile.start(b.tools.pyspy, pid, seconds + 1, raw)
    time.sleep(0.5)  # let it attach
    r = wrk.run(
        b.tools.wrk,
        peer.url,
        ["/" + path],
        b.work,
        threads=b.settings.wrk_threads,
        connections=b.settings.connections,
        seconds=seconds,
    )
    _, err = spy.communicate(timeout=120)
    if spy.returncode != 0 or not raw.exists():
        res.notes.append(f"profile: py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-300:]}")
        return
    title = (
        f"py-spy, condaproxy, hit-small ({path.rsplit('/', 1)[-1][:16]}… {b.chan.file(path).size} B), "
        f"wrk -t{b.settings.wrk_threads} -c{b.settings.connections} -d{seconds}s under the profiler: "
        f"{r.rps:,.0f} req/s"
    )
    b.profile_text = profile.top_text(raw, title)


def hit_small(b: Bench, res: ScenarioResult) -> None:
    """The 250 B shard and the 15 KB package, warm, 64 connections: req/s and latency."""
    s = b.settings
    targets = [("shard", b.chan.shard), ("pkg", b.chan.package)]
    res.notes.append(
        f"wrk -t{s.wrk_threads} -c{s.connections} -d{s.wrk_seconds}s; shard {b.chan.file(b.chan.shard).size} B, "
        f"package {b.chan.file(b.chan.package).size} B; wrk checks status and length of every response, "
        "aiohttp the sha256 of each body before and after"
    )
    peers = b.start(b.peers)
    try:
        live = [p for p in peers if b.warm(res, p, [path for _, path in targets])]
        by_kind = {p.kind: p for p in live}
        for run in range(s.runs):
            for kind in turns(list(by_kind), run):
                for label, path in targets:
                    r = _wrk_checked(b, res, by_kind[kind], path, s.connections, s.wrk_seconds)
                    if r is None:
                        continue
                    res.sample(kind, f"{label}_rps", r.rps)
                    res.sample(kind, f"{label}_p50_ms", r.p50_ms)
                    res.sample(kind, f"{label}_p99_ms", r.p99_ms)
        for p in live:
            res.sample(p.kind, "rss_mb", p.rss() / MB)
        _verify(b, res, live, [path for _, path in targets])
        if b.profile and "condaproxy" in by_kind:
            _profile(b, res, by_kind["condaproxy"], b.chan.shard)
    finally:
        for p in peers:
            p.stop()


def hit_large(b: Bench, res: ScenarioResult) -> None:
    """N clients each GET the large package at once (sha256 checked): MB/s; and wrk's MB/s."""
    s = b.settings
    path = b.chan.large
    size = b.chan.file(path).size
    large_seconds = max(1, s.wrk_seconds - 2)
    res.notes.append(
        f"{s.large_clients} aiohttp clients in {b.pool.procs} processes × {size / MB:.0f} MB, each body "
        f"hashed as it arrives; wrk -t{s.wrk_threads} -c{s.large_clients} -d{large_seconds}s for the "
        "rate without client-side hashing"
    )
    peers = b.start(b.peers)
    try:
        live = {p.kind: p for p in peers if b.warm(res, p, [path])}
        for run in range(s.runs):
            for kind in turns(list(live), run):
                peer = live[kind]
                start_at = time.monotonic() + 0.2
                jobs = [Fetch(b.url(peer, path), start_at) for _ in range(s.large_clients)]
                gots = [g for share in b.pool.fetch(jobs).get() for g in share]
                if all([b.check(res, kind, g, path) for g in gots]):
                    wall = max(g.ended for g in gots) - min(g.started for g in gots)
                    res.sample(kind, "mbps", sum(g.size for g in gots) / MB / wall)
                r = _wrk_checked(b, res, peer, path, s.large_clients, large_seconds)
                if r is not None:
                    res.sample(kind, "wrk_mbps", r.bytes / MB / r.seconds)
    finally:
        for p in peers:
            p.stop()
