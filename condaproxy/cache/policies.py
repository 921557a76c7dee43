"""The policies in force, swapped whole on reload, and what they hold back now (for metrics and status).

Rules and cooldowns live in the configuration. A reload (SIGHUP, or the file changing, noticed at
the next repodata request past its TTL) swaps the book's configuration: documents are named by
their policy's digest, so a changed policy simply names other documents, made afresh at the next
request, while everything cached stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from condaproxy.conda.filtering import Held, Judge
from condaproxy.conda.policy import Policy, Verdict
from condaproxy.config.load import load_config
from condaproxy.config.model import ChannelConfig, Config
from condaproxy.errors import ConfigError
from condaproxy.metrics import Metrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class Summary:
    """What the newest document made for one channel and subdir kept out."""

    held: list[Held] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    next_release: float | None = None
    made_at: float = 0.0


class PolicyBook:
    """The configuration's policies, and the summaries of what they hold back."""

    def __init__(self, config: Config, metrics: Metrics, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        self._metrics = metrics
        self._mtime = self._stat()
        self._checked = 0.0
        self.summaries: dict[tuple[str, str], Summary] = {}

    def policy(self, channel: ChannelConfig) -> Policy:
        """The channel's policy as the current configuration says (a reload may have changed it)."""
        current = self.config.channel(channel.name) or channel
        return self.config.policy(current)

    # -- reloading -----------------------------------------------------------------------------

    def _stat(self) -> float | None:
        source = self.config.source
        try:
            return os.stat(source).st_mtime if source is not None else None
        except OSError:
            return None

    def reload(self) -> bool:
        """Read the configuration file again and take its policies; False (logged) when it is wrong."""
        source = self.config.source
        if source is None:
            return False
        try:
            fresh = load_config(source)
        except ConfigError as exc:
            log.error("configuration not reloaded, the policies in force stay: %s", exc)
            return False
        self.config = fresh
        self._mtime = self._stat()
        log.info("policies reloaded from %s: %d rules", source, len(fresh.rules))
        return True

    async def maybe_reload(self) -> None:
        """Reload when the file changed, looking at most once per repodata_ttl (stat off the loop)."""
        now = time.monotonic()
        if self.config.source is None or now - self._checked < max(self.config.cache.repodata_ttl, 1):
            return
        self._checked = now
        mtime = await asyncio.get_running_loop().run_in_executor(None, self._stat)
        if mtime != self._mtime:
            await asyncio.get_running_loop().run_in_executor(None, self.reload)

    # -- what is held back ---------------------------------------------------------------------

    def record(self, channel: str, subdir: str, judge: Judge) -> None:
        """Note what a document just made for channel/subdir keeps out, and update the gauges."""
        self.summaries[(channel, subdir)] = Summary(
            list(judge.held), dict(judge.counts), judge.next_release, self.clock()
        )
        held = 0
        releases: list[float] = []
        hidden: dict[str, int] = {}
        for (ch, _), summary in self.summaries.items():
            if ch != channel:
                continue
            held += summary.counts.get(Verdict.HOLD.value, 0)
            if summary.next_release is not None:
                releases.append(summary.next_release)
            for item in summary.held:
                if item.verdict is Verdict.HIDE and item.rule:
                    hidden[item.rule] = hidden.get(item.rule, 0) + 1
        self._metrics.policy_held.labels(channel).set(held)
        self._metrics.policy_next_release.labels(channel).set(min(releases) if releases else 0)
        for rule, count in hidden.items():
            self._metrics.policy_hidden.labels(channel, rule).set(count)

    def refused(self, channel: str, reason: str) -> None:
        """Count a package request refused by the cooldown or a rule."""
        self._metrics.policy_refused.labels(channel, reason).inc()
