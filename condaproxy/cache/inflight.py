"""The lock table: at most one Download per unit, shared by every request that wants it.

A Download is the state shared between the one task that fetches a unit and the many
responses that stream it. The writer appends to a temporary file and *publishes* how many
bytes readers may send; readers wait on that progress (an Event swapped on every change),
never on a sleep. Readers hold no queue of their own: they read back from the file, so a slow
client costs a file descriptor, not memory.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condaproxy.conda.paths import UnitKey
from condaproxy.errors import CondaproxyError, UpstreamUnavailable

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Lifecycle of a Download; transitions only move forward."""

    CONNECTING = "connecting"  # waiting for the upstream's headers
    STREAMING = "streaming"  # body bytes are arriving
    NOT_MODIFIED = "not_modified"  # upstream said 304: the cached unit is fresh again
    DONE = "done"  # whole body written and verified: readers may end cleanly
    FAILED = "failed"  # readers must fail (before headers) or abort (after)


@dataclass(frozen=True, slots=True)
class Head:
    """What the upstream said before the body: headers to pass on and the length if known."""

    headers: dict[str, str]
    length: int | None


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _remove_off_loop(path: Path) -> None:
    asyncio.get_running_loop().run_in_executor(None, _unlink, path)


class Download:
    """One unit's fetch in progress: state, published offset and the temp file readers use."""

    def __init__(
        self, key: UnitKey, temp_path: Path, remove: Callable[[Path], None] = _remove_off_loop
    ) -> None:
        self.key = key
        self.temp_path = temp_path
        self._remove = remove  # takes the temp file away, off the loop (unlinking GiBs takes a while)
        self.state = State.CONNECTING
        self.head: Head | None = None
        self.error: CondaproxyError | None = None
        self.published = 0
        self.sha256: str | None = None
        self.subscribers = 0  # readers streaming from it (a relay paces itself to them)
        self.pins = 0  # requests that may still read the temp file
        self.adopted = False  # NOT_MODIFIED because another node had stored it (cache/adopt.py)
        self.ended = False  # the task is over; the temp file goes when the last pin is released
        self._removed = False
        # Requests waiting for the head: readers to be, whose leaving also counts (unread).
        self._head_waiters = 0
        self._wanted = False  # some request has ever waited for or read this download
        self.uncacheable = False  # known never to reach the store (nothing vouches for it)
        # Set when the cache disk refused the temp file (full, say): the bytes from there on
        # live only in memory, so only readers attached now can be served; new ones are refused.
        self.spool_error: CondaproxyError | None = None
        self._waiting = 0  # readers blocked in wait_beyond: they have sent all that is published
        self._caught_up: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        # The newest chunk stays in memory: readers that keep up never touch the file.
        self._last: tuple[int, bytes] = (0, b"")
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Download {self.key} {self.state.value} published={self.published}>"

    # -- writer side -------------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _move(self, allowed: tuple[State, ...], to: State) -> None:
        if self.state not in allowed:
            raise RuntimeError(f"{self!r}: cannot go to {to.value}")
        self.state = to
        self._notify()

    def start_body(self, head: Head) -> None:
        """Headers are known; the body follows."""
        self.head = head
        self._move((State.CONNECTING,), State.STREAMING)

    def not_modified(self) -> None:
        """The cached unit was revalidated: readers serve it from the store."""
        self._move((State.CONNECTING,), State.NOT_MODIFIED)

    def publish(self, offset: int, chunk: bytes, limit: int) -> None:
        """Bytes up to offset are on disk (chunk ends there); readers may send up to limit."""
        self._last = (offset - len(chunk), chunk)
        if limit > self.published:
            self.published = limit
            self._notify()

    def finish(self, size: int, sha256: str) -> None:
        """The whole body is written and verified: release the held-back tail."""
        self.published = size
        self.sha256 = sha256
        self._move((State.STREAMING,), State.DONE)

    def stop_spooling(self, error: CondaproxyError) -> None:
        """The temp file stops growing: readers from now on are refused with error."""
        self.spool_error = error
        self.uncacheable = True

    def never_cached(self) -> None:
        """The unit is known never to be stored: once nobody reads it, it is abandoned."""
        self.uncacheable = True

    async def readers_caught_up(self) -> None:
        """Wait until every attached reader has sent all published bytes (relay without a spool)."""
        while self._waiting < self.subscribers and self.state is State.STREAMING:
            self._caught_up = event = asyncio.Event()
            try:
                await event.wait()
            finally:
                self._caught_up = None

    def _reader_moved(self) -> None:
        if self._caught_up is not None and self._waiting >= self.subscribers:
            self._caught_up.set()

    def fail(self, error: CondaproxyError) -> None:
        """Fail every reader; safe to call in any state but DONE/NOT_MODIFIED (then a no-op)."""
        if self.state in (State.DONE, State.NOT_MODIFIED, State.FAILED):
            return
        self.error = error
        self._move(tuple(State), State.FAILED)

    # -- reader side -------------------------------------------------------------------------

    async def wait_head(self) -> State:
        """Wait until the outcome before the body is known; raises the fetch's error."""
        self._wanted = True
        self._head_waiters += 1
        try:
            while self.state is State.CONNECTING:
                await self._changed.wait()
        finally:
            self._head_waiters -= 1
        if self.state is State.FAILED and self.error is not None:
            raise self.error
        if self.spool_error is not None and self.state in (State.STREAMING, State.DONE):
            raise self.spool_error  # the bytes a new reader needs first are gone
        return self.state

    async def wait_beyond(self, offset: int) -> int:
        """Wait until more than offset bytes are published, or the body is complete.

        Returns the published offset; raises the fetch's error if it failed first.
        """
        while True:
            if self.state is State.FAILED:
                raise self.error or UpstreamUnavailable("download failed")
            if self.published > offset or self.state is State.DONE:
                return self.published
            self._waiting += 1
            self._reader_moved()
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1

    async def wait_verified(self) -> None:
        """Wait until the whole body is written and verified; raises the fetch's error if it fails."""
        while self.state is not State.DONE:
            if self.state is State.FAILED:
                raise self.error or UpstreamUnavailable("download failed")
            self._waiting += 1  # it has sent all it may: a relay need not wait for it
            self._reader_moved()
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1

    def cached_chunk(self, offset: int, end: int) -> memoryview | None:
        """Bytes [offset, end) if they are all inside the newest chunk in memory (no copy)."""
        start, chunk = self._last
        if start <= offset and end <= start + len(chunk):
            return memoryview(chunk)[offset - start : end - start]
        return None

    def pin(self) -> bool:
        """A request may read the temp file: keep it until unpin(). False once the task ended.

        Pin at once, before any await, after finding the download: it may end at any await,
        and its temp file goes with its last pin.
        """
        if self.ended:
            return False
        self._wanted = True
        self.pins += 1
        return True

    def unpin(self) -> None:
        """The request is done with the temp file; the last one out after the task ended removes it."""
        self.pins -= 1
        self._release()

    def attach(self) -> None:
        """A (pinned) reader starts streaming from the temp file."""
        self._wanted = True
        self.subscribers += 1

    def detach(self) -> None:
        """A reader is done streaming."""
        self.subscribers -= 1
        self._reader_moved()

    def _release(self) -> None:
        # A reader that kept up from memory may still need the file after the task ended.
        if self.ended and self.pins == 0 and not self._removed:
            self._removed = True
            self._remove(self.temp_path)

    @property
    def unread(self) -> bool:
        """Requests wanted this download, and every one of them has gone: nobody reads it now."""
        return self._wanted and self.subscribers == 0 and self._head_waiters == 0 and self.pins == 0

    @property
    def abandoned(self) -> bool:
        """Nobody reads it and nobody ever will get it from the store: fetching on is waste.

        Rule 3 keeps a download nobody reads for those who come later; one that cannot be
        cached serves nobody later (a newcomer joining before it stops keeps it going).
        """
        return self.uncacheable and self.unread

    @property
    def complete(self) -> bool:
        """Readers may end their response cleanly."""
        return self.state is State.DONE


Runner = Callable[[Download], Coroutine[Any, Any, None]]


class InflightTable:
    """Unit key -> Download. Check-and-start is synchronous, so two requests cannot both start."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self._downloads: dict[UnitKey, Download] = {}
        self._serial = 0
        self._removals: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._downloads)

    @property
    def removing(self) -> int:
        """Temp files of ended downloads still being removed."""
        return len(self._removals)

    def _remove(self, path: Path) -> None:
        removal = asyncio.get_running_loop().run_in_executor(None, _unlink, path)
        self._removals.add(removal)
        removal.add_done_callback(self._removed)

    def _removed(self, removal: asyncio.Future[None]) -> None:
        self._removals.discard(removal)
        if not removal.cancelled() and (exc := removal.exception()) is not None:
            log.warning("could not remove a temp file: %s", exc)

    def get(self, key: UnitKey) -> Download | None:
        """The download in flight for key, if any."""
        return self._downloads.get(key)

    def downloads(self) -> list[Download]:
        """The downloads in flight now (for the status page)."""
        return list(self._downloads.values())

    def start(self, key: UnitKey, run: Runner) -> Download:
        """Create the download for key and its task; the table, not the caller, owns the task."""
        if key in self._downloads:
            raise RuntimeError(f"{key} is already in flight")
        self._serial += 1
        dl = Download(key, self.temp_dir / f"{self._serial:08d}-{id(key):x}.part", self._remove)
        self._downloads[key] = dl
        dl.task = asyncio.get_running_loop().create_task(self._run(dl, run), name=f"fetch {key}")
        # A done callback, not a finally: it also runs for a task cancelled before its first step.
        dl.task.add_done_callback(lambda _: self._finished(dl))
        return dl

    async def _run(self, dl: Download, run: Runner) -> None:
        try:
            await run(dl)
        except asyncio.CancelledError:
            dl.fail(UpstreamUnavailable("proxy shutting down"))
            raise
        except Exception:
            log.exception("download of %s crashed", dl.key)
            dl.fail(UpstreamUnavailable("internal error while fetching"))

    def _finished(self, dl: Download) -> None:
        # Readers of a download that ended without a result see FAILED; new requests start afresh.
        dl.fail(UpstreamUnavailable("download ended without a result"))
        if self._downloads.get(dl.key) is dl:
            del self._downloads[dl.key]
        dl.ended = True
        dl._release()

    async def close(self, grace: float = 30.0) -> None:
        """Cancel downloads still streaming; let verified ones finish persisting (bounded)."""
        tasks = [d.task for d in self._downloads.values() if d.task is not None]
        for dl in list(self._downloads.values()):
            if dl.task is not None and dl.state is not State.DONE:
                dl.task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
