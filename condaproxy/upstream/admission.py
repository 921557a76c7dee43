"""Client tokens for private channels: whose /t/<token>/ the upstream accepts, remembered briefly.

Cached bytes of a private channel go only to a request whose own token the upstream has
accepted for that channel; a request without one, or with another, never gets them (pulpcore
#3212: credentials reused across users). Tokens are held only as keyed hashes, with a key
made fresh per process, so nothing stored or logged can be turned back into a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import replace

from cachetools import TTLCache

from condaproxy.config.model import ChannelConfig
from condaproxy.errors import UpstreamError, UpstreamNotFound, UpstreamRefused
from condaproxy.upstream.client import Upstream

log = logging.getLogger(__name__)

# noarch/repodata.json is mandatory in every channel: a token that may read it may read the channel.
PROBE_PATH = "noarch/repodata.json"


class Refused(Exception):
    """The request may not have this private channel's bytes: status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientAuth:
    """Decides, per private channel, whether a client's token may be served."""

    def __init__(self, upstream: Upstream, ttl: float) -> None:
        self._upstream = upstream
        self._key = secrets.token_bytes(32)
        self._verdicts: TTLCache[tuple[str, bytes], bool] = TTLCache(maxsize=65536, ttl=max(ttl, 0.001))
        self._probes: dict[tuple[str, bytes], asyncio.Task[bool]] = {}

    def _ident(self, channel: ChannelConfig, token: str) -> tuple[str, bytes]:
        return channel.name, hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    async def admit(self, channel: ChannelConfig, token: str | None) -> ChannelConfig:
        """The channel as fetches for this client see it (with its token); raises Refused."""
        if not channel.private:
            return channel  # public: one cache whatever token a client adds, none forwarded
        if token is None:
            raise Refused(401, f"channel {channel.name!r} is private: use /t/<token>/{channel.name}/")
        if not await self.accepts(channel, token):
            raise Refused(403, f"the upstream does not accept this token for {channel.name!r}")
        return replace(channel, token=token)

    async def accepts(self, channel: ChannelConfig, token: str) -> bool:
        """Whether the upstream accepts token for channel (asked once per auth_ttl); raises Refused."""
        ident = self._ident(channel, token)
        accepted = self._verdicts.get(ident)
        return accepted if accepted is not None else await self._probe(channel, token, ident)

    async def _probe(self, channel: ChannelConfig, token: str, ident: tuple[str, bytes]) -> bool:
        """Ask the upstream once, however many requests with this token are waiting.

        The question is a task of ours, not of the request that asked first: a client going
        away mid-check never leaves the others waiting on an answer that will not come.
        """
        task = self._probes.get(ident)
        if task is None:
            task = asyncio.ensure_future(self._ask(channel, token, ident))
            self._probes[ident] = task
            task.add_done_callback(lambda _: self._probes.pop(ident, None))
        return await asyncio.shield(task)

    async def _ask(self, channel: ChannelConfig, token: str, ident: tuple[str, bytes]) -> bool:
        try:
            resp, _ = await self._upstream.open(replace(channel, token=token), PROBE_PATH, metadata=True)
            resp.release()
            accepted = True
        except (UpstreamNotFound, UpstreamRefused):
            accepted = False  # anaconda.org answers 401, 403 or 404 for a token it refuses
        except UpstreamError as exc:
            # Upstream down: nothing learned, nothing remembered, nothing served.
            raise Refused(502, f"cannot check the token upstream: {exc.reason}") from None
        self._verdicts[ident] = accepted
        return accepted

    async def close(self) -> None:
        """Cancel checks still running (shutdown)."""
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
