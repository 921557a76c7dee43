"""Policies and views on the request path: which document a request gets, and which files are refused.

`/<channel>/...` repodata and shard indexes of a channel with a policy are served as made by it
(`<file>@policy-<digest>`); `/@<when>/<channel>/...` ones as they were then: the revision the
proxy kept (`X-Condaproxy-View: exact`), else today's filtered by effective time
(`X-Condaproxy-View: filtered`). Package files a policy keeps from clients get 403 problem+json.
"""

from __future__ import annotations

from aiohttp import web

from condaproxy.cache import guard
from condaproxy.cache.filtered import release_of
from condaproxy.conda import derived
from condaproxy.conda.paths import Kind, Request, UnitKey
from condaproxy.conda.policy import Verdict
from condaproxy.config.model import ChannelConfig
from condaproxy.http.hits import serve_unit
from condaproxy.http.problem import negotiated, refused
from condaproxy.http.services import Services


async def route(
    request: web.Request, svc: Services, parsed: Request, channel: ChannelConfig
) -> web.StreamResponse | UnitKey:
    """The response (a refusal, an exact revision) or the unit to serve in the request's stead."""
    key = parsed.key
    book = svc.policies
    policy = book.policy(channel)
    now = book.clock()
    if key.kind is Kind.PACKAGE and policy.guards_packages:
        decision = await guard.check(svc.catalog, svc.fetcher.expected, key, channel, policy, now)
        if decision.verdict is not Verdict.KEEP:
            book.refused(key.channel, decision.rule or decision.verdict.value)
            return negotiated(request, refused(key, decision, policy.min_age, now))
        return key
    if key.filename not in derived.TRACKED:
        return key
    await book.maybe_reload()
    policy = book.policy(channel)
    if parsed.when is not None:
        moment = parsed.when.resolve(now)
        if moment < now:  # a view of the future is today's channel
            exact = await svc.catalog.revision_at(key, moment)
            if exact is not None and (unit := await svc.catalog.get(exact)) is not None:
                served = await serve_unit(request, svc, unit, "HIT", channel, {"X-Condaproxy-View": "exact"})
                if served is not None:
                    return served
        made = UnitKey(
            key.channel,
            key.subdir,
            derived.view_name(key.filename, min(moment, now), policy.digest()),
            key.kind,
        )
    elif policy.filters and not (key.kind is Kind.SHARD_INDEX and not policy.min_age and not _hides(policy)):
        made = UnitKey(key.channel, key.subdir, derived.policy_name(key.filename, policy.digest()), key.kind)
    else:
        return key
    cached = await svc.catalog.get(made)
    if cached is not None and (release := release_of(cached)) is not None and release <= now:
        # A held record came of age: the document must be made again before it is served.
        await svc.catalog.expire(made.channel, made.subdir, [made.filename])
    return made


def _hides(policy: object) -> bool:
    return any(r.action.value == "hide" for r in getattr(policy, "rules", ()))
