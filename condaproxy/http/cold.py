"""Cold requests: what a client may make the proxy fetch from upstream on its behalf.

Each client address may have at most max_cold_per_client cold fetches (downloads it started,
upstream HEADs) running; past that it gets 503 with Retry-After. Joining a download in flight
and hits never count. A cold HEAD of a package or shard starts no download: it is answered from
the channel's metadata when that gives the size, else with an upstream HEAD (a HEAD that
started a full download would leave it running for nobody, and unlisted packages are never
cached, so every such HEAD would download again).
"""

from __future__ import annotations

from aiohttp import web

from condaproxy.cache.inflight import Download
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import CondaproxyError
from condaproxy.http.problem import error, failed
from condaproxy.http.responses import plan_for, unit_headers, without_body
from condaproxy.http.services import Services

_BUSY = "this client has too many downloads starting or running here; retry shortly"
_BUSY_TYPE = "urn:condaproxy:problem:busy"


def _client(request: web.Request) -> str:
    # Behind a front proxy every client shares its address: the bound is then shared too.
    return request.remote or ""


def start(
    request: web.Request,
    svc: Services,
    key: UnitKey,
    channel: ChannelConfig,
    cached: Unit | None,
    *,
    adopt: bool = True,
) -> Download | web.Response:
    """Start key's download for this client, or the answer that refuses it (adopt: see Fetcher.start)."""
    client = _client(request)
    if not svc.cold.take(client):
        return error(request, 503, _BUSY, key=key, type_=_BUSY_TYPE)
    try:
        dl = svc.fetcher.start(key, channel, cached, client=request.remote, adopt=adopt)
    except CondaproxyError as exc:
        svc.cold.give_back(client)
        return failed(request, exc, key=key, channel=channel)
    assert dl.task is not None
    # The slot is the download's, not the request's: it runs on after a client leaves (rule 3).
    dl.task.add_done_callback(lambda _: svc.cold.give_back(client))
    return dl


async def head(
    request: web.Request, svc: Services, key: UnitKey, channel: ChannelConfig
) -> web.StreamResponse:
    """A cold HEAD of a package or shard: the headers a GET would start with, no download."""
    client = _client(request)
    if not svc.cold.take(client):
        return error(request, 503, _BUSY, key=key, type_=_BUSY_TYPE)
    try:
        found = await svc.fetcher.probe(key, channel)
    except CondaproxyError as exc:
        return failed(request, exc, key=key, channel=channel)
    finally:
        svc.cold.give_back(client)
    headers = unit_headers(svc.config, key, found.headers, "MISS")
    plan = plan_for(request, found.length, found.headers)
    svc.metrics.response("MISS", plan.status)
    if not plan.has_body:
        return await without_body(request, plan, headers)
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
    end = found.length if plan.count is None else plan.offset + plan.count
    if end is not None:
        resp.content_length = end - plan.offset
    await resp.prepare(request)
    await resp.write_eof()
    return resp
