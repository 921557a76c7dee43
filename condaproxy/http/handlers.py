"""The unit handler: parse, admit, decide hit / join / start, then serve (hits.py) or stream (live.py)."""

from __future__ import annotations

import contextlib
import logging
import time

from aiohttp import web

from condaproxy.cache.freshness import Verdict, may_serve_stale, verdict
from condaproxy.cache.inflight import Download, State
from condaproxy.cache.unit import Unit
from condaproxy.conda.notices import NOTICES_NAME
from condaproxy.conda.paths import Rejection, UnitKey, parse_path
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import (
    CatalogBusy,
    CondaproxyError,
    UpstreamError,
    UpstreamNotFound,
)
from condaproxy.http import cold, notices
from condaproxy.http.hits import serve_unit
from condaproxy.http.live import stream
from condaproxy.http.problem import error, failed
from condaproxy.http.services import SERVICES, Services
from condaproxy.http.views import route
from condaproxy.upstream.admission import Refused

log = logging.getLogger(__name__)


async def handle(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /<channel>/<subdir>/<file>: serve from the store, join a fetch, or start one."""
    svc = request.app[SERVICES]
    parsed = parse_path(request.raw_path)
    if isinstance(parsed, Rejection):
        return error(request, parsed.status, parsed.reason)
    key = parsed.key
    channel = svc.config.channel(key.channel)
    if channel is None:
        detail = f"channel {key.channel!r} is not served by this proxy; check the name or the proxy's config"
        return error(request, 404, detail, key=key, type_="urn:condaproxy:problem:unknown-channel")
    if svc.private is not None:
        channel = svc.private.effective(channel)
    configured = channel
    try:
        # Before any cache look-up: a private channel's bytes go only to a token its upstream accepts.
        channel = await svc.auth.admit(channel, parsed.token, request.remote)
    except Refused as exc:
        return _refused(request, exc, key)
    if key.subdir == "" and key.filename == NOTICES_NAME and parsed.when is None:
        return await notices.serve(request, svc, key, channel)
    try:
        # Policies and views: a refusal, a kept revision, or the document made in this one's stead.
        routed = await route(request, svc, parsed, channel)
        if not isinstance(routed, UnitKey):
            return routed
        return await _serve(request, svc, routed, channel)
    except CatalogBusy as exc:
        return failed(request, exc, key=key)
    except _TokenNeeded as needed:
        return await _learn(request, svc, configured, parsed.token, needed)


def _refused(request: web.Request, exc: Refused, key: UnitKey) -> web.Response:
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return error(
        request, exc.status, exc.reason, key=key, type_="urn:condaproxy:problem:token", headers=retry
    )


class _TokenNeeded(Exception):
    """The upstream of a channel not known to be private refused us without a token."""

    def __init__(self, key: UnitKey, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.key = key
        self.error = error


async def _learn(
    request: web.Request, svc: Services, channel: ChannelConfig, token: str | None, needed: _TokenNeeded
) -> web.StreamResponse:
    """Learn the channel is private if the upstream accepts this client's token; then serve it."""
    if token is None or svc.private is None:
        return failed(request, needed.error, key=needed.key, channel=channel)
    try:
        accepted = await svc.auth.accepts(channel, token, request.remote)
    except Refused as exc:
        return _refused(request, exc, needed.key)
    if not accepted:
        return failed(request, needed.error, key=needed.key, channel=channel)
    await svc.private.learn(channel)
    return await handle(request)  # now private: admitted with this token, fetched with it


async def _serve(
    request: web.Request, svc: Services, key: UnitKey, channel: ChannelConfig
) -> web.StreamResponse:
    now = time.time()
    dl = svc.inflight.get(key)
    if dl is not None and dl.state is not State.NOT_MODIFIED:
        # A mutable unit's joiner looks for a stale copy to fall back on: after pinning.
        return await _follow(
            request, svc, channel, dl, "COLLAPSED", None, now, look_up=not key.kind.immutable
        )
    unit = await svc.catalog.get(key)
    failed_hit = False
    found = verdict(unit, now, svc.config)
    if found is Verdict.HIT and unit is not None:
        served = await serve_unit(request, svc, unit, "HIT", channel)
        if served is not None:
            return served
        unit = None  # the blob went missing or changed size, or S3 failed: fetch it again
        failed_hit = True
    elif found is Verdict.STALE_WHILE_REVALIDATE and unit is not None:
        if svc.inflight.get(key) is None:
            with contextlib.suppress(CondaproxyError):
                # One background revalidation.
                svc.fetcher.start(key, channel, unit, client=request.remote)
        served = await serve_unit(request, svc, unit, "STALE", channel)
        if served is not None:
            return served
        unit = None
        failed_hit = True
    # Re-check after the await: another request may have started the fetch meanwhile.
    dl = svc.inflight.get(key)
    xcache = "COLLAPSED"
    if dl is None:
        if request.method == "HEAD" and key.kind.immutable:
            return await cold.head(request, svc, key, channel)  # never a download for a HEAD
        # After a failed hit, from the upstream: the store just failed to serve this.
        started = cold.start(request, svc, key, channel, unit, adopt=not failed_hit)
        if isinstance(started, web.Response):
            return started  # refused: past this client's bound, or known missing
        dl, xcache = started, "MISS"
    return await _follow(request, svc, channel, dl, xcache, unit, now, look_up=False)


async def _follow(
    request: web.Request,
    svc: Services,
    channel: ChannelConfig,
    dl: Download,
    xcache: str,
    unit: Unit | None,
    now: float,
    *,
    look_up: bool,
    fall_back: bool = True,
) -> web.StreamResponse:
    """Stream the download dl, or answer from the store when it says so (304, or stale)."""
    # Pinned before any await (a coroutine runs up to its first await when awaited): the temp
    # file stays while this request may read it, however soon the download itself ends.
    if not dl.pin():
        # Ended already, its temp file gone or going: start over, from the stored copy if any.
        return await _serve(request, svc, dl.key, channel)
    try:
        if look_up:
            unit = await svc.catalog.get(dl.key)  # for a stale fallback if this revalidation fails
            if unit is not None and verdict(unit, now, svc.config) is Verdict.STALE_WHILE_REVALIDATE:
                served = await serve_unit(request, svc, unit, "STALE", channel)
                if served is not None:
                    return served
        try:
            state = await dl.wait_head()
        except UpstreamError as exc:
            if not isinstance(exc, UpstreamNotFound) and may_serve_stale(unit, now, svc.config):
                assert unit is not None
                served = await serve_unit(request, svc, unit, "STALE", channel)
                if served is not None:
                    svc.troubles.served_stale(channel.name, exc.reason, now)
                    return served
            if svc.private is not None and svc.private.may_learn(channel, exc):
                raise _TokenNeeded(dl.key, exc) from None
            stale = None
            if unit is not None and not isinstance(exc, UpstreamNotFound):
                stale = f"the cached {dl.key.filename} is older than max_stale and is not served"
            return failed(request, exc, key=dl.key, channel=channel, stale=stale)
        except CondaproxyError as exc:
            return failed(request, exc, key=dl.key, channel=channel)
        if state is State.NOT_MODIFIED:
            fresh = await svc.catalog.get(dl.key)
            if fresh is not None:
                served = await serve_unit(
                    request, svc, fresh, "HIT" if dl.adopted else "REVALIDATED", channel
                )
                if served is not None:
                    return served
            if not (fall_back and svc.store.shared) or svc.inflight.get(dl.key) is not None:
                detail = "the cached copy vanished during its revalidation; retry"
                return error(request, 502, detail, key=dl.key)
            # The shared store could not serve what it holds (S3 down or slow): fetch it whole.
            try:
                again = svc.fetcher.start(dl.key, channel, None, client=request.remote, adopt=False)
            except CondaproxyError as exc:
                return failed(request, exc, key=dl.key, channel=channel)
            return await _follow(
                request, svc, channel, again, "MISS", None, now, look_up=False, fall_back=False
            )
        return await stream(request, svc, dl, xcache)
    finally:
        dl.unpin()
