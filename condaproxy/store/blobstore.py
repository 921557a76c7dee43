"""The blob store interface: verified unit bytes keyed by their sha256 (content-addressed)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from condaproxy.store.files import write_all

_KEY = re.compile(r"[0-9a-f]{64}")


def check_key(key: str) -> str:
    """Return key if it is a lowercase sha256 hex digest; blob keys are nothing else."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


class BlobStore(Protocol):
    """Durable, content-addressed storage of complete, verified units.

    A shared store (S3) is used by several nodes at once: a blob there may be relied on by
    another node's catalog, so a node never deletes one; delete() drops only its local copy.
    """

    # True when other nodes may use the same blobs (S3): nothing this node does removes them.
    shared: bool

    async def put(self, key: str, src: Path) -> None:
        """Durably store the bytes of src under key; src stays where it is."""

    async def delete(self, key: str) -> None:
        """Remove the blob from this node; a missing blob is not an error.

        The filesystem store deletes the file; a shared store keeps the object (other nodes
        may use it) and drops only this node's local copy, if it has one.
        """

    async def size(self, key: str) -> int | None:
        """The stored size, or None when the blob is missing."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding the blob (for sendfile), or None when there is none on this node."""

    def keep_local(self, key: str, size: int) -> None:
        """A hit was served from afar: keep a local copy for the next one (no-op for local stores)."""

    async def presign(self, key: str, ttl: int) -> str | None:
        """A URL a client may GET the blob from for ttl seconds, or None (local stores)."""

    def read(
        self, key: str, offset: int, count: int, *, size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream count bytes of the blob from offset.

        size, when given, is the blob's whole size as its row says: a blob of another size
        raises BlobDamaged (before the first chunk, where the store can tell).
        """

    def keys(self) -> AsyncIterator[str]:
        """Every key in the store (for sweeps and verification)."""

    async def remove_partials(self) -> list[str]:
        """Delete half-made local copies a crash left (run at startup, before any put)."""

    async def close(self) -> None:
        """Release clients and connections."""


@asynccontextmanager
async def local_copy(store: BlobStore, key: str, size: int, temp_dir: Path) -> AsyncIterator[Path]:
    """A local file with a blob's bytes: the blob itself, or a temporary copy for remote stores."""
    local = store.local_path(key)
    if local is not None:
        yield local
        return
    loop = asyncio.get_running_loop()
    fd, name = await loop.run_in_executor(None, lambda: tempfile.mkstemp(dir=temp_dir))
    try:
        async for chunk in store.read(key, 0, size):
            await loop.run_in_executor(None, write_all, fd, chunk)
        yield Path(name)
    finally:
        os.close(fd)
        os.unlink(name)
