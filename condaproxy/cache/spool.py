"""The download's temp file: bytes written and hashed as they arrive, and a relay when the disk refuses.

When the cache disk refuses a write (full, over quota), the download goes on as a relay for the
readers attached now: bytes from there on live only as the newest chunk in memory, so the
download paces itself to its readers, new readers are refused, and nothing is persisted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from condaproxy.cache.inflight import Download
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import CacheDiskError
from condaproxy.metrics import Metrics
from condaproxy.store.files import open_fd, opened, write_all

log = logging.getLogger(__name__)


def _write_and_hash(fd: int, chunk: bytes, hasher: hashlib._Hash) -> None:
    # One executor hop per chunk: both the write and the hash release the GIL.
    write_all(fd, chunk)
    hasher.update(chunk)


class Spool:
    """Writes a download's body to its file and hashes it; owns the file descriptor."""

    def __init__(self, dl: Download, metrics: Metrics) -> None:
        self._dl = dl
        self._metrics = metrics
        self._fd: int | None = None
        self._hasher = hashlib.sha256()
        self.written = 0

    async def open(self, path: Path) -> None:
        """Create the file (it must not exist); CacheDiskError when the disk refuses."""
        try:
            self._fd = await opened(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), os.close)
        except OSError as exc:
            raise self._disk_refused(exc, 0) from exc

    @property
    def spooling(self) -> bool:
        """Whether bytes still go to the file (False once the disk refused one)."""
        return self._fd is not None

    async def write(self, chunk: bytes, buffered: bool) -> None:
        """Write and hash chunk; past a refused write, only hash it (buffered: fail instead)."""
        loop = asyncio.get_running_loop()
        if self._fd is not None:
            try:
                await loop.run_in_executor(None, _write_and_hash, self._fd, chunk, self._hasher)
            except OSError as exc:
                fd, self._fd = self._fd, None
                await loop.run_in_executor(None, os.close, fd)
                self._unspool(exc, buffered)
        if self._fd is None:
            await loop.run_in_executor(None, self._hasher.update, chunk)
        self.written += len(chunk)

    def hexdigest(self) -> str:
        """The sha256 of every byte written so far."""
        return self._hasher.hexdigest()

    async def close(self) -> None:
        """Close the file if it is still open; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.get_running_loop().run_in_executor(None, os.close, fd)

    def _disk_refused(self, exc: OSError, offset: int) -> CacheDiskError:
        dl = self._dl
        self._metrics.spool_failures.inc()
        reason = exc.strerror or type(exc).__name__
        log.error(
            "cache disk refused %s at byte %d (%s): relaying to %d attached clients, not caching",
            dl.key,
            offset,
            reason,
            dl.subscribers,
        )
        return CacheDiskError(f"cache disk refused the download ({reason}); retry shortly")

    def _unspool(self, exc: OSError, buffered: bool) -> None:
        """The temp file cannot grow (ENOSPC...): go on as a relay for the readers attached now."""
        error = self._disk_refused(exc, self.written)
        if buffered:
            raise error  # a shard index is rewritten from the whole file: nothing to relay
        self._dl.stop_spooling(error)

    async def pace(self, channel: ChannelConfig) -> None:
        """Wait until every attached reader sent the chunk in memory (a relay has no file)."""
        # Bounded memory: the next chunk replaces the one in memory only once every attached
        # reader has sent it. A reader too slow for read_timeout is left behind: lacking bytes
        # later, its response is aborted (never ended cleanly).
        try:
            await asyncio.wait_for(self._dl.readers_caught_up(), channel.read_timeout)
        except TimeoutError:
            log.warning("%s: a reader fell behind the unspooled download; it will be cut off", self._dl.key)
