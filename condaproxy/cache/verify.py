"""`condaproxy verify`: re-hash every stored blob against the catalog; purge what does not match.

A blob is named by its sha256 and every catalog row records its size, so the store checks
itself: a blob that is missing, has another size than its rows say, or hashes to another name
is damaged (a flipped bit, a truncated copy, a restore gone wrong). Its rows are dropped first,
then the blob, so the next GET fetches the unit again; a crash between the two leaves only an
unreferenced blob, which the next start of the proxy sweeps.

This runs synchronously: it is a command-line tool (and the periodic scrub calls check_blob
from an executor thread).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from condaproxy.cache.catalog.db import BUSY_TIMEOUT_MS, WRITE_TRANSACTIONS
from condaproxy.store.blobstore import check_key

_STEP = 1 << 20


def check_blob(path: Path, key: str, sizes: set[int]) -> str | None:
    """Why the blob at path does not hold what its rows say (None when it does)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "blob missing"
    if sizes != {size}:
        return f"blob is {size} bytes, catalog says {', '.join(map(str, sorted(sizes)))}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_STEP):
            digest.update(chunk)
    if digest.hexdigest() != key:
        return f"content hashes to {digest.hexdigest()[:12]}…, not its name"
    return None


@dataclass
class Report:
    """What a verification found and did."""

    units: int = 0
    blobs: int = 0
    bytes: int = 0
    purged_units: list[str] = field(default_factory=list)
    purged_blobs: int = 0
    unreferenced: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the operator."""
        line = (
            f"verified {self.blobs} blobs ({self.bytes} bytes) of {self.units} units"
            f" in {self.seconds:.1f} s: "
        )
        if self.purged_units:
            line += f"purged {self.purged_blobs} damaged blobs ({len(self.purged_units)} units)"
        else:
            line += "all intact"
        if self.unreferenced:
            line += f"; {len(self.unreferenced)} unreferenced blobs (the next start removes them)"
        return line


def _blob_path(blobs: Path, key: str) -> Path | None:
    try:
        return blobs / key[:2] / check_key(key)
    except ValueError:
        return None


def verify(cache_dir: Path, say: Callable[[str], None] = print) -> Report:
    """Check every blob of the cache at cache_dir; drop damaged ones and their rows."""
    started = time.monotonic()
    report = Report()
    db_path = cache_dir / "catalog.sqlite3"
    if not db_path.exists():
        say(f"{cache_dir}: no catalog, nothing to verify")
        return report
    blobs = cache_dir / "blobs"
    # mode=rw: never create a catalog where there was none (a mistyped directory).
    db = sqlite3.connect(
        f"file:{db_path}?mode=rw",
        uri=True,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=WRITE_TRANSACTIONS,
    )
    try:
        rows = db.execute("SELECT channel, subdir, filename, blob_key, sha256, size FROM units").fetchall()
        by_blob: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for channel, subdir, filename, blob_key, sha, size in rows:
            name = f"{channel}/{subdir}/{filename}" if subdir else f"{channel}/{filename}"
            by_blob[blob_key].append((name, sha, size))
        report.units = len(rows)
        for blob_key, units in sorted(by_blob.items()):
            report.blobs += 1
            for name, sha, _ in units:
                if sha != blob_key:  # the row lies about its blob, whatever the blob holds
                    with db:
                        db.execute("DELETE FROM units WHERE sha256=? AND blob_key=?", (sha, blob_key))
                    report.purged_units.append(name)
                    say(f"purged {name}: its sha256 differs from its blob's name")
            units = [u for u in units if u[1] == blob_key]
            if not units:
                continue
            path = _blob_path(blobs, blob_key)
            problem = "catalog row names no valid blob" if path is None else None
            if path is not None:
                problem = check_blob(path, blob_key, {s for _, _, s in units})
            if problem is None:
                report.bytes += units[0][2]
                continue
            # Rows first, then the blob: "complete or invisible" holds at every step.
            with db:
                db.execute("DELETE FROM units WHERE blob_key=?", (blob_key,))
            if path is not None:
                path.unlink(missing_ok=True)
            report.purged_blobs += 1
            for name, _, _ in units:
                report.purged_units.append(name)
                say(f"purged {name}: {problem}")
        pending = {r[0] for r in db.execute("SELECT blob_key FROM pending")}
    finally:
        db.close()
    stored = [p.name for p in blobs.glob("??/*")] if blobs.is_dir() else []
    report.unreferenced = sorted(set(stored) - set(by_blob) - pending)
    for name in report.unreferenced:
        say(f"unreferenced: {name}")
    report.seconds = time.monotonic() - started
    say(report.summary())
    return report
