"""`GET /<channel>/notices.json` (CEP-6): the upstream's notices, and the proxy's own.

The proxy's own say what a user would otherwise not know: the channel is served stale from
the cache because its upstream fails, it is served from a mirror, or what its admin wrote
(`notice = ...` in the channel's section). The document is made per request: it is small.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from condaproxy.conda.notices import MAX_UPSTREAM_BYTES, merged, notice
from condaproxy.conda.paths import UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.http.services import Services

# A stale answer this recent is still news: the upstream was failing a moment ago.
STALE_NEWS_SECONDS = 600.0


def our_notices(svc: Services, channel: ChannelConfig, now: float) -> list[dict[str, Any]]:
    """The proxy's notices for a channel, now."""
    ours = []
    if channel.notice:
        ours.append(notice("admin", channel.notice, channel.notice_level, now))
    seen = svc.troubles.stale.get(channel.name)
    if seen is not None and now - seen[0] <= STALE_NEWS_SECONDS:
        message = (
            f"The upstream of channel {channel.name} is failing ({seen[1]}); this proxy serves its"
            " cached metadata, which may be out of date."
        )
        ours.append(notice("stale", message, "warning", seen[0]))
    mirror = svc.upstream.mirrors.failed_over(channel)
    if mirror is not None:
        message = f"Channel {channel.name} is served from a mirror while its primary upstream fails."
        ours.append(notice(f"mirror {mirror}", message, "info", now))
    return ours


async def serve(request: web.Request, svc: Services, key: UnitKey, channel: ChannelConfig) -> web.Response:
    """The channel's notices: upstream's (when it has any, cached as any file) and ours."""
    body: bytes | None = None
    unit = await svc.fetcher.ensure(key, channel)
    if unit is not None and unit.size <= MAX_UPSTREAM_BYTES:
        chunks = [c async for c in svc.store.read(unit.blob_key, 0, unit.size)]
        body = b"".join(chunks)
    now = time.time()
    data = merged(body, our_notices(svc, channel, now))
    return web.Response(
        body=data,
        headers={
            "Content-Type": "application/json",
            "Cache-Control": f"public, max-age={min(svc.config.cache.repodata_ttl, 300)}",
            "X-Cache": "HIT" if unit is not None else "MISS",
        },
    )
