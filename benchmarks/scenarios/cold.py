"""Cold files: many clients collapsing onto one upstream fetch, and memory under 100 cold streams."""

from __future__ import annotations

import statistics
import time

from benchmarks.bench import Bench, ScenarioResult, ms, prefix_digests, turns
from benchmarks.clients import Fetch, Got
from benchmarks.procs import MB


def _direct(b: Bench, res: ScenarioResult, path: str) -> float | None:
    """An uncontended download straight from the origin: the fetch time to compare with."""
    offset = b.origin_offset()
    got = b.pool.fetch([Fetch(b.origin.url("direct") + "/" + path, time.monotonic())]).get()[0][0]
    if not b.check(res, "direct", got, path):
        return None
    lines = b.wait_origin(offset, "direct", path)
    return lines[0]["seconds"] if lines else got.ended - got.started


def _checked(b: Bench, res: ScenarioResult, kind: str, gots: list[Got], path: str) -> bool:
    """Check every body: whole when read to the end, else as the prefix of the file it must be."""
    partial = {g.size for g in gots if not g.complete and not g.error}
    prefixes = prefix_digests(b.chan.local(path), partial)
    ok = True
    for g in gots:
        if not g.complete and not g.error and prefixes.get(g.size) != g.sha256:
            g.error = f"the {g.size} bytes received differ from the file's"
        ok = b.check(res, kind, g, path, prefix_ok=True) and ok
    return ok


def cold_collapse(b: Bench, res: ScenarioResult) -> None:
    """Early clients at once and late joiners half-way, on a file no peer has: one fetch, at full speed."""
    s = b.settings
    path = b.chan.large
    size = b.chan.file(path).size
    upstream_s = size / (s.upstream_mib * MB) if s.upstream_mib else 0.0
    late_after = max(0.2, upstream_s / 2)
    cap = 20.0 if s.quick else 40.0  # a peer pacing its fetch by slow readers must not stall the run
    res.notes.append(
        f"{s.collapse_early} clients at once + {s.collapse_late} joining {late_after:.2f} s later, "
        f"{size / MB:.0f} MB, origin limit_rate {s.upstream_mib:g} MiB/s per connection and "
        f"{b.origin.delay_note}; a fresh peer (empty cache) for every run; upstream fetch time is the "
        "origin's $request_time"
    )
    for run in range(s.runs):
        direct = _direct(b, res, path)
        if direct is None:
            continue
        for kind in turns(b.peers, run):
            res.sample(kind, "direct_s", direct)
            [peer] = b.start([kind])
            try:
                offset = b.origin_offset()
                sampler = peer.sampler()
                t0 = time.monotonic() + 0.3
                url = b.url(peer, path)
                stop_at = t0 + cap
                jobs = [Fetch(url, t0, stop_at) for _ in range(s.collapse_early)]
                jobs += [Fetch(url, t0 + late_after, stop_at) for _ in range(s.collapse_late)]
                gots: list[Got] = [g for share in b.pool.fetch(jobs).get() for g in share]
                peak = sampler.finish()
                if not _checked(b, res, kind, gots, path):
                    continue
                early = [g for g in gots if g.started < t0 + late_after / 2]
                late = [g for g in gots if g.started >= t0 + late_after / 2]
                lines = b.wait_origin(offset, kind, path)
                fetch_s = max((ln["seconds"] for ln in lines), default=float("nan"))
                res.sample(kind, "origin_requests", len(lines))
                res.sample(kind, "upstream_fetch_s", fetch_s)
                res.sample(kind, "fetch_vs_direct", fetch_s / direct)
                res.sample(kind, "ttfb_early_max_ms", ms(max(g.ttfb for g in early)))
                if late:
                    res.sample(kind, "ttfb_late_median_ms", ms(statistics.median(g.ttfb for g in late)))
                res.sample(kind, "ttfb_max_ms", ms(max(g.ttfb for g in gots)))
                cut = sum(not g.complete for g in gots)
                if cut:
                    res.notes.append(
                        f"{kind}: run {run}: {cut} clients still reading when stopped at {cap:.0f} s"
                    )
                else:
                    res.sample(kind, "last_done_s", max(g.ended for g in gots) - t0)
                res.sample(kind, "rss_peak_mb", peak / MB)
                if not peer.alive():
                    res.fail(kind, f"exited during the run:\n{peer.tail()}")
            finally:
                peer.stop()


def memory(b: Bench, res: ScenarioResult) -> None:
    """100 concurrent cold streams of the huge file: idle and peak RSS (summed over processes)."""
    s = b.settings
    path = b.chan.huge
    size = b.chan.file(path).size
    upstream_s = size / (s.upstream_mib * MB) if s.upstream_mib else 1.0
    window = upstream_s * 1.3 + (1.0 if s.quick else 3.0)
    res.notes.append(
        f"{s.memory_clients} clients at once on a cold {size / MB:.0f} MB file, reading for {window:.1f} s "
        "(the upstream fetch and then some; moving 100 whole copies would take minutes): bodies read to "
        "the end are checked whole, the others as prefixes (sha256 of the bytes received)"
    )
    for run in range(s.heavy_runs):
        for kind in turns(b.peers, run):
            [peer] = b.start([kind])
            try:
                time.sleep(0.5)
                res.sample(kind, "rss_idle_mb", peer.rss() / MB)
                sampler = peer.sampler()
                t0 = time.monotonic() + 0.3
                url = b.url(peer, path)
                jobs = [Fetch(url, t0, t0 + window) for _ in range(s.memory_clients)]
                gots = [g for share in b.pool.fetch(jobs).get() for g in share]
                peak = sampler.finish()
                _checked(b, res, kind, gots, path)
                res.sample(kind, "rss_peak_mb", peak / MB)
                res.sample(kind, "delivered_gb", sum(g.size for g in gots) / 1024**3)
                res.sample(kind, "complete", sum(g.complete for g in gots))
                if not peer.alive():
                    res.fail(kind, f"exited during the run:\n{peer.tail()}")
            finally:
                peer.stop()
