"""`python -m benchmarks`: condaproxy against nginx proxy_cache and squid, scenario by scenario.

Exit status: 0 when the run finished with every body correct, 1 for a correctness failure
(a wrong or short body, an error answer, a peer that died) or --timeout, 2 for a setup problem
(a tool missing, a server that does not start).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import channel, machine, report
from benchmarks.bench import Bench, ScenarioResult, Settings
from benchmarks.clients import ClientPool
from benchmarks.peers import PEERS, Tools, start_origin
from benchmarks.procs import MB, SetupError, Timeout, bounded, find_tool
from benchmarks.scenarios import catalog, client, cold, hits, repodata

RUNNERS: dict[str, Callable[[Bench, ScenarioResult], None]] = {
    "hit-small": hits.hit_small,
    "hit-large": hits.hit_large,
    "cold-collapse": cold.cold_collapse,
    "memory": cold.memory,
    "repodata": repodata.repodata,
    "catalog-scale": catalog.catalog_scale,
    "eviction": catalog.eviction,
    "client": client.client,
}
QUICK_ALL_PEERS = ("hit-small",)
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def default_cache() -> Path:
    env = os.environ.get("CONDAPROXY_BENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condaproxy-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: the smoke test (~40 s)")
    p.add_argument(
        "--scenario", action="append", choices=report.SCENARIOS, help="run only this scenario (repeatable)"
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {', '.join(PEERS)}")
    p.add_argument("--runs", type=int, help="runs per scenario, medians reported (default 3, quick 1)")
    p.add_argument("--heavy-runs", type=int, help="runs of memory, repodata and eviction (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where results.json/.md go")
    p.add_argument("--cache-dir", type=Path, default=default_cache(), help="where built channels are kept")
    p.add_argument("--profile", action="store_true", help="py-spy condaproxy during small hits")
    p.add_argument("--update-readme", action="store_true", help="put the table into benchmarks/README.md")
    p.add_argument("--duration", type=int, help="seconds of each wrk run (default 5, quick 1)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections for small hits")
    p.add_argument("--client-procs", type=int, help="load-generating processes (default 2-4 by CPUs)")
    p.add_argument(
        "--upstream-mib", type=float, default=100.0, help="origin limit_rate, MiB/s per connection"
    )
    p.add_argument("--upstream-delay-ms", type=float, default=20.0, help="origin delay per request")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--condaproxy-workers", type=int, default=1, help="[lazy] workers (when >1)")
    p.add_argument("--nginx", help="nginx binary")
    p.add_argument("--squid", help="squid binary")
    p.add_argument("--wrk", help="wrk binary")
    p.add_argument("--timeout", type=int, default=3600, help="hard limit for the whole run (s)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    cpus = os.cpu_count() or 2
    return Settings(
        quick=quick,
        runs=args.runs or (1 if quick else 3),
        heavy_runs=args.heavy_runs or 1,
        wrk_seconds=args.duration or (1 if quick else 5),
        wrk_threads=2,
        connections=args.connections,
        client_procs=args.client_procs or max(2, min(4, cpus)),
        large_clients=8,
        collapse_early=50,
        collapse_late=10,
        memory_clients=100,
        latency_clients=8 if quick else 32,
        catalog_rows=(1_000, 10_000) if quick else (1_000, 1_000_000),
        evict_units=200 if quick else 100_000,
        evict_cap_s=20.0 if quick else 60.0,
        upstream_mib=args.upstream_mib,
        upstream_delay_ms=args.upstream_delay_ms,
        nginx_workers=args.nginx_workers,
        condaproxy_workers=args.condaproxy_workers,
    )


def find_tools(args: argparse.Namespace, peers: list[str]) -> Tools:
    nginx, squid, wrk = (
        find_tool("nginx", args.nginx),
        find_tool("squid", args.squid),
        find_tool("wrk", args.wrk),
    )
    missing = [name for name, path in (("nginx", nginx), ("wrk", wrk)) if path is None]
    if "squid" in peers and squid is None:
        missing.append("squid")
    if missing:
        raise SetupError(
            f"not installed: {', '.join(missing)} (Debian: apt-get install -y nginx squid wrk "
            "libnginx-mod-http-echo), or pass --peers without squid"
        )
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    assert nginx is not None and wrk is not None
    return Tools(nginx, squid, wrk, pyspy if os.access(pyspy, os.X_OK) else None)


def context(chan: channel.Channels, s: Settings) -> dict[str, Any]:
    """Values the metric labels name."""
    return {
        "shard": chan.file(chan.shard).size,
        "pkg": round(chan.file(chan.package).size / 1024),
        "large": round(chan.file(chan.large).size / MB),
        "huge": round(chan.file(chan.huge).size / MB),
        "large_clients": s.large_clients,
        "memory_clients": s.memory_clients,
        "json_mb": round(chan.file(chan.cf_json).size / MB),
        "shards": len(chan.cf_shards),
        "records": chan.cf_records,
        "few": s.catalog_rows[0],
        "many": s.catalog_rows[1],
        "evict_units": s.evict_units,
    }


def scenario_peers(name: str, peers: list[str], quick: bool) -> list[str]:
    """Every peer; --quick keeps all four only where their configs matter most, to stay short."""
    if not quick or name in QUICK_ALL_PEERS:
        return peers
    return [p for p in peers if p in ("condaproxy", "nginx")] or peers


def update_readme(text: str) -> None:
    body = README.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in body and END in body:
        body = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, body, flags=re.S)
    else:
        body += f"\n## Latest results\n\n{block}\n"
    README.write_text(body)


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown or not peers:
        raise SetupError(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if "nginx" not in peers:
        say("nginx is not among the peers: no ratios")
    s = settings_from(args)
    tools = find_tools(args, peers)
    if args.profile and tools.pyspy is None:
        raise SetupError("--profile needs py-spy (pip install py-spy)")
    chan = channel.load_or_build(args.cache_dir, channel.QUICK if s.quick else channel.FULL, say)
    before = machine.snapshot()
    origin = start_origin(tools.nginx, work, chan.root, s.upstream_mib, s.upstream_delay_ms)
    pool: ClientPool | None = None
    scenarios: dict[str, Any] = {}
    try:
        pool = ClientPool(s.client_procs)
        bench = Bench(s, tools, origin, chan, pool, work, peers, say, profile=args.profile, keep=args.keep)
        for name in args.scenario or report.SCENARIOS:
            bench.peers = scenario_peers(name, peers, s.quick)
            say(
                f"{name}: {', '.join(bench.peers) if name not in ('catalog-scale', 'eviction') else 'condaproxy'}"
            )
            res = ScenarioResult()
            t0 = time.monotonic()
            try:
                RUNNERS[name](bench, res)
            except (SetupError, Timeout):
                raise
            except Exception as exc:
                res.failures.append(f"harness: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
            res.seconds = time.monotonic() - t0
            scenarios[name] = res.to_json()
            for f in res.failures:
                say(f"{name}: FAILED {f}")
    finally:
        if pool is not None:
            pool.close()
        origin.server.stop()
    after = machine.snapshot()
    m = machine.machine(tools)
    n = machine.noise(before, after)
    return {
        "machine": m,
        "noise": n,
        "machine_line": machine.line(m, n),
        "settings": s.__dict__,
        "origin_delay": origin.delay_note,
        "context": context(chan, s),
        "scenarios": scenarios,
        "profile": bench.profile_text,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="condaproxy-bench-"))
    work.chmod(0o755)  # squid drops to its own user and must reach its cache below
    t0 = time.monotonic()
    try:
        with bounded(args.timeout):
            doc = run(args, work)
    except SetupError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    except Timeout as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["seconds"] = time.monotonic() - t0
    text = report.markdown(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(_clean(doc), indent=1, allow_nan=False))
    (args.out / "results.md").write_text(text + "\n")
    if doc["profile"]:
        (args.out / "profile-hit-small.txt").write_text(doc["profile"] + "\n")
    if args.update_readme:
        update_readme(text)
    print(text)
    say(f"done in {doc['seconds']:.0f} s; results in {args.out}")
    failed = any(sc["failures"] for sc in doc["scenarios"].values())
    return 1 if failed else 0


def _clean(value: Any) -> Any:
    """NaN (a metric that could not be measured) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
