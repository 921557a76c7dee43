"""Processes the benchmark starts: servers in their own process groups, tools found on PATH, a time bound.

Every process started here is stopped by its own id (its process group), also on Ctrl-C,
SIGTERM or the --timeout alarm.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024
READY_TIMEOUT = 60.0


class SetupError(Exception):
    """Something the benchmark needs is missing or did not start (exit status 2)."""


class Timeout(BaseException):
    """The run exceeded --timeout (a BaseException, so nothing swallows it)."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tool(name: str, given: str | None = None) -> str | None:
    """An executable: the path given, else on PATH or in the sbin folders apt installs into."""
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints about its version (nginx and squid print to stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


class Server:
    """A server process started here, in its own process group, always stopped by stop()."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        graceful: bool = True,
    ) -> None:
        self.name = name
        self.graceful = graceful  # False: SIGKILL at once (nothing of it is reused)
        self.port = port
        self.log = log
        self.started = time.monotonic()
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own group: nginx workers are stopped with it
        )
        self.ps = psutil.Process(self.proc.pid)
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT) -> float:
        """Wait until the server answers HTTP on its port; returns seconds since it was started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(f"HEAD {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/"):
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise SetupError(f"{self.name} did not answer on port {self.port} within {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after a grace period; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.proc.poll() is None and self.graceful:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
            # The group may hold children (nginx workers) even after the leader exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self._log_file.close()


def rss_of(processes: list[psutil.Process]) -> int:
    """Summed resident memory of processes, in bytes."""
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class RssSampler:
    """Samples the summed RSS of a set of servers' processes every interval, in a thread."""

    def __init__(self, servers: list[Server], interval: float = 0.02) -> None:
        self.servers = servers
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        return rss_of([p for s in self.servers for p in s.processes()])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def finish(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
        return self.peak


@contextmanager
def bounded(seconds: int) -> Iterator[None]:
    """Raise Timeout after seconds, and turn SIGTERM/SIGINT into a clean exit, so finally blocks run."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Timeout(f"benchmark exceeded --timeout {seconds}s")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    # SIGINT too: a shell starting us in the background with "&" leaves it ignored.
    old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        for sig, handler in old.items():
            signal.signal(sig, handler)
