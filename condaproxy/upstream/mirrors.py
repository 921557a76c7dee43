"""A channel's mirrors: the order to try them in, and unit URLs with the channel's token."""

from __future__ import annotations

import re

from cachetools import TTLCache
from yarl import URL

from condaproxy.conda.urls import unit_url
from condaproxy.config.model import ChannelConfig
from condaproxy.upstream.redirects import same_origin

# What redacted_url() leaves of a token, raw or percent-encoded (yarl encodes "<" and ">").
_REDACTED_TOKEN = re.compile(r"^/t/(?:<redacted>|%3Credacted%3E)(?=/|$)", re.IGNORECASE)

# Long enough not to hammer a dead mirror on every request, short enough to return to the
# preferred (first) mirror soon after it recovers.
REMEMBER_SECONDS = 300.0


class MirrorMemory:
    """Which mirror of each channel last answered; it is tried first for a while."""

    def __init__(self, ttl: float = REMEMBER_SECONDS) -> None:
        self._last: TTLCache[str, str] = TTLCache(maxsize=4096, ttl=ttl)

    def order(self, channel: ChannelConfig) -> tuple[str, ...]:
        """The channel's base URLs: the remembered one first, then the rest as configured."""
        last = self._last.get(channel.name)
        if last is None or last not in channel.urls:
            return channel.urls
        return (last, *(u for u in channel.urls if u != last))

    def failed_over(self, channel: ChannelConfig) -> str | None:
        """The mirror a channel is served from for now, when it is not its first (preferred) one."""
        last = self._last.get(channel.name)
        return last if last is not None and last in channel.urls and last != channel.urls[0] else None

    def remember(self, channel: ChannelConfig, base: str) -> None:
        """Record that base answered (with anything but a connect error, timeout or 5xx)."""
        if len(channel.urls) > 1:
            self._last[channel.name] = base


def locate(channel: ChannelConfig, where: str) -> str | URL:
    """where as a path relative to the channel's base URLs, else as the absolute URL it names.

    Absolute URLs come from upstream metadata (a CEP-16 shards_base_url), resolved against
    the catalog's redacted record of where the metadata came from: the redaction is undone, and
    a URL under one of the channel's bases becomes a path again, so mirrors and token apply.
    """
    if not where.startswith(("http://", "https://")):
        return where.lstrip("/")
    target = URL(where)
    path = _REDACTED_TOKEN.sub("", target.raw_path)
    redacted = path != target.raw_path
    bases = [URL(u) for u in channel.urls]
    for base in bases:
        prefix = base.raw_path.rstrip("/") + "/"
        if same_origin(base, target) and path.startswith(prefix) and not target.raw_query_string:
            return path[len(prefix) :]
    if redacted and (own := next((b for b in bases if same_origin(b, target)), None)) is not None:
        return URL(unit_url(str(own.origin()), path.lstrip("/"), channel.token))
    return target


def elsewhere(channel: ChannelConfig, where: str) -> bool:
    """Whether where is a URL the channel's metadata named on an origin not the channel's own.

    Bytes from there are verified whole before a client gets any (trusted origin or not).
    """
    try:
        located = locate(channel, where)
    except ValueError:
        return True  # open() refuses it anyway
    return isinstance(located, URL) and not any(same_origin(URL(u), located) for u in channel.urls)
