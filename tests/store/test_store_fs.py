"""store.filesystem: the content-addressed, crash-safe blob store on a local file system."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import cast

import pytest

from condaproxy.store.blobstore import check_key
from condaproxy.store.files import opened
from condaproxy.store.filesystem import CHUNK, FilesystemStore


def blob(tmp_path: Path, data: bytes, name: str = "src.part") -> tuple[str, Path]:
    path = tmp_path / name
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "blobs")


async def read_all(store: FilesystemStore, key: str, offset: int, count: int) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, offset, count)])


async def all_keys(store: FilesystemStore) -> set[str]:
    keys = store.keys()
    return {k async for k in keys}


def test_root_is_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "blobs"
    FilesystemStore(root)
    assert root.is_dir()


async def test_put_is_content_addressed(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"hello conda")
    await store.put(key, src)
    path = store.local_path(key)
    assert path == store.root / key[:2] / key
    assert path.read_bytes() == b"hello conda"
    assert await store.size(key) == len(b"hello conda")


async def test_src_stays_valid_after_put(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"streaming readers still use me")
    await store.put(key, src)
    assert src.read_bytes() == b"streaming readers still use me"
    final = store.local_path(key)
    assert final is not None
    # Same file system: a hard link, so no copy was made.
    assert os.path.samefile(src, final)
    # The temp file going away (the lock table unlinks it) leaves the blob intact.
    src.unlink()
    assert final.read_bytes() == b"streaming readers still use me"


async def test_put_the_same_key_twice(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"same bytes")
    await store.put(key, src)
    _, again = blob(tmp_path, b"same bytes", "again.part")
    await store.put(key, again)
    await store.put(key, src)  # even the very same source
    assert store.local_path(key).read_bytes() == b"same bytes"  # type: ignore[union-attr]
    assert await all_keys(store) == {key}


async def test_put_replaces_a_truncated_blob_of_the_same_key(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"the whole blob, every byte")
    await store.put(key, src)
    damaged = store.local_path(key)
    assert damaged is not None
    src.unlink()  # a separate inode from now on, so the damage stays in the store's copy
    damaged.write_bytes(b"the whole")  # truncated on disk
    _, fresh = blob(tmp_path, b"the whole blob, every byte", "fresh.part")
    await store.put(key, fresh)
    assert damaged.read_bytes() == b"the whole blob, every byte"
    assert await all_keys(store) == {key}
    assert [p.name for p in damaged.parent.iterdir()] == [key]  # no temporary name left


async def test_put_leaves_no_temporary_files(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"x" * 1000)
    await store.put(key, src)
    entries = [p for p in store.root.rglob("*") if p.is_file()]
    assert entries == [store.root / key[:2] / key]


async def test_delete(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"to be evicted")
    await store.put(key, src)
    await store.delete(key)
    assert await store.size(key) is None
    assert await all_keys(store) == set()
    assert src.read_bytes() == b"to be evicted"  # the source is not the store's


async def test_delete_missing_is_fine(store: FilesystemStore) -> None:
    await store.delete("0" * 64)
    await store.delete("0" * 64)


async def test_size_of_missing_is_none(store: FilesystemStore) -> None:
    assert await store.size("1" * 64) is None


async def test_empty_blob(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"")
    await store.put(key, src)
    assert await store.size(key) == 0
    assert await read_all(store, key, 0, 0) == b""


@pytest.mark.parametrize(
    ("offset", "count"),
    [
        (0, 0),
        (0, 1),
        (0, 10),
        (3, 4),
        (0, CHUNK),
        (0, CHUNK + 1),
        (CHUNK - 1, 2),
        (CHUNK, CHUNK),
        (1, 3 * CHUNK - 1),
        (3 * CHUNK - 5, 5),
        (0, 3 * CHUNK),
    ],
)
async def test_read_windows(store: FilesystemStore, tmp_path: Path, offset: int, count: int) -> None:
    data = os.urandom(3 * CHUNK)
    key, src = blob(tmp_path, data)
    await store.put(key, src)
    chunks = [c async for c in store.read(key, offset, count)]
    assert b"".join(chunks) == data[offset : offset + count]
    assert all(0 < len(c) <= CHUNK for c in chunks)


async def test_read_past_the_end_raises(store: FilesystemStore, tmp_path: Path) -> None:
    key, src = blob(tmp_path, b"short")
    await store.put(key, src)
    with pytest.raises(EOFError):
        await read_all(store, key, 0, 6)
    with pytest.raises(EOFError):
        await read_all(store, key, 5, 1)


async def test_read_missing_raises(store: FilesystemStore) -> None:
    with pytest.raises(FileNotFoundError):
        await read_all(store, "2" * 64, 0, 1)


async def test_read_closes_its_file_when_abandoned(store: FilesystemStore, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    key, src = blob(tmp_path, data)
    await store.put(key, src)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(20):
        gen = cast(AsyncGenerator[bytes, None], store.read(key, 0, len(data)))
        assert len(await anext(gen)) == CHUNK
        await gen.aclose()  # a client went away mid-body
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before


async def test_keys(store: FilesystemStore, tmp_path: Path) -> None:
    expected = set()
    for i in range(5):
        key, src = blob(tmp_path, f"blob {i}".encode(), f"{i}.part")
        await store.put(key, src)
        expected.add(key)
    # A stray temporary file from an interrupted copy is not a key.
    some = next(iter(expected))
    (store.root / some[:2] / f".{some}.123.tmp").write_bytes(b"partial")
    assert await all_keys(store) == expected


async def test_keys_of_an_empty_store(store: FilesystemStore) -> None:
    assert await all_keys(store) == set()


async def test_close(store: FilesystemStore) -> None:
    await store.close()


GOOD = "0123456789abcdef" * 4
BAD_KEYS = [
    "",
    "abc",
    GOOD.upper(),
    GOOD[:-1] + "A",
    GOOD[:-1],
    GOOD + "0",
    GOOD[:-1] + "g",
    "../" + GOOD[3:],
    "..",
    "../../etc/passwd",
    "/" + GOOD[1:],
    GOOD[:2] + "/" + GOOD[3:],
    GOOD[:-1] + "\x00",
    GOOD[:-1] + "\n",
    GOOD + "\n",
    " " + GOOD[1:],
    "0x" + GOOD[2:],
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_refuses(key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        check_key(key)


def test_check_key_accepts_lowercase_sha256() -> None:
    assert check_key(GOOD) == GOOD
    digest = hashlib.sha256(b"x").hexdigest()
    assert check_key(digest) == digest


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_store_operations_refuse_bad_keys(store: FilesystemStore, tmp_path: Path, key: str) -> None:
    src = tmp_path / "src.part"
    src.write_bytes(b"x")
    with pytest.raises(ValueError):
        await store.put(key, src)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        await store.size(key)
    with pytest.raises(ValueError):
        store.local_path(key)
    with pytest.raises(ValueError):
        await read_all(store, key, 0, 1)
    # Nothing was created anywhere, inside or outside the store.
    assert [p for p in store.root.rglob("*")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "src.part"]


def descriptors_on(path: Path) -> int:
    """How many of this process's file descriptors refer to path."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return count


async def test_a_read_cancelled_while_its_open_runs_closes_the_descriptor(
    store: FilesystemStore, tmp_path: Path
) -> None:
    """The executor's open finishes after its reader was cancelled: the descriptor must not leak."""
    key = "ab" * 32
    path = store.local_path(key)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)  # opening it for reading blocks (in the executor) until a writer comes
    reader = store.read(key, 0, 10)
    first = asyncio.ensure_future(anext(reader))
    # A writer's non-blocking open succeeds only once the reader's open is under way.
    writer = None
    deadline = time.monotonic() + 10
    while writer is None:
        try:
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline
            await asyncio.sleep(0.01)
    # In the same step, before the loop hears of the finished open: the reader gives up.
    first.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await first
        await reader.aclose()
        # Once the reader's descriptor is closed, the pipe has no reader left: writing fails.
        deadline = time.monotonic() + 10
        while True:
            try:
                os.write(writer, b"x")
            except BrokenPipeError:
                break
            assert time.monotonic() < deadline, "the reader's descriptor leaked"
            await asyncio.sleep(0.01)
        assert descriptors_on(path) == 1  # the writer's own
    finally:
        os.close(writer)


async def test_opened_closes_what_a_cancelled_caller_would_have_got() -> None:
    started, go = threading.Event(), threading.Event()
    closed: list[str] = []
    handed_back = asyncio.Event()

    def slow_open() -> str:
        started.set()
        go.wait(10)
        return "descriptor"

    def close(thing: str) -> None:
        closed.append(thing)
        handed_back.set()

    waiter = asyncio.ensure_future(opened(slow_open, close))
    await asyncio.to_thread(started.wait, 10)  # the open runs in its thread
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not closed
    go.set()
    await asyncio.wait_for(handed_back.wait(), 10)
    assert closed == ["descriptor"]
    # Not cancelled: the caller gets it, and nothing is closed behind its back.
    assert await opened(lambda: "mine", close) == "mine" and closed == ["descriptor"]
