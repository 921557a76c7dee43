"""RFC 9457 problem details: the error bodies clients show their users (conda prints `detail`)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from aiohttp import web

from condaproxy.conda.paths import UnitKey
from condaproxy.conda.policy import Decision, Verdict
from condaproxy.conda.when import format_duration

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
