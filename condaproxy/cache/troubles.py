"""What clients should be told about a channel's upstream: when it was last served stale, and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Troubles:
    """When each channel was last served stale because its upstream failed, and why."""

    stale: dict[str, tuple[float, str]] = field(default_factory=dict)

    def served_stale(self, channel: str, reason: str, now: float) -> None:
        """Record a stale answer given because the upstream failed."""
        self.stale[channel] = (now, reason)
