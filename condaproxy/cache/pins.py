"""Pins set at run time (admin API, `condaproxy prefetch --pin`), kept across restarts.

They live beside the catalog in `pins.txt`, one pattern a line (the same forms as [cache] pin:
a file name, a glob, or a bare package name), written whole to a temporary file and renamed.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path

from condaproxy.cache.evict import Evictor, Pins

FILE = "pins.txt"
# The [cache] pin syntax: package file names, globs over them, or bare package names.
PATTERN = re.compile(r"[A-Za-z0-9_+!*?\[\]][A-Za-z0-9._+!*?\[\]-]{0,254}")


def _read(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if PATTERN.fullmatch(line.strip())]


def _write(path: Path, patterns: list[str]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in patterns))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


class RuntimePins:
    """The admin-set pins: a sorted set of patterns mirrored into the evictor."""

    def __init__(self, directory: Path, evictor: Evictor) -> None:
        self._path = directory / FILE
        self._evictor = evictor
        self._patterns: list[str] = []
        self._lock = asyncio.Lock()

    @property
    def patterns(self) -> list[str]:
        """The pins, sorted."""
        return list(self._patterns)

    async def load(self) -> None:
        """Read the pins kept by an earlier run."""
        loop = asyncio.get_running_loop()
        self._set(await loop.run_in_executor(None, _read, self._path))

    async def change(self, add: Sequence[str] = (), remove: Sequence[str] = ()) -> tuple[int, int]:
        """Add and remove patterns (each checked against PATTERN); returns (added, removed)."""
        bad = [p for p in [*add, *remove] if not PATTERN.fullmatch(p)]
        if bad:
            raise ValueError(f"not a package file name, glob or name: {bad[0][:100]!r}")
        async with self._lock:
            before = set(self._patterns)
            after = (before | set(add)) - set(remove)
            if after != before:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _write, self._path, sorted(after))
                self._set(sorted(after))
            return len(after - before), len(before - after)

    def _set(self, patterns: list[str]) -> None:
        self._patterns = sorted(set(patterns))
        exact = frozenset(p for p in self._patterns if p.endswith((".conda", ".tar.bz2")) and "*" not in p)
        self._evictor.extra_pins = Pins(tuple(p for p in self._patterns if p not in exact), exact)
