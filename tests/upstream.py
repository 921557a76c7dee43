"""A fake upstream conda channel server with fault injection.

``FakeUpstream`` is a real aiohttp server on 127.0.0.1 (ephemeral port) that
serves directory trees, records every request, and misbehaves on demand, per
URL path: slow bodies, short bodies, resets, stalls, error statuses, corrupted
or substituted bodies, chunked framing, late headers, and test-controlled holds.

Faults are keyed by URL path (``/testchan/noarch/repodata.json``; the leading
slash is optional). Each fault applies to every matching request until
``clear_faults()``, or only to the next ``times`` matching requests. Faults of
different kinds combine (e.g. ``chunked`` + ``truncate``, ``hold`` + ``reset``);
of several faults of the *same* kind on a path, only the first still-active one
applies to a request, so ``status(p, 503, times=1); status(p, 500, times=1)``
answers 503, then 500, then normally.

Header-level faults (``status``, ``replace``, ``chunked``, ``delay_headers``,
``hold_headers``, ``add_headers``) match GET and HEAD; body faults
(``throttle``, ``truncate``, ``reset``, ``stall``, ``corrupt``, ``hold``) match
GET only, so a HEAD probe does not use up a ``times=1`` body fault.

Byte positions (``at``) count bytes of the response body actually sent (after
any Range slicing); an ``int`` is a byte count, a ``float`` a fraction of the
body length.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import hashlib
import mimetypes
import socket
import ssl
import struct
import termios
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

CHUNK_SIZE = 64 * 1024

_HEADER_KINDS = frozenset(
    {"status", "replace", "chunked", "delay_headers", "hold_headers", "add_headers"}
)
_BODY_KINDS = frozenset({"throttle", "truncate", "reset", "stall", "corrupt", "hold"})


class RecordedRequest(NamedTuple):
    """One request as the fake upstream received it."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]


class Hold:
    """A test-controlled gate: requests wait at a point until ``release()``.

    ``reached`` is set once a request arrives at the point (for a body hold:
    once ``at`` body bytes have reached the client's socket, or after 2 s if it is not reading); ``waiting`` counts
    requests currently held. After ``release()`` no request waits here again.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.released = asyncio.Event()
        self.waiting = 0
        self.arrivals = 0

    def release(self) -> None:
        """Let every held request, and any later one, continue."""
        self.released.set()

    def __repr__(self) -> str:
        state = "released" if self.released.is_set() else "holding"
        return f"<Hold {state} arrivals={self.arrivals} waiting={self.waiting}>"


@dataclass
class _Fault:
    kind: str
    remaining: int | None
    params: dict[str, Any] = field(default_factory=dict)

    def active(self) -> bool:
        return self.remaining is None or self.remaining > 0

    def consume(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


@dataclass(frozen=True)
class _Content:
    data: bytes
    etag: str
    last_modified: float | None  # POSIX seconds, None for replaced bodies
    content_type: str


class _Closing(Exception):
    """The server is shutting down while a request was held or stalled."""


class FakeUpstream:
    """A fake conda channel server on 127.0.0.1; see the module docstring for faults."""

    def __init__(self, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self.requests: list[RecordedRequest] = []
        self._mounts: dict[str, Path] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._etags: dict[tuple[Path, int, int], str] = {}
        self._arrived = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._scheme = "http"

    # -- lifecycle ---------------------------------------------------------

    async def start(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 on an ephemeral port; over TLS with ``ssl_context`` (then ``url`` is https)."""
        if self._runner is not None:
            raise RuntimeError("FakeUpstream already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away cancels its handler,
        # so held/stalled handlers never outlive their client.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._scheme = "https" if ssl_context is not None else "http"
        self._runner = runner

    async def close(self) -> None:
        """Stop serving; held and stalled requests are aborted. Safe to call twice."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError("FakeUpstream not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<FakeUpstream {where} mounts={sorted(self._mounts)}>"

    # -- content -----------------------------------------------------------

    def mount(self, prefix: str, directory: Path) -> None:
        """Serve ``directory`` at ``/<prefix>/...``; ``prefix`` may contain ``/`` or be empty."""
        self._mounts[prefix.strip("/")] = Path(directory).resolve()

    # -- request log -------------------------------------------------------

    def count(self, path: str, method: str | None = "GET") -> int:
        """Requests received for ``path`` with ``method`` (any method if None)."""
        path = _norm(path)
        return sum(
            1
            for r in self.requests
            if r.path == path and (method is None or r.method == method)
        )

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """Recorded requests for ``path``, in arrival order."""
        path = _norm(path)
        return [r for r in self.requests if r.path == path]

    def reset_counts(self) -> None:
        """Forget recorded requests."""
        self.requests.clear()

    async def wait_for(
        self, path: str, n: int = 1, method: str | None = "GET", timeout: float = 10.0
    ) -> None:
        """Wait until ``count(path, method) >= n`` (no polling)."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: self.count(path, method) >= n), timeout
            )

    # -- faults ------------------------------------------------------------

    def clear_faults(self, path: str | None = None) -> None:
        """Remove all faults (or only those of ``path``); releases outstanding holds."""
        paths = list(self._faults) if path is None else [_norm(path)]
        for p in paths:
            for fault in self._faults.pop(p, []):
                hold = fault.params.get("hold")
                if isinstance(hold, Hold):
                    hold.release()

    def throttle(self, path: str, bytes_per_second: float, *, times: int | None = None) -> None:
        """Pace the body at about ``bytes_per_second``."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self._add(path, "throttle", times, rate=float(bytes_per_second))

    def truncate(self, path: str, at: int | float, *, times: int | None = None) -> None:
        """Declare the full length, send only ``at`` bytes, then close cleanly (FIN).

        With ``chunked`` the terminating zero-length chunk is never sent.
        """
        self._add(path, "truncate", times, at=at)

    def reset(self, path: str, at: int | float, *, times: int | None = None) -> None:
        """Send ``at`` bytes, then abort the connection with a TCP RST (SO_LINGER 0).

        Before the RST the server waits (up to 2 s) for the client to have
        received the bytes, so a reading client normally sees exactly ``at``
        bytes, then a connection error; a client that is not reading sees fewer.
        """
        self._add(path, "reset", times, at=at)

    def stall(
        self, path: str, at: int | float, seconds: float | None, *, times: int | None = None
    ) -> None:
        """Send ``at`` bytes, pause ``seconds`` (forever if None, until close), then go on."""
        self._add(path, "stall", times, at=at, seconds=seconds)

    def status(
        self,
        path: str,
        code: int,
        body: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``code`` with ``body`` (and extra ``headers``) instead of the file."""
        self._add(path, "status", times, code=code, body=body, headers=dict(headers or {}))

    def corrupt(self, path: str, *, times: int | None = None) -> None:
        """Send 200 with the right length and validators but some bytes flipped."""
        self._add(path, "corrupt", times)

    def replace(
        self,
        path: str,
        data: bytes,
        content_type: str = "text/html; charset=utf-8",
        *,
        times: int | None = None,
    ) -> None:
        """Serve ``data`` (with its own ETag, 200) instead of the file; works for missing files."""
        self._add(path, "replace", times, data=data, content_type=content_type)

    def chunked(self, path: str, *, times: int | None = None) -> None:
        """Use chunked transfer encoding (no Content-Length)."""
        self._add(path, "chunked", times)

    def delay_headers(self, path: str, seconds: float, *, times: int | None = None) -> None:
        """Wait ``seconds`` after the request arrives before answering."""
        self._add(path, "delay_headers", times, seconds=seconds)

    def add_headers(
        self, path: str, headers: Mapping[str, str], *, times: int | None = None
    ) -> None:
        """Add (or override) response headers, e.g. ``Cache-Control``."""
        self._add(path, "add_headers", times, headers=dict(headers))

    def hold(self, path: str, at: int | float, *, times: int | None = None) -> Hold:
        """Send ``at`` body bytes, then wait until the returned ``Hold`` is released."""
        hold = Hold()
        self._add(path, "hold", times, at=at, hold=hold)
        return hold

    def hold_headers(self, path: str, *, times: int | None = None) -> Hold:
        """Hold the request before any response headers until the returned ``Hold`` is released."""
        hold = Hold()
        self._add(path, "hold_headers", times, hold=hold)
        return hold

    def _add(self, path: str, kind: str, times: int | None, **params: Any) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        at = params.get("at")
        if isinstance(at, float) and not 0.0 <= at <= 1.0:
            raise ValueError("a float 'at' is a fraction in [0, 1]")
        if isinstance(at, int) and at < 0:
            raise ValueError("'at' must be >= 0")
        self._faults.setdefault(_norm(path), []).append(_Fault(kind, times, params))

    def _take_faults(self, path: str, method: str) -> dict[str, _Fault]:
        """Pick (and use up) the first active fault of each kind matching this request."""
        taken: dict[str, _Fault] = {}
        for fault in self._faults.get(path, []):
            if fault.kind in taken or not fault.active():
                continue
            if fault.kind in _BODY_KINDS and method != "GET":
                continue
            fault.consume()
            taken[fault.kind] = fault
        return taken

    # -- serving -----------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append(RecordedRequest(request.method, path, request.headers))
        async with self._arrived:
            self._arrived.notify_all()
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        faults = self._take_faults(path, request.method)
        try:
            return await self._respond(request, path, faults)
        except _Closing:
            _abort(request)
            # Whatever aiohttp then tries to write fails with a ConnectionError it ignores.
            return web.Response(status=503)

    async def _respond(
        self, request: web.Request, path: str, faults: dict[str, _Fault]
    ) -> web.StreamResponse:
        if f := faults.get("delay_headers"):
            await self._sleep(f.params["seconds"])
        if f := faults.get("hold_headers"):
            await self._wait_hold(f.params["hold"])
        extra: dict[str, str] = dict(f.params["headers"]) if (f := faults.get("add_headers")) else {}

        if f := faults.get("status"):
            answer = web.Response(status=f.params["code"], body=f.params["body"])
            answer.headers.update(f.params["headers"])
            answer.headers.update(extra)
            return answer

        content = await self._content(path, faults)
        if content is None:
            return web.Response(status=404, text=f"not found: {path}\n", headers=extra)

        headers = CIMultiDict[str]()
        headers["ETag"] = content.etag
        if content.last_modified is not None:
            headers["Last-Modified"] = email.utils.formatdate(content.last_modified, usegmt=True)
        headers["Accept-Ranges"] = "bytes"

        if _not_modified(request, content):
            headers.update(extra)
            return web.Response(status=304, headers=headers)

        body = content.data
        status = 200
        size = len(body)
        plan = _range_plan(request, content, size)
        if isinstance(plan, str):  # "unsatisfiable"
            headers["Content-Range"] = f"bytes */{size}"
            headers.update(extra)
            return web.Response(status=416, headers=headers)
        if plan is not None:
            start, end = plan
            body = body[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"

        if "corrupt" in faults:
            body = _flip(body)

        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = content.content_type
        response.headers.update(extra)
        if "chunked" in faults:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        await self._send_body(request, response, body, faults)
        return response

    async def _send_body(
        self,
        request: web.Request,
        response: web.StreamResponse,
        body: bytes,
        faults: dict[str, _Fault],
    ) -> None:
        """Write ``body`` in chunks, stopping at each fault's byte position."""
        total = len(body)
        # (position, order, fault): at equal positions, holds/stalls go before a cut.
        order = {"hold": 0, "stall": 1, "truncate": 2, "reset": 3}
        stops = sorted(
            (_position(faults[k].params["at"], total), order[k], faults[k])
            for k in order
            if k in faults
        )
        rate: float | None = faults["throttle"].params["rate"] if "throttle" in faults else None
        chunk = self.chunk_size if rate is None else max(1, min(self.chunk_size, int(rate / 20)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        for position, _, fault in [*stops, (total, 9, None)]:
            while sent < position:
                piece = body[sent : min(position, sent + chunk)]
                await response.write(piece)
                sent += len(piece)
                if rate is not None:
                    delay = started + sent / rate - loop.time()
                    if delay > 0:
                        await self._sleep(delay)
            if fault is None:
                break
            if fault.kind == "hold":
                await _flushed(request, kernel=True)
                await self._wait_hold(fault.params["hold"])
            elif fault.kind == "stall":
                await _flushed(request, kernel=True)
                seconds = fault.params["seconds"]
                if seconds is None:
                    await self._closing.wait()
                    raise _Closing
                await self._sleep(seconds)
            elif fault.kind == "truncate":
                # transport.close() flushes what is buffered, then sends FIN.
                if request.transport is not None:
                    request.transport.close()
                return
            elif fault.kind == "reset":
                await _flushed(request, kernel=True)
                _abort(request)
                return
        await response.write_eof()

    async def _content(self, path: str, faults: dict[str, _Fault]) -> _Content | None:
        if f := faults.get("replace"):
            replaced: bytes = f.params["data"]
            tag = '"r-' + hashlib.sha256(replaced).hexdigest()[:32] + '"'
            return _Content(replaced, tag, None, f.params["content_type"])
        file = self._resolve(path)
        if file is None:
            return None
        try:
            stat = file.stat()
            data = await asyncio.to_thread(file.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        key = (file, stat.st_mtime_ns, stat.st_size)
        etag = self._etags.get(key)
        if etag is None:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
            etag = self._etags[key] = f'"{digest[:32]}"'
        return _Content(data, etag, stat.st_mtime, _content_type(file))

    def _resolve(self, path: str) -> Path | None:
        """Map a URL path to a file under the longest matching mount, refusing escapes."""
        rel_url = path.lstrip("/")
        for prefix in sorted(self._mounts, key=len, reverse=True):
            if prefix and not (rel_url == prefix or rel_url.startswith(prefix + "/")):
                continue
            base = self._mounts[prefix]
            rest = rel_url[len(prefix) :].lstrip("/")
            if not rest:
                return None
            candidate = (base / rest).resolve()
            if not candidate.is_relative_to(base) or not candidate.is_file():
                return None
            return candidate
        return None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but end early (raising ``_Closing``) if the server closes."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return
        raise _Closing

    async def _wait_hold(self, hold: Hold) -> None:
        hold.arrivals += 1
        hold.reached.set()
        if hold.released.is_set():
            return
        hold.waiting += 1
        try:
            released = asyncio.ensure_future(hold.released.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({released, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                released.cancel()
                closing.cancel()
            if not hold.released.is_set():
                raise _Closing
        finally:
            hold.waiting -= 1


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


def _position(at: int | float, total: int) -> int:
    if isinstance(at, float):
        return int(total * at)
    return min(at, total)


def _flip(body: bytes) -> bytes:
    """Invert a few bytes spread over the body (same length)."""
    if not body:
        return body
    out = bytearray(body)
    for index in {0, len(out) // 3, len(out) // 2, len(out) - 1}:
        out[index] ^= 0xFF
    return bytes(out)


def _content_type(file: Path) -> str:
    name = file.name
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".zst"):
        return "application/zstd"
    if name.endswith((".conda", ".tar.bz2")):
        return "application/octet-stream"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def _etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    """RFC 9110 §8.8.3.2: weak comparison for If-None-Match, strong for If-Range."""
    if header.strip() == "*":
        return True
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _not_modified(request: web.Request, content: _Content) -> bool:
    """RFC 9110 §13.1.2-3: If-None-Match wins; If-Modified-Since only without it."""
    inm = request.headers.get("If-None-Match")
    if inm is not None:
        return _etag_matches(inm, content.etag, weak=True)
    ims = request.headers.get("If-Modified-Since")
    if ims is not None and content.last_modified is not None:
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
        return int(content.last_modified) <= since
    return False


def _range_plan(
    request: web.Request, content: _Content, size: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """A single ``bytes=`` range as (first, last), "unsatisfiable", or None for the full body."""
    header = request.headers.get("Range")
    if header is None or not header.startswith("bytes=") or "," in header:
        return None  # RFC 9110 §14.2: a server may ignore Range
    if_range = request.headers.get("If-Range")
    if if_range is not None:
        if if_range.startswith('"') or if_range.startswith("W/"):
            if not _etag_matches(if_range, content.etag, weak=False):
                return None
        else:
            try:
                date = email.utils.parsedate_to_datetime(if_range).timestamp()
            except (TypeError, ValueError):
                return None
            if content.last_modified is None or int(content.last_modified) != int(date):
                return None
    spec = header[len("bytes=") :].strip()
    first_s, sep, last_s = spec.partition("-")
    if not sep:
        return None
    try:
        if not first_s:  # suffix range: the last N bytes
            n = int(last_s)
            if n <= 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size or last < first:
        return "unsatisfiable"
    return first, min(last, size - 1)


async def _flushed(request: web.Request, *, kernel: bool = False, timeout: float = 2.0) -> None:
    """Wait until the transport's buffer has gone to the kernel (and, with ``kernel``, to the peer).

    An RST discards whatever the kernel has not yet delivered, so before a
    ``reset`` we also wait (Linux: TIOCOUTQ) for the send queue to be acknowledged,
    giving up after ``timeout`` if the client is not reading.
    """
    transport = request.transport
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # asyncio offers no "buffer empty" event, so this fake server polls.
    while transport is not None and not transport.is_closing() and loop.time() < deadline:
        if transport.get_write_buffer_size() == 0 and not (kernel and _unacked(transport)):
            return
        await asyncio.sleep(0.001)


def _unacked(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    ioctl_outq = getattr(termios, "TIOCOUTQ", None)
    if sock is None or ioctl_outq is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), ioctl_outq, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _abort(request: web.Request) -> None:
    """Abort the connection with a TCP RST rather than a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
