"""The CPU pool: its queue bound holds, refusals are immediate, and a slot is freed only by its thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from cpugate import CpuGate

from condaproxy.cache.cpu import CpuPool, default_workers
from condaproxy.errors import Overloaded


def block() -> str:
    return "blocked"


def other() -> str:
    return "other"


def fail() -> None:
    raise ValueError("job failed")


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll a test-side condition (the pool itself never polls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture
async def gate() -> CpuGate:
    return CpuGate("block")


async def test_the_queue_bound_holds_and_later_jobs_wait(gate: CpuGate) -> None:
    pool = CpuPool(1, 2, gate)
    try:
        jobs = [asyncio.ensure_future(pool.run(block)) for _ in range(6)]
        await wait_until(lambda: gate.held == 1 and pool.waiting == 3)
        assert pool.admitted == pool.limit == 3
        with pytest.raises(Overloaded):
            await pool.run(other, refuse=True)
        gate.release()
        assert await asyncio.gather(*jobs) == ["blocked"] * 6
        await wait_until(lambda: pool.admitted == 0)
        assert gate.peak_running == 1
        assert gate.names() == {"block"}  # the refused job never ran
        assert all(thread.startswith("condaproxy-cpu") for thread in gate.threads())
    finally:
        gate.release()
        await pool.close()


async def test_a_cancelled_caller_keeps_its_slot_until_its_thread_is_done(gate: CpuGate) -> None:
    pool = CpuPool(1, 0, gate)
    try:
        job = asyncio.ensure_future(pool.run(block))
        await wait_until(lambda: gate.held == 1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert pool.admitted == 1  # the thread still runs it
        with pytest.raises(Overloaded):
            await pool.run(other, refuse=True)
        gate.release()
        await wait_until(lambda: pool.admitted == 0)
        assert await pool.run(other, refuse=True) == "other"
    finally:
        gate.release()
        await pool.close()


async def test_a_job_cancelled_while_queued_never_runs(gate: CpuGate) -> None:
    pool = CpuPool(1, 1, gate)
    try:
        first = asyncio.ensure_future(pool.run(block))
        await wait_until(lambda: gate.held == 1)
        queued = asyncio.ensure_future(pool.run(other))
        await wait_until(lambda: pool.admitted == 2)
        queued.cancel()
        await wait_until(lambda: pool.admitted == 1)
        gate.release()
        assert await first == "blocked"
        assert gate.names() == {"block"}
    finally:
        gate.release()
        await pool.close()


async def test_errors_reach_the_caller_and_free_the_slot() -> None:
    pool = CpuPool(1, 0)
    try:
        with pytest.raises(ValueError, match="job failed"):
            await pool.run(fail)
        await wait_until(lambda: pool.admitted == 0)
        assert await pool.run(other, refuse=True) == "other"
    finally:
        await pool.close()


async def test_close_drops_queued_jobs_and_waits_for_running_ones(gate: CpuGate) -> None:
    pool = CpuPool(1, 1, gate)
    running = asyncio.ensure_future(pool.run(block))
    await wait_until(lambda: gate.held == 1)
    queued = asyncio.ensure_future(pool.run(other))
    await wait_until(lambda: pool.admitted == 2)
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0)
    assert not closing.done()
    gate.release()
    await closing
    assert await running == "blocked"
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert gate.names() == {"block"}
    with pytest.raises(RuntimeError, match="after close"):
        await pool.run(other)
    await pool.close()  # twice is fine


def test_bad_sizes_are_refused_and_the_default_leaves_room_for_a_long_job() -> None:
    with pytest.raises(ValueError):
        CpuPool(0, 1)
    with pytest.raises(ValueError):
        CpuPool(1, -1)
    assert default_workers() >= 2
