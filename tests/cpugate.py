"""A CpuHook for tests: holds chosen CPU pool jobs at their start, and records where every job ran."""

from __future__ import annotations

import threading


class CpuGate:
    """Jobs whose function name is in `hold` wait at their start until release()."""

    def __init__(self, *hold: str) -> None:
        self.hold = set(hold)
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.ran: list[tuple[str, str]] = []  # (job's function name, thread name), in start order
        self.held = 0  # jobs waiting at the gate now
        self.running = 0
        self.peak_running = 0

    def started(self, name: str) -> None:
        with self._lock:
            self.ran.append((name, threading.current_thread().name))
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            hold = name in self.hold and not self._open.is_set()
            self.held += hold
        if hold:
            try:
                self._open.wait(60)  # bounded: a failing test must not leave its thread behind for good
            finally:
                with self._lock:
                    self.held -= 1

    def finished(self, name: str) -> None:
        with self._lock:
            self.running -= 1

    def release(self) -> None:
        """Let every held job, and any later one, run."""
        self._open.set()

    def names(self) -> set[str]:
        """The names of the jobs that started."""
        with self._lock:
            return {name for name, _ in self.ran}

    def threads(self) -> set[str]:
        """The names of the threads jobs ran on."""
        with self._lock:
            return {thread for _, thread in self.ran}
