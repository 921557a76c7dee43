"""Channels learned to be private: their upstream refuses us, but accepts a client's own token.

A channel whose config says nothing of `private` starts public (one cache, client tokens
ignored). When its upstream refuses a request without a token (401/403) and accepts the
client's `/t/<token>/`, it is private from then on, as if `private = yes`: its bytes go only
to tokens the upstream accepts. This is remembered in the catalog, across restarts. (A public
channel showing extra packages to a token is not detected: that needs `private = yes`.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import CondaproxyError, UpstreamRefused

log = logging.getLogger(__name__)


class LearnedPrivate:
    """The set of channels learned to be private, loaded at start and kept in the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._names: set[str] = set()

    async def load(self) -> None:
        """Read what earlier runs learned."""
        self._names = await self._catalog.learned_private()

    def effective(self, channel: ChannelConfig) -> ChannelConfig:
        """The channel as requests see it: private if learned so and not configured either way."""
        if not channel.private_configured and channel.name in self._names:
            return replace(channel, private=True)
        return channel

    @staticmethod
    def may_learn(channel: ChannelConfig, error: CondaproxyError) -> bool:
        """Whether this failure may show the channel is private (if a client's token is accepted)."""
        return (
            # A channel with credentials of its own: the upstream would take those for anyone's.
            channel.token is None
            and channel.header is None
            and channel.client_cert is None
            and not channel.private
            and not channel.private_configured
            and isinstance(error, UpstreamRefused)
            and error.status in (401, 403)
        )

    async def learn(self, channel: ChannelConfig) -> None:
        """Treat channel as private from now on, across restarts."""
        if channel.name in self._names:
            return
        await self._catalog.set_learned_private(channel.name, time.time())
        self._names.add(channel.name)
        log.warning(
            "channel %s refuses requests without a token: served as private from now on", channel.name
        )
