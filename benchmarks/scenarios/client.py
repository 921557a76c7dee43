"""A real client: py-rattler solves and installs bench-app (and its closure) through each peer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from benchmarks.bench import Bench, ScenarioResult, turns
from benchmarks.channel import BENCH
from benchmarks.peers import REPO, Running


def _install(b: Bench, res: ScenarioResult, peer: Running, label: str) -> float | None:
    work = b.prefix(f"client-{label}")
    work.mkdir(parents=True)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.rattler_client", f"{peer.url}/{BENCH}", str(work)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        res.fail(peer.kind, f"{label} install failed ({out.returncode}): {out.stderr[-800:]}")
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    installed: dict[str, str] = result["installed"]
    pr = res.peer(peer.kind)
    for subdir_fn, sha in installed.items():
        pr.bodies += 1
        path = f"{BENCH}/{subdir_fn}"
        if path in b.chan.files and b.chan.file(path).sha256 == sha:
            pr.verified += 1
        else:
            res.fail(peer.kind, f"{label}: installed {subdir_fn} with sha256 {sha[:12]}, not the channel's")
    want = b.chan.size.closure + 1
    if len(installed) != want:
        res.fail(peer.kind, f"{label}: installed {len(installed)} packages, expected {want}")
    res.sample(peer.kind, "packages", len(installed))
    return float(result["seconds"])


def client(b: Bench, res: ScenarioResult) -> None:
    s = b.settings
    res.notes.append(
        f"py-rattler (sharded repodata) solves bench-app and installs its {b.chan.size.closure + 1} packages "
        "in a fresh client cache and prefix; cold: a fresh peer; warm: the same peer again; rattler checks "
        "each package's sha256, and the harness the sha256 it recorded"
    )
    for run in range(s.runs):
        for kind in turns(b.peers, run):
            [peer] = b.start([kind])
            try:
                for label in ("cold", "warm"):
                    seconds = _install(b, res, peer, label)
                    if seconds is not None:
                        res.sample(kind, f"{label}_s", seconds)
            finally:
                peer.stop()
