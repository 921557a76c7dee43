"""RFC 9457 problem details: the error bodies clients show their users (conda prints `detail`)."""

from __future__ import annotations

import datetime as dt
import json
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from condaproxy.conda.paths import UnitKey
from condaproxy.conda.policy import Decision, Verdict
from condaproxy.conda.when import format_duration
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import (
    CacheDiskError,
    CatalogBusy,
    CondaproxyError,
    DownloadAbandoned,
    IntegrityError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)

CONTENT_TYPE = "application/problem+json"
TYPES = {
    Verdict.HOLD: "urn:condaproxy:problem:min-age",
    Verdict.HIDE: "urn:condaproxy:problem:hidden",
    Verdict.DENY: "urn:condaproxy:problem:denied",
}


def problem(
    status: int, title: str, detail: str, *, type_: str = "about:blank", **extra: Any
) -> web.Response:
    """A problem+json answer (RFC 9457): type, title, status, detail, and extension members."""
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={"Content-Type": CONTENT_TYPE, "X-Cache": "MISS", "Cache-Control": "no-store"},
    )


def _rfc3339(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def refused(key: UnitKey, decision: Decision, min_age: float, now: float) -> web.Response:
    """403 for a package file the channel's policy keeps from clients, saying which rule and until when."""
    where = {"channel": key.channel, "file": key.path, "rule": decision.rule}
    if decision.verdict is Verdict.HOLD:
        if decision.release is None:
            detail = f"{key.filename} is held back: its publication time is unknown (min_age_unknown = hold)"
            return problem(403, "Release cooldown", detail, type_=TYPES[Verdict.HOLD], **where)
        wait = format_duration(max(0, int(decision.release - now)))
        detail = (
            f"{key.filename} was published less than {format_duration(min_age)} ago and is held back by the"
            f" release cooldown (min_age) until {_rfc3339(decision.release)}, in {wait}"
        )
        return problem(
            403,
            "Release cooldown",
            detail,
            type_=TYPES[Verdict.HOLD],
            available_at=_rfc3339(decision.release),
            **where,
        )
    action = "hidden" if decision.verdict is Verdict.HIDE else "denied"
    detail = f"{key.filename} is {action} by the rule {decision.rule!r} of channel {key.channel}"
    return problem(403, f"Package {action} by policy", detail, type_=TYPES[decision.verdict], **where)


# Problem types of the proxy's own answers, by the exception (or situation) behind them.
ERROR_TYPES: dict[type[CondaproxyError], str] = {
    UpstreamTimeout: "urn:condaproxy:problem:upstream-timeout",
    UpstreamNotFound: "urn:condaproxy:problem:not-found",
    UpstreamRefused: "urn:condaproxy:problem:upstream-refused",
    UpstreamUnavailable: "urn:condaproxy:problem:upstream-unavailable",
    IntegrityError: "urn:condaproxy:problem:integrity",
    CacheDiskError: "urn:condaproxy:problem:cache-disk",
    CatalogBusy: "urn:condaproxy:problem:busy",
    DownloadAbandoned: "urn:condaproxy:problem:abandoned",
}
_ADVICE: dict[type[CondaproxyError], str] = {
    UpstreamTimeout: "retry later",
    UpstreamUnavailable: "retry later, or ask the proxy's admin to check the upstream",
    IntegrityError: "retry later; the proxy did not cache the bad bytes",
    CacheDiskError: "the proxy's cache disk is failing: ask its admin",
    CatalogBusy: "retry shortly",
    DownloadAbandoned: "retry",
}


def prefers_text(accept: str) -> bool:
    """Whether an Accept header ranks text/plain above problem+json (RFC 9110 §12.5.1)."""
    best_text, best_json = -1.0, -1.0
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media == "text/plain":
            best_text = max(best_text, q)
        elif media in (CONTENT_TYPE, "application/json", "application/*", "*/*"):
            best_json = max(best_json, q)
    return best_text > 0 and best_text >= best_json


def error_type(exc: CondaproxyError) -> str:
    """The problem type URI of an exception: the nearest class that has one."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TYPES:
            return ERROR_TYPES[cls]
    return "about:blank"


def upstream_detail(
    exc: CondaproxyError, channel: ChannelConfig | None, key: UnitKey | None, stale: str | None = None
) -> str:
    """One sentence: what went wrong upstream for this file, and what the client can do."""
    reason = str(exc).rstrip(".")
    where = ""
    if channel is not None:
        host = urlsplit(channel.url).hostname or channel.url
        where = f"upstream {host} of channel {channel.name}"
    if isinstance(exc, UpstreamTimeout) and channel is not None:
        head = f"{where} timed out after {channel.connect_timeout:g} s ({reason})"
    elif isinstance(exc, UpstreamNotFound) and key is not None:
        head = f"{key.path} does not exist on {where or 'the upstream'}"
    elif where and isinstance(exc, UpstreamError):
        head = f"{where} failed: {reason}"
    else:
        head = reason
    if key is not None and not isinstance(exc, UpstreamNotFound):
        head += f" while fetching {key.path}"
    if stale is not None:
        head += f"; {stale}"
    advice = next((_ADVICE[c] for c in type(exc).__mro__ if c in _ADVICE), None)
    return f"{head}; {advice}" if advice else head


def error(
    request: web.BaseRequest,
    status: int,
    detail: str,
    *,
    key: UnitKey | None = None,
    channel: str | None = None,
    type_: str = "about:blank",
    xcache: str = "MISS",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The proxy's own error answer: problem+json, or one line of text if the client prefers it.

    X-Cache is always there, and a 503 says when to retry.
    """
    extra = {"Retry-After": "1"} if status == 503 else {}
    extra.update(headers or {})
    if prefers_text(request.headers.get("Accept", "")):
        return web.Response(
            status=status,
            text=detail + "\n",
            headers={"X-Cache": xcache, "Cache-Control": "no-store", **extra},
        )
    where: dict[str, str] = {}
    if key is not None:
        where = {"channel": key.channel, "file": key.path}
    elif channel is not None:
        where = {"channel": channel}
    resp = problem(status, _title(status), detail, type_=type_, **where)
    resp.headers["X-Cache"] = xcache
    resp.headers.update(extra)
    return resp


def negotiated(request: web.BaseRequest, resp: web.Response) -> web.Response:
    """A problem+json answer as one line of text when the client prefers text/plain."""
    if not prefers_text(request.headers.get("Accept", "")) or not isinstance(resp.body, bytes):
        return resp
    detail = str(json.loads(resp.body).get("detail", ""))
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.Response(status=resp.status, text=detail + "\n", headers=headers)


def failed(
    request: web.BaseRequest,
    exc: CondaproxyError,
    *,
    key: UnitKey | None = None,
    channel: ChannelConfig | None = None,
    stale: str | None = None,
) -> web.Response:
    """The error answer for an exception, its status from the exception (errors.py)."""
    detail = upstream_detail(exc, channel, key, stale)
    name = channel.name if channel is not None else None
    return error(request, exc.status, detail, key=key, channel=name, type_=error_type(exc))


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
