"""The per-client bound on cold fetches: how many each client address has running."""

from __future__ import annotations

from collections import Counter


class ColdFetches:
    """Cold fetches each client address has running, bounded per address (0: no bound)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: Counter[str] = Counter()

    def running(self, client: str) -> int:
        """How many cold fetches client has running."""
        return self._running[client]

    def take(self, client: str) -> bool:
        """Count one more cold fetch for client; False (nothing counted) past the bound."""
        if self.limit and self._running[client] >= self.limit:
            return False
        self._running[client] += 1
        return True

    def give_back(self, client: str) -> None:
        """One of client's cold fetches ended."""
        self._running[client] -= 1
        if self._running[client] <= 0:
            del self._running[client]
