"""sd_notify(3) in a few lines: datagrams to $NOTIFY_SOCKET (READY=1, STATUS=..., WATCHDOG=1...).

Without NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op. A send
never blocks the event loop: the socket is non-blocking, and a message the manager cannot take
at once is dropped (systemd reads its notify socket continuously).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """The service manager's notification socket, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._sock: socket.socket | None = None
        self._address = ""
        if address and address[0] in "/@":
            # "@name" is Linux's abstract namespace: a leading NUL byte.
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send KEY=value lines as one datagram (newlines inside STATUS values are flattened)."""
        if self._sock is None:
            return
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            self._sock.sendto(message, self._address)
        except OSError as exc:  # the manager went away, or its queue is full: not our failure
            log.debug("sd_notify %r failed: %s", fields, exc)

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when none are wanted."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (e.g. a wrapper that exec'd us would match)
    return int(usec) / 2e6
