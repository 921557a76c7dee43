"""A reserve of file descriptors that clients cannot take from the proxy.

Every client connection costs a descriptor, and a request being served usually one more (the
blob for sendfile, the download's temp file). Clients that hold theirs (by never reading, say)
must not take the last ones: the listener needs one to accept a connection (without it, accept
fails with EMFILE and asyncio stops accepting for a second at a time), the catalog and the
downloads need them to open files and upstream sockets. So:

- at startup the soft RLIMIT_NOFILE is raised to the hard limit;
- once limit - reserve descriptors are in use, a request is answered 503 and its connection
  closed (/healthz and /metrics, which open nothing, are still served);
- once limit - reserve/2 are in use, a new connection is answered 503 and closed as it is
  accepted, so the upper half of the reserve is left to the proxy's own work.

"In use" is the larger of two cheap lower bounds: the lowest free descriptor (what the kernel
hands out next: one dup()), and the descriptors the proxy held at startup plus one per client
connection and one per request being served. The second is exact about clients where the
first is fooled by gaps (connections closing low in the table while others stay open above),
and it counts the files of requests admitted but not yet opened, so a burst of requests cannot
all pass the check before any of them opens its file. Counting /proc/self/fd would be exact
but costs a quarter of a millisecond per request at 256 descriptors, far more at 10,000.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import socket
import weakref
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from condaproxy.http.problem import error

log = logging.getLogger(__name__)

# What holds no descriptor beyond its connection's, and must answer even under pressure.
EXEMPT_PATHS = frozenset({"/healthz", "/metrics"})

_REFUSAL_DETAIL = "the proxy is short of file descriptors; retry shortly"
# Refused before the request is read: no Accept to look at, so problem+json (RFC 9457).
_REFUSAL = json.dumps(
    {
        "type": "urn:condaproxy:problem:busy",
        "title": "Service Unavailable",
        "status": 503,
        "detail": _REFUSAL_DETAIL,
    }
).encode()
_REFUSAL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/problem+json\r\n"
    b"Content-Length: " + str(len(_REFUSAL)).encode() + b"\r\n"
    b"Retry-After: 1\r\nCache-Control: no-store\r\nX-Cache: MISS\r\nConnection: close\r\n\r\n" + _REFUSAL
)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # some systems cap it lower than they say
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_reserve(limit: int) -> int:
    """An eighth of the limit, at least 64 and at most 4096, never more than half of it."""
    return min(max(64, min(limit // 8, 4096)), limit // 2)


def _lowest_free(any_fd: int, limit: int) -> int:
    try:
        fd = os.dup(any_fd)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return limit
        raise
    os.close(fd)
    return fd


def _open_now() -> int:
    """The descriptors this process holds (once, at startup: it reads a directory)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing the directory
    except OSError:
        return _lowest_free(0, 1 << 30)


class FdReserve:
    """Descriptors kept from clients: where requests stop (work_line), and connections."""

    def __init__(self, limit: int, reserve: int | None = None) -> None:
        self.limit = limit
        self.reserve = default_reserve(limit) if reserve is None else reserve
        self.work_line = limit - self.reserve
        self.accept_line = limit - self.reserve // 2
        self.base = 0  # descriptors of the proxy itself, idle (calibrate)
        self.connections = 0  # client connections open (GuardedListener's)
        self.requests = 0  # requests being served (the middleware's)

    @classmethod
    def current(cls) -> FdReserve | None:
        """The reserve for this process's soft limit; None when there is no limit."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None if soft == resource.RLIM_INFINITY else cls(soft)

    def __repr__(self) -> str:
        return (
            f"<FdReserve limit={self.limit} base={self.base} connections={self.connections}"
            f" requests={self.requests} work<{self.work_line} accept<{self.accept_line}>"
        )

    def calibrate(self) -> None:
        """Learn how many descriptors the proxy itself holds (call once it is set up)."""
        self.base = max(0, _open_now() - self.connections - self.requests)

    def in_use(self, any_fd: int) -> int:
        """A lower bound of the descriptors in use or about to be (any_fd: one that is open)."""
        return max(_lowest_free(any_fd, self.limit), self.base + self.connections + self.requests)

    def middleware(self) -> Middleware:
        """Refuse requests once the work line is reached; count those being served."""

        @web.middleware
        async def keep_reserve(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in EXEMPT_PATHS:
                return await handler(request)
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None and self.in_use(sock.fileno()) >= self.work_line:
                resp = error(request, 503, _REFUSAL_DETAIL, type_="urn:condaproxy:problem:busy")
                resp.force_close()  # its descriptor is freed as soon as the answer is out
                return resp
            self.requests += 1
            try:
                return await handler(request)
            finally:
                self.requests -= 1

        return keep_reserve

    def admit(self, conn: socket.socket) -> socket.socket | None:
        """A just-accepted connection, counted until closed; None (and closed) past the line."""
        if self.in_use(conn.fileno()) >= self.accept_line:
            _turn_away(conn)
            return None
        counted = _Counted(conn.family, conn.type, conn.proto, fileno=conn.detach())
        self.connections += 1
        counted.on_close(self._closed)
        return counted

    def _closed(self) -> None:
        self.connections -= 1


class _Counted(socket.socket):
    """A client connection that tells the reserve when it closes (or is collected unclosed)."""

    _gone: weakref.finalize[..., _Counted] | None = None

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call callback once, when the socket is closed or collected."""
        self._gone = weakref.finalize(self, callback)

    def close(self) -> None:
        """Close the socket; the reserve counts one connection fewer."""
        if self._gone is not None:
            self._gone()
        super().close()


class GuardedListener(socket.socket):
    """A listening socket whose accept() turns away connections past the accept line.

    asyncio calls accept() on the listening socket it is given; a connection that would take the
    proxy past the line is answered 503 and closed at once, so it never holds a descriptor.
    """

    reserve: FdReserve | None = None

    def accept(self) -> tuple[socket.socket, object]:
        """The next admitted connection (BlockingIOError when none is waiting)."""
        while True:
            conn, addr = super().accept()
            if self.reserve is None:
                return conn, addr
            if (counted := self.reserve.admit(conn)) is not None:
                return counted, addr


def _turn_away(conn: socket.socket) -> None:
    try:
        conn.setblocking(False)
        conn.send(_REFUSAL_RESPONSE)  # a fresh socket's buffer takes it whole
    except OSError:
        pass
    finally:
        conn.close()


def listeners(hosts: Sequence[str], port: int, reserve: FdReserve | None) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of hosts, as asyncio would make them."""
    infos = {
        (info[0], info[4]): None
        for host in hosts
        for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    }
    made: list[socket.socket] = []
    try:
        for family, address in infos:
            sock = GuardedListener(family, socket.SOCK_STREAM)
            made.append(sock)
            sock.reserve = reserve
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Each address family gets its own socket ("0.0.0.0, ::" is two of them).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except BaseException:
        for made_sock in made:
            made_sock.close()
        raise
    return made
