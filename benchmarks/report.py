"""Results as JSON and as a markdown table per scenario: medians, the ratio to nginx, the targets."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.peers import PEERS

SCENARIOS = (
    "hit-small",
    "hit-large",
    "cold-collapse",
    "memory",
    "repodata",
    "catalog-scale",
    "eviction",
    "client",
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str = "{:,.1f}"
    better: str = ""  # "higher" or "lower"
    # ("vs_nginx_min", x): cp/nginx >= x; ("vs_nginx_max", x): cp/nginx <= x; ("max", x): cp <= x;
    # ("rel_max", key, x, name): cp <= x * cp[key]; ("rel_min", key, x, name): cp >= x * cp[key]
    target: tuple[Any, ...] | None = None


M = Metric
METRICS: dict[str, list[Metric]] = {
    "hit-small": [
        M("shard_rps", "shard ({shard} B): requests/s", "{:,.0f}", "higher", ("vs_nginx_min", 0.5)),
        M("shard_p50_ms", "shard: p50 latency (ms)", "{:.2f}", "lower"),
        M("shard_p99_ms", "shard: p99 latency (ms)", "{:.2f}", "lower", ("vs_nginx_max", 2.0)),
        M("pkg_rps", "package ({pkg} KB): requests/s", "{:,.0f}", "higher", ("vs_nginx_min", 0.5)),
        M("pkg_p50_ms", "package: p50 latency (ms)", "{:.2f}", "lower"),
        M("pkg_p99_ms", "package: p99 latency (ms)", "{:.2f}", "lower", ("vs_nginx_max", 2.0)),
        M("rss_mb", "RSS after the load (MB)", "{:,.0f}", "lower"),
    ],
    "hit-large": [
        M("mbps", "{large_clients} clients × {large} MB, sha256 checked: MB/s", "{:,.0f}", "higher"),
        M("wrk_mbps", "wrk, {large_clients} connections: MB/s", "{:,.0f}", "higher"),
    ],
    "cold-collapse": [
        M("direct_s", "uncontended direct download (s)", "{:.2f}", "lower"),
        M(
            "upstream_fetch_s",
            "upstream fetch, origin's $request_time (s)",
            "{:.2f}",
            "lower",
            ("rel_max", "direct_s", 1.1, "direct"),
        ),
        M("origin_requests", "origin requests for the file", "{:.0f}", "lower"),
        M("ttfb_early_max_ms", "first byte, early clients: max (ms)", "{:,.0f}", "lower", ("max", 50)),
        M("ttfb_late_median_ms", "first byte, late joiners: median (ms)", "{:,.0f}", "lower", ("max", 50)),
        M("ttfb_max_ms", "first byte, every client: max (ms)", "{:,.0f}", "lower", ("max", 50)),
        M("last_done_s", "last client done (s)", "{:.2f}", "lower", ("vs_nginx_max", 1.0)),
        M("rss_peak_mb", "peak RSS (MB)", "{:,.0f}", "lower"),
    ],
    "memory": [
        M("rss_idle_mb", "idle RSS after start (MB)", "{:,.0f}", "lower", ("max", 60)),
        M(
            "rss_peak_mb",
            "peak RSS, {memory_clients} cold streams of {huge} MB (MB)",
            "{:,.0f}",
            "lower",
            ("max", 150),
        ),
        M("delivered_gb", "GB delivered in the window", "{:.1f}", "higher"),
        M("complete", "bodies read whole in the window", "{:.0f}", "higher"),
    ],
    "repodata": [
        M("json_ttfb_ms", "repodata.json: first byte (ms)", "{:,.0f}", "lower"),
        M("json_s", "repodata.json ({json_mb} MB): done (s)", "{:.2f}", "lower"),
        M("zst_s", "repodata.json.zst: done (s)", "{:.2f}", "lower"),
        M("shards_s", "{shards} shards after the rest: done (s)", "{:.2f}", "lower"),
        M("learned_s", "every digest learned ({records:,} records) (s)", "{:.1f}", "lower"),
        M("coded_s", "zstd-coded repodata.json derived (s)", "{:.1f}", "lower"),
        M("ingest_s", "ingest done (s)", "{:.1f}", "lower"),
        M("hits_base_p99_ms", "warm hits before: p99 (ms)", "{:.1f}", "lower"),
        M("hits_p50_ms", "warm hits during: p50 (ms)", "{:.1f}", "lower"),
        M("hits_p99_ms", "warm hits during: p99 (ms)", "{:.1f}", "lower", ("max", 50)),
        M("hits_max_ms", "warm hits during: max (ms)", "{:,.0f}", "lower"),
        M("hits_during", "warm hits during (count)", "{:,.0f}", "higher"),
        M("rss_peak_mb", "peak RSS during the ingest (MB)", "{:,.0f}", "lower", ("max", 400)),
    ],
    "catalog-scale": [
        M("rps_few", "hits, {few:,} units: requests/s", "{:,.0f}", "higher"),
        M(
            "rps_many",
            "hits, {many:,} units: requests/s",
            "{:,.0f}",
            "higher",
            ("rel_min", "rps_few", 0.9, "{few:,} units"),
        ),
        M("p99_few_ms", "hits, {few:,} units: p99 (ms)", "{:.2f}", "lower"),
        M(
            "p99_many_ms",
            "hits, {many:,} units: p99 (ms)",
            "{:.2f}",
            "lower",
            ("rel_max", "p99_few_ms", 1.1, "{few:,} units"),
        ),
        M("startup_few_s", "start-up to first hit, {few:,} units (s)", "{:.2f}", "lower"),
        M("startup_many_s", "start-up to first hit, {many:,} units (s)", "{:.2f}", "lower"),
        M("rss_few_mb", "RSS after start-up, {few:,} units (MB)", "{:,.0f}", "lower"),
        M("rss_many_mb", "RSS after start-up, {many:,} units (MB)", "{:,.0f}", "lower"),
    ],
    "eviction": [
        M("evicted", "units evicted (of {evict_units:,})", "{:,.0f}", "higher"),
        M("evicted_before_hits", "of them before the hit clients started", "{:,.0f}", ""),
        M("evict_s", "process start until all evicted (s)", "{:.1f}", "lower"),
        M("evict_rate", "units evicted per second while measured", "{:,.0f}", "higher"),
        M("hits_p99_ms", "hits during eviction: p99 (ms)", "{:.1f}", "lower", ("max", 50)),
        M("hits_max_ms", "hits during eviction: max (ms)", "{:,.0f}", "lower"),
        M("hits_after_p99_ms", "hits after eviction: p99 (ms)", "{:.1f}", "lower"),
        M("hits_during", "hits during eviction (count)", "{:,.0f}", "higher"),
    ],
    "client": [
        M("cold_s", "solve + install, cold peer (s)", "{:.2f}", "lower"),
        M("warm_s", "solve + install, warm peer (s)", "{:.2f}", "lower"),
        M("packages", "packages installed", "{:.0f}", ""),
    ],
}


def _fmt(fmt: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _target(t: tuple[Any, ...] | None, ctx: dict[str, Any]) -> str:
    if t is None:
        return ""
    kind = t[0]
    if kind == "vs_nginx_min":
        return f"≥ {t[1]:g}× nginx"
    if kind == "vs_nginx_max":
        return "≤ nginx" if t[1] == 1.0 else f"≤ {t[1]:g}× nginx"
    if kind == "max":
        return f"≤ {t[1]:g}"
    if kind in ("rel_max", "rel_min"):
        sign = "≤" if kind == "rel_max" else "≥"
        return f"{sign} {t[2]:g}× {t[3].format(**ctx)}"
    return ""


def _met(t: tuple[Any, ...] | None, cp: dict[str, float], nginx: dict[str, float], key: str) -> str:
    value = cp.get(key)
    if t is None or value is None or math.isnan(value):
        return ""
    kind = t[0]
    if kind in ("vs_nginx_min", "vs_nginx_max"):
        ref = nginx.get(key)
        if not ref or math.isnan(ref):
            return ""
        ok = value >= t[1] * ref if kind == "vs_nginx_min" else value <= t[1] * ref
    elif kind == "max":
        ok = value <= t[1]
    else:
        ref = cp.get(t[1])
        if ref is None or math.isnan(ref):
            return ""
        ok = value <= t[2] * ref if kind == "rel_max" else value >= t[2] * ref
    return "✓" if ok else "✗"


def table(name: str, data: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    peers = [p for p in PEERS if p in data["peers"]]
    metrics = {p: data["peers"][p]["metrics"] for p in peers}
    cp, nginx = metrics.get("condaproxy", {}), metrics.get("nginx", {})
    labels = {m.key: m.label.format(**ctx) for m in METRICS[name]}
    show_ratio = bool(nginx) and len(peers) > 1
    head = ["metric", *peers] + (["cp/nginx"] if show_ratio else []) + ["target", "met"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METRICS[name]:
        if not any(m.key in metrics[p] for p in peers):
            continue
        row = [labels[m.key], *(_fmt(m.fmt, metrics[p].get(m.key)) for p in peers)]
        if show_ratio:
            c, n = cp.get(m.key), nginx.get(m.key)
            row.append(
                f"{c / n:.2f}" if c is not None and n and not math.isnan(c) and not math.isnan(n) else "–"
            )
        row += [_target(m.target, ctx), _met(m.target, cp, nginx, m.key)]
        out.append("| " + " | ".join(row) + " |")
    return out


def spread_line(scenarios: dict[str, Any]) -> str:
    """Run-to-run spread, (max - min) / median, over every metric measured more than once."""
    spreads = [
        (v, f"{name} {peer} {key}")
        for name, data in scenarios.items()
        for peer, pd in data["peers"].items()
        for key, v in pd["spread"].items()
        if len(pd["samples"].get(key, [])) > 1 and not math.isnan(v)
    ]
    if not spreads:
        return "run-to-run spread: single runs"
    worst = max(spreads)
    return (
        f"run-to-run spread (max − min) / median: median {100 * statistics.median(v for v, _ in spreads):.0f} % "
        f"over {len(spreads)} metrics, worst {100 * worst[0]:.0f} % ({worst[1]})"
    )


def markdown(doc: dict[str, Any]) -> str:
    ctx = doc["context"]
    s = doc["settings"]
    out = [
        f"Machine: {doc['machine_line']}",
        "",
        f"Settings: {'quick' if s['quick'] else 'full'}; medians of {s['runs']} runs "
        f"({s['heavy_runs']} for memory, repodata and eviction); origin limit_rate {s['upstream_mib']:g} MiB/s per "
        f"connection, {doc['origin_delay']}; nginx worker_processes {s['nginx_workers']}, condaproxy "
        f"workers {s['condaproxy_workers']}, squid workers 1; {s['client_procs']} client processes. "
        + spread_line(doc["scenarios"]),
        "",
    ]
    for name in SCENARIOS:
        data = doc["scenarios"].get(name)
        if data is None:
            continue
        out += [f"### {name} ({data['seconds']:.0f} s)", ""]
        out += [f"- {n}" for n in data["notes"]]
        out.append("")
        out += table(name, data, ctx)
        bodies = {p: (d["bodies_verified"], d["bodies"]) for p, d in data["peers"].items() if d["bodies"]}
        if bodies:
            out += ["", "Bodies checked: " + ", ".join(f"{p} {v}/{n}" for p, (v, n) in bodies.items())]
        for f in data["failures"][:10]:
            out.append(f"\n**FAILED** {f}")
        out.append("")
    if doc.get("profile"):
        out += ["### Profile of small hits", "", "```", doc["profile"], "```", ""]
    return "\n".join(out)
