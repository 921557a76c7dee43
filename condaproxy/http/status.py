"""GET /_status.json (and the data behind GET /_status): what the cache is doing right now.

One snapshot feeds both. The parts that need catalog queries (store size, per-channel rows,
metadata ages) are computed at most every CATALOG_EVERY seconds however many people watch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from condaproxy import __version__
from condaproxy.cache.catalog.summary import ChannelSummary, MetadataRow
from condaproxy.cache.freshness import ttl
from condaproxy.cache.stats import Health, Recorder
from condaproxy.conda.paths import Kind
from condaproxy.http.operations import OPERATIONS, Operations
from condaproxy.http.services import SERVICES, Services

CATALOG_EVERY = 5.0
STALE_RECENT = 300.0  # a channel served stale this recently is shown as "serving stale"
TOP = 15
RECENT = 50


@dataclass
class _CatalogView:
    at: float
    size: int
    catalog: int
    units: int
    channels: list[ChannelSummary]
    metadata: list[MetadataRow]


async def _catalog_view(svc: Services, ops: Operations) -> _CatalogView:
    async with ops.status_lock:
        view = ops.status_view
        if not isinstance(view, _CatalogView) or time.monotonic() - view.at > CATALOG_EVERY:
            cat = svc.catalog
            view = _CatalogView(
                time.monotonic(),
                await cat.stored_size(),
                await cat.catalog_size(),
                await cat.unit_count(),
                await cat.channel_summaries(),
                await cat.metadata_rows(),
            )
            ops.status_view = view
        return view


def upstream_state(health: Health, urls: tuple[str, ...], first: str, now: float) -> str:
    """ok, failing, serving stale, failed over, or idle (no fetch yet)."""
    if health.last_error_at is not None and (health.last_ok is None or health.last_error_at > health.last_ok):
        return "failing"
    if health.last_stale_at is not None and now - health.last_stale_at < STALE_RECENT:
        return "serving stale"
    if urls and first != urls[0]:
        return "failed over"
    return "ok" if health.last_ok is not None else "idle"


def _channels(svc: Services, recorder: Recorder, view: _CatalogView, now: float) -> list[dict[str, Any]]:
    stored = {c.channel: c for c in view.channels}
    names = sorted({*svc.config.channels, *recorder.channels(), *stored} - {"(other)"})
    out = []
    for name in names:
        channel = svc.config.channel(name)
        urls = channel.urls if channel is not None else ()
        first = svc.upstream.mirrors.order(channel)[0] if channel is not None else ""
        health = recorder.health(name)
        row = stored.get(name)
        out.append(
            {
                "name": name,
                "served": channel is not None,
                "upstreams": list(urls),
                "mirror": first,
                "state": upstream_state(health, urls, first, now),
                "last_ok": health.last_ok,
                "last_error": health.last_error,
                "last_error_at": health.last_error_at,
                "failures": health.failures,
                "last_stale_at": health.last_stale_at,
                "units": row.units if row else 0,
                "bytes": row.bytes if row else 0,
                "stored_hits": row.hits if row else 0,
                "traffic": recorder.ratios(name),
            }
        )
    return out


def _metadata(svc: Services, view: _CatalogView, now: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in view.metadata:
        limit = ttl(Kind(row.kind), svc.config) or 0
        groups.setdefault((row.channel, row.subdir), []).append(
            {
                "file": row.filename,
                "kind": row.kind,
                "size": row.size,
                "etag": row.etag,
                "age": max(0.0, now - row.fetched_at),
                "validated_age": max(0.0, now - row.validated_at),
                "revalidate_in": row.validated_at + limit - now,
            }
        )
    return [{"channel": c, "subdir": s, "files": files} for (c, s), files in groups.items()]


def _inflight(svc: Services, recorder: Recorder, now: float) -> list[dict[str, Any]]:
    out = []
    for dl in svc.inflight.downloads():
        started = recorder.started_at(dl.key)
        elapsed = now - started if started is not None else None
        out.append(
            {
                "path": f"{dl.key.channel}/{dl.key.path}",
                "kind": dl.key.kind.value,
                "state": dl.state.value,
                "done": dl.published,
                "total": dl.head.length if dl.head is not None else None,
                "clients": dl.subscribers,
                "elapsed": elapsed,
                "rate": dl.published / elapsed if elapsed else None,
            }
        )
    return sorted(out, key=lambda d: d["path"])


async def snapshot(svc: Services, ops: Operations) -> dict[str, Any]:
    """Everything the status page shows, as plain JSON-able data."""
    now = time.time()
    view = await _catalog_view(svc, ops)
    recorder = ops.recorder
    evictor = ops.evictor
    return {
        "version": __version__,
        "now": now,
        "started": ops.started,
        "uptime": now - ops.started,
        "traffic": recorder.ratios(),
        "channels": _channels(svc, recorder, view, now),
        "metadata": _metadata(svc, view, now),
        "inflight": _inflight(svc, recorder, now),
        "persist": {
            "queued": svc.persist.queued,
            "active": svc.persist.active,
            "workers": svc.config.cache.persist_workers,
        },
        "store": {
            "size": view.size + view.catalog,  # max_size holds blobs and catalog together
            "blobs": view.size,
            "catalog": view.catalog,
            "max_size": svc.config.cache.max_size,
            "units": view.units,
            "evicted_units": evictor.evicted_units,
            "evicted_bytes": evictor.evicted_bytes,
            "pins": {
                "config": list(evictor.pins.patterns),
                "lockfile_files": len(evictor.pins.files),
                "runtime": ops.pins.patterns,
            },
        },
        "top": [{"package": k, "requests": n, "bytes": b} for k, n, b in recorder.top.top(TOP)],
        "recent": [
            {
                "at": e.at,
                "channel": e.channel,
                "path": e.path,
                "kind": e.kind,
                "reason": e.reason,
                "detail": e.detail,
            }
            for e in reversed(list(recorder.recent)[-RECENT:])
        ],
        "prefetch": [job.as_dict() for job in reversed(ops.prefetcher.jobs)],
        "admin_api": ops.admin is not None,
    }


async def status_json(request: web.Request) -> web.Response:
    """GET /_status.json"""
    data = await snapshot(request.app[SERVICES], request.app[OPERATIONS])
    return web.json_response(data, headers={"Cache-Control": "no-store", "X-Cache": "MISS"})
