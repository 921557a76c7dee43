"""Blocking file helpers shared by the stores and the download task (run them in an executor)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STEP = 1 << 20


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
