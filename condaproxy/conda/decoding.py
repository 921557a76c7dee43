"""Repodata as a stream of JSON bytes, whatever its encoding, with decompression bombs refused.

Synchronous, for executor threads: conda-forge's linux-64 repodata.json is hundreds of MB, so
it is read in steps and never inflated past a budget tied to its compressed size.
"""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import zstandard

from condaproxy.errors import RefusedDocument

STEP = 1 << 20
# Decompression bombs, for every reader of compressed repodata (digest learning, transcoding):
# real repodata inflates about ten-fold (conda-forge's linux-64 .zst: ~30 MB to ~300 MB), so
# anything past MAX_RATIO times its compressed size (MIN_BUDGET for small files) is refused.
MAX_RATIO = 64
MIN_BUDGET = 64 * 1024 * 1024
# Nesting, for every reader of repodata JSON (digest learning, the base_url sniffer): real
# repodata nests five levels (document, "packages", record, "depends", a spec); CEP-48's v3
# groups add one or two. Past this, a reader refuses the document.
MAX_DEPTH = 64


class Bounded:
    """A read-only stream that refuses to deliver more than limit bytes (RefusedDocument)."""

    def __init__(self, inner: IO[bytes], limit: int, what: str, reason: str = "inflated") -> None:
        self._inner = inner
        self.limit = limit
        self.count = 0
        self._what = what
        self._reason = reason

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all that is left, within the limit, when size < 0)."""
        if size < 0:
            parts = []
            while part := self.read(STEP):
                parts.append(part)
            return b"".join(parts)
        data = self._inner.read(min(size, self.limit - self.count + 1))
        self.count += len(data)
        if self.count > self.limit:
            raise RefusedDocument(
                self._reason, f"{self._what} past {self.limit} bytes: refused (decompression bomb?)"
            )
        return data


@contextmanager
def open_decoded(path: Path, filename: str) -> Iterator[IO[bytes]]:
    """Open a repodata file as a stream of JSON bytes, whatever its compression."""
    budget = max(MIN_BUDGET, MAX_RATIO * path.stat().st_size)
    what = f"{filename} inflates"
    if filename.endswith(".zst"):
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield cast(IO[bytes], Bounded(f, budget, what))
    elif filename.endswith(".bz2"):
        with bz2.open(path, "rb") as f:
            yield cast(IO[bytes], Bounded(f, budget, what))
    elif filename.endswith(".gz"):
        with gzip.open(path, "rb") as gz:
            yield cast(IO[bytes], Bounded(cast(IO[bytes], gz), budget, what))
    else:
        with open(path, "rb") as f:
            yield f
