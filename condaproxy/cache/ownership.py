"""Whether a proxy is serving a cache directory: `serve` holds a shared flock on <cache>/serve.lock
for as long as it runs (the kernel drops it when the process dies, however it dies), so the
commands that change the cache know to go through the running proxy instead."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "serve.lock"


class ServeLock:
    """The running proxy's hold on its cache directory."""

    def __init__(self, directory: Path) -> None:
        self._fd: int | None = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # Shared: several proxies on one directory were never refused, and are not now.
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        """Let go; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def served(directory: Path) -> bool:
    """Whether a proxy holds the directory now (blocking, briefly: call it off the loop)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False
