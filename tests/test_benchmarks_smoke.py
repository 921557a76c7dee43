"""The benchmark harness, run small (`python -m benchmarks --quick --profile`), so that it cannot rot.

It checks what a run must produce - every scenario with numbers, every body a client received
checked against the channel's sha256 and found right, a profile - and never how fast anything
was. Outside CI a machine without nginx, squid or wrk skips it; under CI=true it fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.peers import ECHO_MODULE  # noqa: E402
from benchmarks.procs import find_tool  # noqa: E402
from benchmarks.report import METRICS, SCENARIOS  # noqa: E402


def _missing() -> list[str]:
    missing = [tool for tool in ("nginx", "squid", "wrk") if find_tool(tool) is None]
    if not ECHO_MODULE.exists():
        missing.append(f"nginx's echo module ({ECHO_MODULE})")
    if not Path(sys.executable).with_name("py-spy").exists():
        missing.append("py-spy")
    return missing


@pytest.mark.timeout(900)
def test_quick_benchmark_measures_every_scenario_and_checks_every_body(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        message = f"the benchmark needs {', '.join(missing)} (see .ci/run)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "results"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks", "--quick", "--profile", "--timeout", "800"),
            *("--out", str(out), "--cache-dir", str(tmp_path / "channels")),  # built here: ~3 s
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name, scenario in doc["scenarios"].items():
        assert scenario["failures"] == [], name
        keys = {m.key for m in METRICS[name]}
        measured = {
            key
            for peer in scenario["peers"].values()
            for key, value in peer["metrics"].items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        assert measured & keys, f"{name} measured none of {sorted(keys)}"
        for peer, data in scenario["peers"].items():
            assert data["bodies"] > 0, f"{name}: {peer} received no body"
            assert data["bodies_verified"] == data["bodies"], f"{name}: {peer}"
    assert "hit-small" in doc["profile"] and "samples" in doc["profile"]
    text = (out / "results.md").read_text()
    assert text.count("| metric |") == len(SCENARIOS)
    assert doc["machine"]["cores"] and doc["noise"]["loadavg_before"]
