"""What every scenario shares: the settings, the running origin and client pool, results, helpers."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.channel import Channels
from benchmarks.clients import ClientPool, Fetch, Got, fetch_now
from benchmarks.peers import Origin, Running, Tools, ready, start_peer
from benchmarks.procs import MB


@dataclass(frozen=True)
class Settings:
    """Sizes and counts of one benchmark run (full or --quick)."""

    quick: bool
    runs: int  # runs of the cheap scenarios (medians reported)
    heavy_runs: int  # runs of memory and repodata ingest
    wrk_seconds: int
    wrk_threads: int
    connections: int
    client_procs: int
    large_clients: int
    collapse_early: int
    collapse_late: int
    memory_clients: int
    latency_clients: int
    catalog_rows: tuple[int, int]
    evict_units: int
    evict_cap_s: float  # hits are measured at most this long while eviction runs
    upstream_mib: float
    upstream_delay_ms: float
    nginx_workers: int
    condaproxy_workers: int


@dataclass
class PeerResult:
    samples: dict[str, list[float]] = field(default_factory=dict)
    bodies: int = 0
    verified: int = 0


@dataclass
class ScenarioResult:
    peers: dict[str, PeerResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def peer(self, name: str) -> PeerResult:
        return self.peers.setdefault(name, PeerResult())

    def sample(self, peer: str, metric: str, value: float) -> None:
        self.peer(peer).samples.setdefault(metric, []).append(float(value))

    def fail(self, peer: str, message: str) -> None:
        self.failures.append(f"{peer}: {message}")

    def to_json(self) -> dict[str, Any]:
        peers = {}
        for name, p in self.peers.items():
            metrics = {k: statistics.median(v) for k, v in p.samples.items() if v}
            spread = {
                k: (max(v) - min(v)) / abs(metrics[k]) if len(v) > 1 and metrics[k] else 0.0
                for k, v in p.samples.items()
                if v
            }
            peers[name] = {
                "metrics": metrics,
                "samples": p.samples,
                "spread": spread,
                "bodies": p.bodies,
                "bodies_verified": p.verified,
            }
        return {"peers": peers, "notes": self.notes, "failures": self.failures, "seconds": self.seconds}


@dataclass
class Bench:
    """The run's shared state; scenarios receive it."""

    settings: Settings
    tools: Tools
    origin: Origin
    chan: Channels
    pool: ClientPool
    work: Path
    peers: list[str]
    say: Any
    profile: bool = False
    keep: bool = False
    profile_text: str = ""
    _count: int = 0

    def prefix(self, kind: str) -> Path:
        self._count += 1
        return self.work / f"{self._count:03d}-{kind.replace('+', '-')}"

    def start(self, kinds: list[str], **opts: Any) -> list[Running]:
        """Fresh peers with empty caches, started side by side."""
        s = self.settings
        started: list[Running] = []
        try:
            for kind in kinds:
                started.append(
                    start_peer(
                        kind,
                        self.tools,
                        self.origin,
                        self.prefix(kind),
                        nginx_workers=s.nginx_workers,
                        condaproxy_workers=s.condaproxy_workers,
                        **opts,
                    )
                )
            for p in started:
                p.remove = not self.keep
            return [ready(p) for p in started]
        except BaseException:
            for p in started:
                p.stop()
            raise

    def url(self, peer: Running, path: str) -> str:
        return peer.url + "/" + path

    def check(self, res: ScenarioResult, peer: str, got: Got, path: str, *, prefix_ok: bool = False) -> bool:
        """Count a body and check it against the manifest: status 200, size and sha256."""
        want = self.chan.file(path)
        pr = res.peer(peer)
        pr.bodies += 1
        if got.error:
            res.fail(peer, f"{path}: {got.error}")
        elif got.status != 200:
            res.fail(peer, f"{path}: status {got.status}")
        elif got.complete and (got.size != want.size or got.sha256 != want.sha256):
            res.fail(
                peer,
                f"{path}: got {got.size} bytes sha256 {got.sha256[:12]}, want {want.size} {want.sha256[:12]}",
            )
        elif not got.complete and not prefix_ok:
            res.fail(peer, f"{path}: body cut short at {got.size} bytes")
        else:
            pr.verified += 1
            return True
        return False

    def warm(self, res: ScenarioResult, peer: Running, paths: list[str], timeout: float = 60.0) -> bool:
        """GET each path (checked) until the peer answers it from its cache (X-Cache HIT)."""
        pending = list(paths)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            gots = fetch_now([Fetch(self.url(peer, p), now) for p in pending])
            still = []
            for path, got in zip(pending, gots, strict=True):
                if not self.check(res, peer.kind, got, path):
                    return False
                if not got.xcache.upper().startswith("HIT"):
                    still.append(path)
            pending = still
            if pending:
                time.sleep(0.05)
        if pending:
            res.fail(peer.kind, f"{len(pending)} files never became cache hits, e.g. {pending[0]}")
            return False
        return True

    def origin_offset(self) -> int:
        return self.origin.access.stat().st_size

    def origin_lines(self, offset: int, who: str, path: str | None = None) -> list[dict[str, Any]]:
        """Requests the origin logged since offset from one peer (told apart by port)."""
        port = str(self.origin.ports[who])
        with open(self.origin.access, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        lines = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 6 or parts[0] != port:
                continue
            if path is not None and parts[2].split("?")[0] != "/" + path:
                continue
            lines.append(
                {
                    "method": parts[1],
                    "uri": parts[2],
                    "status": int(parts[3]),
                    "bytes": int(parts[4]),
                    "seconds": float(parts[5]),
                }
            )
        return lines

    def wait_origin(self, offset: int, who: str, path: str, timeout: float = 600.0) -> list[dict[str, Any]]:
        """The origin's lines for path (a request is logged when it ends): waits for at least one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [ln for ln in self.origin_lines(offset, who, path) if ln["method"] == "GET"]
            if lines:
                return lines
            time.sleep(0.05)
        return []


def turns(peers: list[str], run: int) -> Iterator[str]:
    """The peers in an order that flips every run, so a drifting machine disturbs all alike."""
    yield from (peers if run % 2 == 0 else reversed(peers))


def prefix_digests(path: Path, sizes: set[int]) -> dict[int, str]:
    """sha256 of each prefix of the file (one pass): to check bodies cut short on purpose."""
    want = sorted(sizes)
    out: dict[int, str] = {}
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for cut in want:
            while done < cut:
                chunk = f.read(min(4 * MB, cut - done))
                if not chunk:
                    break
                h.update(chunk)
                done += len(chunk)
            out[cut] = h.hexdigest()
    return out


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]
