"""py-spy on a running condaproxy: sample it during a load, then the top functions as text."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

TOP = 25


def start(pyspy: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy record of pid (and its child processes: workers) for seconds, as raw stacks."""
    argv = [
        pyspy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "250",
        "--format",
        "raw",
        "--nolineno",
        "--subprocesses",
        "--gil",  # only samples holding the GIL: parked executor threads are not work
        "--output",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frames(stack: str) -> list[str]:
    frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
    # "handle (condaproxy/http/handlers.py)" reads well as it is; drop long site-packages paths.
    return [f.replace("site-packages/", "") for f in frames]


def top_text(raw: Path, title: str, top: int = TOP) -> str:
    """The functions with the most samples: own (on top of the stack) and total (anywhere in it)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return f"{title}: no samples (py-spy saw no busy Python thread)"
    lines = [f"{title}: {samples} samples of busy threads", "", "  own%  total%  function (file)"]
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / samples:6.1f} {100 * total[name] / samples:7.1f}  {name}")
    lines += ["", "  by total (inclusive):", "total%   own%  function (file)"]
    for name, n in total.most_common(top):
        lines.append(f"{100 * n / samples:6.1f} {100 * own[name] / samples:6.1f}  {name}")
    return "\n".join(lines)
