"""wrk, the load generator for small hits: requests/s and latency percentiles from its `done` hook.

wrk (C, epoll) saturates nginx where a Python client cannot. Its Lua `done` hook prints the
summary and the latency distribution's percentiles as one JSON line. wrk does not keep bodies,
so what it can check is checked: every answer a 2xx, and the bytes per response at least the
body's size; the bodies themselves are checked (sha256) by aiohttp before and after.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

MARK = "WRKJSON "

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""

# Several paths: each thread walks the list from its own offset (request() costs a Lua call
# per request, so a single path is sent without it).
_ROTATE = r"""
local paths = {}
local n = 0
local counter = 0
init = function(args)
  for _, p in ipairs(args) do n = n + 1; paths[n] = p end
  counter = math.random(n)
end
request = function()
  counter = counter % n + 1
  return wrk.format("GET", paths[counter])
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int  # connect, read, write and timeout errors
    non2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_request(self) -> float:
        return self.bytes / self.requests if self.requests else 0.0


def script(work: Path, rotate: bool) -> Path:
    path = work / ("wrk-rotate.lua" if rotate else "wrk-done.lua")
    if not path.exists():
        path.write_text((_ROTATE if rotate else "") + _DONE)
    return path


def run(
    wrk: str,
    base: str,
    paths: list[str],
    work: Path,
    *,
    threads: int,
    connections: int,
    seconds: int,
) -> WrkResult:
    """wrk against base+paths[0] (or rotating over every path) for `seconds`."""
    rotate = len(paths) > 1
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script(work, rotate)),
        base + paths[0],
    ]
    if rotate:
        argv += ["--", *paths]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    d = json.loads(line[len(MARK) :])
    return WrkResult(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        bytes=d["bytes"],
        errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
        non2xx=d["status"],
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
    )
