"""Client tokens for private channels: whose /t/<token>/ the upstream accepts, remembered briefly.

Cached bytes of a private channel go only to a request whose own token the upstream has
accepted for that channel; a request without one, or with another, never gets them (pulpcore
#3212: credentials reused across users). Tokens are held only as keyed hashes, with a key
made fresh per process, so nothing stored or logged can be turned back into a token.

The check asks the upstream about the client's token alone (never with the channel's own
credentials, which the configuration refuses beside "private" anyway), as a HEAD whose
redirects are not followed: only the file itself, answered, counts as a yes. Checks are
rate-limited per client address and overall (ratelimit.py), so that the proxy is no free
token-guessing oracle and the upstream has no reason to ban it.
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
from condaproxy.errors import UpstreamError
from condaproxy.upstream.client import Upstream
from condaproxy.upstream.ratelimit import ProbeLimiter

log = logging.getLogger(__name__)

# noarch/repodata.json is mandatory in every channel: a token that may read it may read the channel.
PROBE_PATH = "noarch/repodata.json"


class Refused(Exception):
    """The request may not have this private channel's bytes: status and a one-line reason."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after  # seconds, for a 429


def judged(status: int, content_type: str) -> bool | None:
    """What the upstream's answer to a token check says: yes, no, or None (nothing learned)."""
    if status in (200, 206):
        # A login or error page answered in the file's place is no yes: repodata is never HTML.
        return not content_type.lower().startswith("text/html")
    if status == 429 or status >= 500:
        return None  # the upstream is busy or down: ask again later
    # A redirect (to a login page, say), 401, 403, 404 (anaconda.org's answers to a token it
    # refuses), and any other answer that is not the file.
    return False


class ClientAuth:
    """Decides, per private channel, whether a client's token may be served."""

    def __init__(self, upstream: Upstream, ttl: float, limiter: ProbeLimiter) -> None:
        self._upstream = upstream
        self._limiter = limiter
        self._key = secrets.token_bytes(32)
        self._verdicts: TTLCache[tuple[str, bytes], bool] = TTLCache(maxsize=65536, ttl=max(ttl, 0.001))
        self._probes: dict[tuple[str, bytes], asyncio.Task[bool]] = {}

    def _ident(self, channel: ChannelConfig, token: str) -> tuple[str, bytes]:
        return channel.name, hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    async def admit(self, channel: ChannelConfig, token: str | None, client: str | None) -> ChannelConfig:
        """The channel as fetches for this client (at address client) see it; raises Refused."""
        if not channel.private:
            return channel  # public: one cache whatever token a client adds, none forwarded
        if token is None:
            raise Refused(401, f"channel {channel.name!r} is private: use /t/<token>/{channel.name}/")
        if not await self.accepts(channel, token, client):
            raise Refused(403, f"the upstream does not accept this token for {channel.name!r}")
        return replace(channel, token=token)

    async def accepts(self, channel: ChannelConfig, token: str, client: str | None) -> bool:
        """Whether the upstream accepts token for channel (asked once per auth_ttl); raises Refused."""
        ident = self._ident(channel, token)
        accepted = self._verdicts.get(ident)
        return accepted if accepted is not None else await self._probe(channel, token, ident, client)

    async def _probe(
        self, channel: ChannelConfig, token: str, ident: tuple[str, bytes], client: str | None
    ) -> bool:
        """Ask the upstream once, however many requests with this token are waiting.

        The question is a task of ours, not of the request that asked first: a client going
        away mid-check never leaves the others waiting on an answer that will not come. Only
        a new question counts against the client's and the overall rate.
        """
        task = self._probes.get(ident)
        if task is None:
            if wait := self._limiter.acquire(client):
                raise Refused(429, f"too many token checks; retry in {wait} s", retry_after=wait)
            task = asyncio.ensure_future(self._ask(channel, token, ident))
            self._probes[ident] = task
            task.add_done_callback(lambda _: self._probes.pop(ident, None))
        return await asyncio.shield(task)

    async def _ask(self, channel: ChannelConfig, token: str, ident: tuple[str, bytes]) -> bool:
        # The client's token and nothing else: with the channel's own header or certificate
        # the upstream would be judging the proxy, and would let any token in.
        alone = replace(channel, token=token, header=None, client_cert=None, client_key=None)
        try:
            status, content_type = await self._upstream.probe(alone, PROBE_PATH)
        except UpstreamError as exc:
            # Upstream down: nothing learned, nothing remembered, nothing served.
            raise Refused(502, f"cannot check the token upstream: {exc.reason}") from None
        verdict = judged(status, content_type)
        if verdict is None:
            raise Refused(502, f"cannot check the token upstream: it answered {status}")
        self._verdicts[ident] = verdict
        return verdict

    async def close(self) -> None:
        """Cancel checks still running (shutdown)."""
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
