"""inflight: the Download state machine and the lock table that owns download tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from condaproxy.cache.inflight import Download, Head, InflightTable, State
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.errors import CondaproxyError, IntegrityError, UpstreamNotFound, UpstreamUnavailable

KEY = UnitKey("conda-forge", "noarch", "x-1-0.conda", Kind.PACKAGE)
OTHER = UnitKey("conda-forge", "noarch", "y-1-0.conda", Kind.PACKAGE)
HEAD = Head({"Content-Type": "application/octet-stream"}, 10)
SHA = "0" * 64


def make(tmp_path: Path) -> Download:
    return Download(KEY, tmp_path / "x.part")


def state(dl: Download) -> State:
    """The current state (a call, so type checkers do not narrow it across transitions)."""
    return dl.state


async def settle() -> None:
    """Let every ready task run a few steps."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- Download state machine ------------------------------------------------------------------


def test_initial_state_and_repr(tmp_path: Path) -> None:
    dl = make(tmp_path)
    assert dl.state is State.CONNECTING
    assert dl.published == 0 and dl.head is None and dl.error is None and not dl.complete
    r = repr(dl)
    assert "conda-forge/noarch/x-1-0.conda" in r and "connecting" in r and "published=0" in r


def test_happy_path(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    assert dl.state is State.STREAMING and dl.head == HEAD
    dl.publish(4, b"abcd", 4)
    assert dl.published == 4
    dl.publish(10, b"efghij", 8)  # writer holds back a tail until verified
    assert dl.published == 8
    dl.finish(10, SHA)
    assert state(dl) is State.DONE and dl.complete
    assert dl.published == 10 and dl.sha256 == SHA
    assert "done" in repr(dl) and "published=10" in repr(dl)


def test_publish_never_moves_backwards(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(6, b"abcdef", 6)
    dl.publish(6, b"", 3)
    assert dl.published == 6


@pytest.mark.parametrize(
    "steps",
    [
        ("finish",),  # CONNECTING -> DONE
        ("start_body", "start_body"),
        ("start_body", "not_modified"),
        ("not_modified", "start_body"),
        ("not_modified", "not_modified"),
        ("not_modified", "finish"),
        ("start_body", "finish", "finish"),
        ("start_body", "finish", "start_body"),
        ("fail", "start_body"),
        ("fail", "not_modified"),
        ("fail", "finish"),
        ("start_body", "fail", "finish"),
    ],
)
def test_illegal_transitions_raise(tmp_path: Path, steps: tuple[str, ...]) -> None:
    dl = make(tmp_path)
    actions: dict[str, Callable[[], None]] = {
        "start_body": lambda: dl.start_body(HEAD),
        "not_modified": dl.not_modified,
        "finish": lambda: dl.finish(10, SHA),
        "fail": lambda: dl.fail(UpstreamUnavailable("boom")),
    }
    for step in steps[:-1]:
        actions[step]()
    before = dl.state
    with pytest.raises(RuntimeError, match="cannot go to"):
        actions[steps[-1]]()
    assert dl.state is before


@pytest.mark.parametrize("prelude", [(), ("start_body",)])
def test_fail_is_idempotent_and_keeps_first_error(tmp_path: Path, prelude: tuple[str, ...]) -> None:
    dl = make(tmp_path)
    if prelude:
        dl.start_body(HEAD)
    first = UpstreamNotFound("gone")
    dl.fail(first)
    dl.fail(UpstreamUnavailable("second"))
    dl.fail(IntegrityError("third"))
    assert dl.state is State.FAILED and dl.error is first and not dl.complete


def test_fail_after_done_or_not_modified_is_a_noop(tmp_path: Path) -> None:
    done = make(tmp_path)
    done.start_body(HEAD)
    done.finish(10, SHA)
    done.fail(UpstreamUnavailable("late"))
    assert done.state is State.DONE and done.error is None

    nm = make(tmp_path)
    nm.not_modified()
    nm.fail(UpstreamUnavailable("late"))
    assert nm.state is State.NOT_MODIFIED and nm.error is None


async def test_wait_head_returns_streaming(tmp_path: Path) -> None:
    dl = make(tmp_path)
    waiter = asyncio.create_task(dl.wait_head())
    await settle()
    assert not waiter.done()
    dl.start_body(HEAD)
    assert await asyncio.wait_for(waiter, 1) is State.STREAMING


async def test_wait_head_returns_not_modified(tmp_path: Path) -> None:
    dl = make(tmp_path)
    waiter = asyncio.create_task(dl.wait_head())
    await settle()
    dl.not_modified()
    assert await asyncio.wait_for(waiter, 1) is State.NOT_MODIFIED


async def test_wait_head_raises_the_error(tmp_path: Path) -> None:
    dl = make(tmp_path)
    waiters = [asyncio.create_task(dl.wait_head()) for _ in range(3)]
    await settle()
    err = UpstreamNotFound("no such package")
    dl.fail(err)
    for w in waiters:
        with pytest.raises(UpstreamNotFound) as info:
            await asyncio.wait_for(w, 1)
        assert info.value is err


async def test_wait_head_after_the_fact(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.finish(10, SHA)
    assert await dl.wait_head() is State.DONE
    failed = make(tmp_path)
    failed.fail(UpstreamUnavailable("x"))
    with pytest.raises(UpstreamUnavailable):
        await failed.wait_head()


async def test_wait_beyond_wakes_on_publish(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    waiter = asyncio.create_task(dl.wait_beyond(0))
    await settle()
    assert not waiter.done()
    dl.publish(3, b"abc", 3)
    assert await asyncio.wait_for(waiter, 1) == 3


async def test_wait_beyond_ignores_progress_not_past_offset(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(3, b"abc", 3)
    waiter = asyncio.create_task(dl.wait_beyond(5))
    await settle()
    dl.publish(5, b"de", 5)  # not beyond 5
    await settle()
    assert not waiter.done()
    dl.publish(9, b"fghi", 9)
    assert await asyncio.wait_for(waiter, 1) == 9


async def test_wait_beyond_returns_at_once_when_already_published(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(4, b"abcd", 4)
    assert await dl.wait_beyond(2) == 4


async def test_wait_beyond_wakes_on_done(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(10, b"0123456789", 10)
    waiter = asyncio.create_task(dl.wait_beyond(10))
    await settle()
    assert not waiter.done()
    dl.finish(10, SHA)
    assert await asyncio.wait_for(waiter, 1) == 10


async def test_wait_beyond_wakes_on_done_for_empty_body(tmp_path: Path) -> None:
    dl = make(tmp_path)
    waiter = asyncio.create_task(dl.wait_beyond(0))
    await settle()
    dl.start_body(Head({}, 0))
    await settle()
    assert not waiter.done()
    dl.finish(0, SHA)
    assert await asyncio.wait_for(waiter, 1) == 0


async def test_wait_beyond_raises_on_failure(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    waiter = asyncio.create_task(dl.wait_beyond(0))
    await settle()
    err = IntegrityError("sha256 mismatch")
    dl.fail(err)
    with pytest.raises(IntegrityError) as info:
        await asyncio.wait_for(waiter, 1)
    assert info.value is err
    with pytest.raises(IntegrityError):
        await dl.wait_beyond(100)


async def test_many_waiters_all_wake(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    waiters = [asyncio.create_task(dl.wait_beyond(i)) for i in range(5)]
    await settle()
    dl.publish(10, b"0123456789", 10)
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [10] * 5


async def test_wait_verified_waits_for_done_not_for_bytes(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    waiter = asyncio.create_task(dl.wait_verified())
    dl.publish(10, b"0123456789", 10)  # every byte is in, none is verified yet
    await settle()
    assert not waiter.done()
    dl.finish(10, SHA)
    await asyncio.wait_for(waiter, 1)
    await dl.wait_verified()  # and at once, afterwards


async def test_wait_verified_raises_when_the_download_fails(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    waiter = asyncio.create_task(dl.wait_verified())
    await settle()
    err = IntegrityError("sha256 mismatch")
    dl.fail(err)
    with pytest.raises(IntegrityError) as info:
        await asyncio.wait_for(waiter, 1)
    assert info.value is err


def test_cached_chunk_windows(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(4, b"abcd", 4)
    dl.publish(10, b"efghij", 10)  # newest chunk covers [4, 10)
    assert dl.cached_chunk(4, 10) == b"efghij"
    assert dl.cached_chunk(5, 7) == b"fg"
    assert dl.cached_chunk(9, 10) == b"j"
    assert dl.cached_chunk(10, 10) == b""
    assert dl.cached_chunk(3, 6) is None  # starts before the chunk: read the file
    assert dl.cached_chunk(0, 4) is None
    assert dl.cached_chunk(8, 11) is None  # ends past the chunk


def test_cached_chunk_tracks_the_newest_chunk_even_when_publish_holds_back(tmp_path: Path) -> None:
    dl = make(tmp_path)
    dl.start_body(HEAD)
    dl.publish(8, b"abcdefgh", 6)
    assert dl.published == 6
    assert dl.cached_chunk(2, 6) == b"cdef"


# -- InflightTable ---------------------------------------------------------------------------


@pytest.fixture
def table(tmp_path: Path) -> InflightTable:
    return InflightTable(tmp_path)


async def test_start_runs_the_runner_and_removes_the_entry(table: InflightTable) -> None:
    seen: list[Path] = []

    async def run(dl: Download) -> None:
        dl.temp_path.write_bytes(b"0123456789")
        seen.append(dl.temp_path)
        dl.start_body(HEAD)
        dl.publish(10, b"0123456789", 10)
        dl.finish(10, SHA)

    dl = table.start(KEY, run)
    assert table.get(KEY) is dl and len(table) == 1
    assert dl.temp_path.parent == table.temp_dir
    assert dl.task is not None
    await asyncio.wait_for(dl.task, 1)
    assert dl.state is State.DONE and dl.error is None
    assert table.get(KEY) is None and len(table) == 0
    await table.close(grace=1)  # waits for the temp file's removal, which runs off the loop
    assert seen == [dl.temp_path] and not dl.temp_path.exists()


async def test_start_refuses_a_duplicate_key(table: InflightTable) -> None:
    release = asyncio.Event()

    async def run(dl: Download) -> None:
        await release.wait()

    dl = table.start(KEY, run)
    with pytest.raises(RuntimeError, match="already in flight"):
        table.start(KEY, run)
    assert table.get(KEY) is dl and len(table) == 1
    other = table.start(OTHER, run)
    assert len(table) == 2 and other.temp_path != dl.temp_path
    release.set()
    await asyncio.wait_for(asyncio.gather(dl.task, other.task), 1)  # type: ignore[arg-type]
    assert len(table) == 0


async def test_key_can_start_again_after_the_runner_ends(table: InflightTable) -> None:
    async def run(dl: Download) -> None:
        dl.not_modified()

    first = table.start(KEY, run)
    await asyncio.wait_for(first.task, 1)  # type: ignore[arg-type]
    second = table.start(KEY, run)
    assert second is not first and second.temp_path != first.temp_path
    await asyncio.wait_for(second.task, 1)  # type: ignore[arg-type]
    assert second.state is State.NOT_MODIFIED and len(table) == 0


async def test_runner_exception_fails_readers_and_cleans_up(table: InflightTable) -> None:
    async def run(dl: Download) -> None:
        dl.temp_path.write_bytes(b"partial")
        dl.start_body(HEAD)
        dl.publish(7, b"partial", 7)
        await asyncio.sleep(0)
        raise ZeroDivisionError("bug in the runner")

    dl = table.start(KEY, run)
    reader = asyncio.create_task(dl.wait_beyond(7))
    assert dl.task is not None
    await asyncio.wait_for(dl.task, 1)  # the table swallows and logs the crash
    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(reader, 1)
    assert dl.state is State.FAILED and isinstance(dl.error, CondaproxyError)
    await table.close(grace=1)
    assert len(table) == 0 and not dl.temp_path.exists()


async def test_runner_error_it_set_itself_is_kept(table: InflightTable) -> None:
    err = UpstreamNotFound("404 upstream")

    async def run(dl: Download) -> None:
        dl.fail(err)

    dl = table.start(KEY, run)
    waiter = asyncio.create_task(dl.wait_head())
    await asyncio.wait_for(dl.task, 1)  # type: ignore[arg-type]
    with pytest.raises(UpstreamNotFound):
        await waiter
    assert dl.error is err and len(table) == 0


async def test_runner_returning_without_result_fails_readers(table: InflightTable) -> None:
    async def run(dl: Download) -> None:
        dl.start_body(HEAD)  # then forgets to finish

    dl = table.start(KEY, run)
    await asyncio.wait_for(dl.task, 1)  # type: ignore[arg-type]
    assert dl.state is State.FAILED
    with pytest.raises(UpstreamUnavailable):
        await dl.wait_beyond(0)
    assert len(table) == 0


async def test_cancellation_fails_readers_and_cleans_up(table: InflightTable) -> None:
    started = asyncio.Event()

    async def run(dl: Download) -> None:
        dl.temp_path.write_bytes(b"x")
        dl.start_body(HEAD)
        started.set()
        await asyncio.Event().wait()

    dl = table.start(KEY, run)
    await asyncio.wait_for(started.wait(), 1)
    reader = asyncio.create_task(dl.wait_beyond(0))
    assert dl.task is not None
    dl.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dl.task
    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(reader, 1)
    await table.close(grace=1)
    assert dl.state is State.FAILED and len(table) == 0 and not dl.temp_path.exists()


async def test_a_reader_being_cancelled_does_not_cancel_the_download(table: InflightTable) -> None:
    release = asyncio.Event()

    async def run(dl: Download) -> None:
        dl.start_body(HEAD)
        await release.wait()
        dl.publish(10, b"0123456789", 10)
        dl.finish(10, SHA)

    dl = table.start(KEY, run)
    reader = asyncio.create_task(dl.wait_beyond(0))
    await settle()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    release.set()
    await asyncio.wait_for(dl.task, 1)  # type: ignore[arg-type]
    assert dl.state is State.DONE


async def test_close_cancels_running_downloads(table: InflightTable) -> None:
    started = asyncio.Event()
    cleaned: list[UnitKey] = []

    async def run(dl: Download) -> None:
        dl.temp_path.write_bytes(b"x")
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            cleaned.append(dl.key)

    a = table.start(KEY, run)
    b = table.start(OTHER, run)
    await asyncio.wait_for(started.wait(), 1)
    await settle()
    await asyncio.wait_for(table.close(grace=5), 2)
    assert a.task is not None and b.task is not None
    assert a.task.cancelled() and b.task.cancelled()
    assert sorted(map(str, cleaned)) == sorted([str(KEY), str(OTHER)])
    assert a.state is State.FAILED and b.state is State.FAILED
    assert len(table) == 0
    assert not a.temp_path.exists() and not b.temp_path.exists()


async def test_close_lets_a_verified_download_finish_persisting(table: InflightTable) -> None:
    persisted = asyncio.Event()
    finished = asyncio.Event()

    async def run(dl: Download) -> None:
        dl.start_body(HEAD)
        dl.finish(10, SHA)
        finished.set()
        await asyncio.sleep(0.05)  # persisting
        persisted.set()

    dl = table.start(KEY, run)
    await asyncio.wait_for(finished.wait(), 1)
    await asyncio.wait_for(table.close(grace=5), 2)
    assert persisted.is_set()
    assert dl.task is not None and not dl.task.cancelled()
    assert len(table) == 0


async def test_close_cancels_a_verified_download_after_the_grace(table: InflightTable) -> None:
    finished = asyncio.Event()

    async def run(dl: Download) -> None:
        dl.start_body(HEAD)
        dl.finish(10, SHA)
        finished.set()
        await asyncio.Event().wait()  # a persist that never ends

    dl = table.start(KEY, run)
    await asyncio.wait_for(finished.wait(), 1)
    await asyncio.wait_for(table.close(grace=0.05), 2)
    assert dl.task is not None and dl.task.cancelled()
    assert dl.state is State.DONE  # readers already had everything
    assert len(table) == 0


async def test_close_on_an_empty_table(table: InflightTable) -> None:
    await asyncio.wait_for(table.close(grace=0.01), 1)
    assert len(table) == 0


async def test_close_right_after_start_fails_readers_and_empties_the_table(table: InflightTable) -> None:
    async def run(dl: Download) -> None:
        dl.start_body(HEAD)

    dl = table.start(KEY, run)
    reader = asyncio.create_task(dl.wait_head())
    try:
        await table.close(grace=1)  # shutdown before the download task ever ran a step
        assert len(table) == 0
        assert dl.state is State.FAILED
        with pytest.raises(UpstreamUnavailable):
            await asyncio.wait_for(reader, 0.5)
    finally:
        reader.cancel()


async def test_a_pin_keeps_the_temp_file_past_the_end_of_the_download(table: InflightTable) -> None:
    async def run(dl: Download) -> None:
        dl.temp_path.write_bytes(b"0123456789")
        dl.start_body(HEAD)
        dl.publish(10, b"0123456789", 10)
        dl.finish(10, SHA)

    dl = table.start(KEY, run)
    assert dl.pin()  # a request found it, and pinned it before its first await
    await asyncio.wait_for(dl.task, 1)  # type: ignore[arg-type]
    await settle()
    assert dl.ended and dl.temp_path.exists()
    dl.unpin()
    assert table.removing == 1  # in the executor: unlinking a big file takes a while
    await table.close(grace=1)
    assert table.removing == 0 and not dl.temp_path.exists()
    assert not dl.pin()  # ended: the caller must look again (the stored copy, or a new fetch)
