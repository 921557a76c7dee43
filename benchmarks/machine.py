"""The machine line and the noise record: what ran where, and how busy the machine was meanwhile."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.peers import REPO, Tools
from benchmarks.procs import tool_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def machine(tools: Tools) -> dict[str, Any]:
    squid = tool_version([tools.squid, "-v"]) if tools.squid else "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gb": round(_mem_gb(), 1),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": tool_version([tools.nginx, "-v"]).replace("nginx version: ", ""),
        "squid": squid.replace("Squid Cache: Version ", "squid/"),
        "wrk": tool_version([tools.wrk, "-v"]).split(" [")[0],
        "condaproxy_commit": _commit(),
    }


def snapshot() -> dict[str, Any]:
    """Load averages and CPU time counters, for the noise record."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    return {"loadavg": list(os.getloadavg()), "ticks": ticks}


def noise(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How busy the machine was: load averages before and after, and CPU shares over the run."""
    delta = [a - b for a, b in zip(after["ticks"], before["ticks"], strict=False)]
    total = sum(delta) or 1
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
    steal = delta[7] if len(delta) > 7 else 0
    return {
        "loadavg_before": before["loadavg"],
        "loadavg_after": after["loadavg"],
        "cpu_busy_pct": round(100 * (total - idle) / total, 1),
        "steal_pct": round(100 * steal / total, 2),
    }


def line(m: dict[str, Any], n: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']:g} GB, Linux {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}; {m['nginx']}, {m['squid']}, {m['wrk']}; condaproxy {m['condaproxy_commit']}; "
        f"{m['date']}. Noise: load average {n['loadavg_before'][0]:.2f} before, "
        f"{n['loadavg_after'][0]:.2f} after (1 min), CPU busy {n['cpu_busy_pct']:g} % over the run "
        f"(the benchmark's own load included), steal {n['steal_pct']:g} %"
    )
