"""A short run of benchmarks/soak.py: mixed load with injected aborts, then the invariants.

CONDAPROXY_SOAK_SECONDS sets the length (default 25 s; the benchmark itself defaults to 10 min).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from channel import Channel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import soak

SOAK_SECONDS = float(os.environ.get("CONDAPROXY_SOAK_SECONDS", "25"))


async def test_short_soak_serves_no_bad_body_and_keeps_the_invariants(
    channel: Channel, tmp_path: Path
) -> None:
    lines: list[str] = []
    result = await soak.soak(SOAK_SECONDS, tmp_path, channel=channel, say=lines.append)
    report = result.report()
    print(report)
    assert result.bad_bodies == [], report
    assert result.errors == [], report
    assert result.install_failures == [] and result.installs >= 2, report
    assert result.invariants == "ok", report
    assert sum(result.requests.values()) > 500 and result.injected > 0 and result.cold_channels > 1, report
    # A short run cannot show a leak; it can show descriptors piling up.
    assert result.fds[-1] - result.fds[0] < 50, report
