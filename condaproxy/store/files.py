"""File functions shared by the stores, the download task and the streamer: blocking ones (run
them in an executor), and opened(), which runs an open in the executor without leaking it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

STEP = 1 << 20
T = TypeVar("T")


async def opened(open_: Callable[[], T], close: Callable[[T], object]) -> T:
    """open_() run in the executor; if the caller is cancelled meanwhile, close() what it opens.

    Cancelling an await does not stop the thread: what it opens after that reaches nobody.
    """
    opening = asyncio.get_running_loop().run_in_executor(None, open_)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(lambda done: _close_unclaimed(done, close))
        raise


def _close_unclaimed(done: asyncio.Future[T], close: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        close(done.result())


def open_fd(path: Path, flags: int, mode: int = 0o644) -> Callable[[], int]:
    """os.open(path, flags, mode), to be run by opened()."""
    return lambda: os.open(path, flags, mode)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in steps."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(STEP):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a name just linked or renamed into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_all(paths: list[Path]) -> None:
    """Remove files; those already gone are no error."""
    for path in paths:
        path.unlink(missing_ok=True)
