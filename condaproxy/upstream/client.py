"""The upstream client: conditional GETs over a channel's mirrors, errors mapped to our own.

Requests for shared fetches carry no client header (no Range, no Authorization, no client
validators): what is fetched once is fetched for everybody. Only configured upstream bases are
ever contacted, each channel with its own TLS identity and credentials; redirects go only where
redirects.py allows, at most MAX_REDIRECTS, and never carry our credentials to another origin.
Secrets (tokens, custom headers) never appear in a message: URLs are shown as redacted_url().
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from yarl import URL

from condaproxy import __version__
from condaproxy.conda.urls import redacted_url, unit_url
from condaproxy.config.model import ChannelConfig
from condaproxy.config.tls import TlsIdentity, TlsSetupError, build_context
from condaproxy.errors import (
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from condaproxy.upstream.mirrors import REMEMBER_SECONDS, MirrorMemory, locate
from condaproxy.upstream.redirects import (
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    DisallowedAddress,
    PublicResolver,
    refusal,
    same_origin,
)

log = logging.getLogger(__name__)

USER_AGENT = f"condaproxy/{__version__}"


@dataclass(frozen=True, slots=True)
class Validators:
    """What we hold of a cached copy, for a conditional request."""

    etag: str | None = None
    last_modified: str | None = None


def _conditional(validators: Validators | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if validators is not None:
        if validators.etag:
            headers["If-None-Match"] = validators.etag
        if validators.last_modified:
            headers["If-Modified-Since"] = validators.last_modified
    return headers


def _all_failed(failures: list[tuple[str, UpstreamError]]) -> UpstreamError:
    """One error for a fetch whose every mirror failed: 504 only if every mirror timed out."""
    if len(failures) == 1:
        return failures[0][1]
    reasons = "; ".join(f"{where}: {exc.reason}" for where, exc in failures)
    message = f"all {len(failures)} mirrors failed: {reasons}"
    if all(isinstance(exc, UpstreamTimeout) for _, exc in failures):
        return UpstreamTimeout(message)
    return UpstreamUnavailable(message)


class _PoolWait:
    """Holds the connect deadline still while a request waits for a pooled connection.

    connect_timeout bounds connecting and waiting for the response headers; the wait for a free
    connection is queueing behind our own downloads, not the upstream being slow, and must not
    turn into a 504. aiohttp reports the wait through its connection-queued trace signals.
    """

    def __init__(self, deadline: asyncio.Timeout) -> None:
        self._deadline = deadline
        self._left: float | None = None

    def pause(self) -> None:
        """The request starts waiting for a free connection."""
        when = self._deadline.when()
        if when is not None and self._left is None:
            self._left = when - asyncio.get_running_loop().time()
            self._deadline.reschedule(None)

    def resume(self) -> None:
        """The request got a connection (or may make one): the deadline runs again."""
        if self._left is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._left)
            self._left = None


async def _queued(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: object) -> None:
    if isinstance(wait := ctx.trace_request_ctx, _PoolWait):
        wait.pause()


async def _dequeued(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: object) -> None:
    if isinstance(wait := ctx.trace_request_ctx, _PoolWait):
        wait.resume()


@dataclass(frozen=True, slots=True)
class _How:
    """How a unit is asked for: the method, and which pool the request goes through."""

    method: str
    metadata: bool


@dataclass(frozen=True, slots=True)
class _Pools:
    """One TLS identity's two connection pools, so that metadata never queues behind packages.

    Repodata, shard indexes and shards are small and gate every solve; package downloads are
    large and may hold all of a host's connections for minutes.
    """

    metadata: aiohttp.ClientSession
    bulk: aiohttp.ClientSession

    def pick(self, metadata: bool) -> aiohttp.ClientSession:
        """The pool for a metadata request, or for anything else."""
        return self.metadata if metadata else self.bulk

    async def close(self) -> None:
        """Close both pools."""
        await asyncio.gather(self.metadata.close(), self.bulk.close())


class Upstream:
    """Opens upstream responses; the caller reads the body and must release the response.

    One pair of sessions (connection pools: metadata, and everything else) per TLS identity, so
    a connection made with one channel's client certificate is never reused for another. Other
    origins never see the certificate. A host the channel's metadata names (a CEP-15 base_url,
    a CEP-16 shards_base_url) that is not one of its own origins obeys the redirect rules,
    unless the channel's section trusts it (trusted_origins): https only, through pools that
    resolve names to public addresses only.
    """

    def __init__(self, *, mirror_ttl: float = REMEMBER_SECONDS) -> None:
        self.mirrors = MirrorMemory(mirror_ttl)
        self._public = PublicResolver()
        self._sessions: dict[tuple[TlsIdentity, bool], _Pools] = {
            (TlsIdentity(), False): self._new_pools(True, public_only=False)
        }
        self._building = asyncio.Lock()
        self._closed = False

    @property
    def pools(self) -> frozenset[tuple[TlsIdentity, bool]]:
        """The open session pairs, as (TLS identity, public addresses only)."""
        return frozenset(self._sessions)

    def _new_pools(self, context: ssl.SSLContext | bool, *, public_only: bool) -> _Pools:
        return _Pools(
            self._new_session(context, public_only=public_only),
            self._new_session(context, public_only=public_only),
        )

    def _new_session(self, context: ssl.SSLContext | bool, *, public_only: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=256,
            limit_per_host=32,
            ttl_dns_cache=300,
            ssl=context,
            resolver=self._public if public_only else None,
        )
        trace = aiohttp.TraceConfig()
        trace.on_connection_queued_start.append(_queued)
        trace.on_connection_queued_end.append(_dequeued)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            # Bodies may be large and slow; per-phase timeouts are set per request.
            timeout=aiohttp.ClientTimeout(total=None),
            # Fetches are shared by every client: no upstream state may carry from one to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[trace],
        )

    async def close(self) -> None:
        """Close every session and its connections; safe to call twice."""
        self._closed = True
        pools = list(self._sessions.values())
        self._sessions.clear()
        try:
            await asyncio.gather(*(p.close() for p in pools))
        finally:
            await self._public.close()

    async def _session(self, channel: ChannelConfig, *, own: bool, public_only: bool) -> _Pools:
        # Another origin trusts what the channel trusts, but never sees its client certificate.
        identity = channel.tls if own else TlsIdentity(channel.ca_bundle)
        key = (identity, public_only)
        if (pools := self._sessions.get(key)) is not None:
            return pools
        async with self._building:
            if (pools := self._sessions.get(key)) is not None:
                return pools
            if self._closed:
                raise UpstreamUnavailable("the proxy is shutting down")
            context: ssl.SSLContext | bool = True  # aiohttp's verifying default context
            if not identity.is_default:
                loop = asyncio.get_running_loop()
                try:
                    # Reads certificate files: off the loop, and once per identity.
                    context = await loop.run_in_executor(None, build_context, identity)
                except TlsSetupError as exc:
                    raise UpstreamUnavailable(f"TLS setup of channel {channel.name} failed: {exc}") from exc
            pools = self._sessions[key] = self._new_pools(context, public_only=public_only)
            return pools

    async def open(
        self,
        channel: ChannelConfig,
        where: str,
        validators: Validators | None = None,
        *,
        method: str = "GET",
        metadata: bool = False,
    ) -> tuple[aiohttp.ClientResponse, str]:
        """GET where (a path on the channel, or a URL its metadata named): response and redacted URL.

        The response is a 200 or 304 with its body unread. A path is asked of the channel's
        mirrors in turn: connect errors, timeouts before headers and 5xx move on to the next;
        404 and other 4xx do not (the file is missing, or refused, wherever it is asked for).
        method="HEAD" asks for the headers only; metadata=True (repodata, shard indexes, shards)
        uses the connection pool that package downloads never occupy.
        """
        conditional = _conditional(validators)
        how = _How(method, metadata)
        try:
            located = locate(channel, where)
        except ValueError:
            raise UpstreamUnavailable("upstream metadata names a malformed URL") from None
        if isinstance(located, URL):
            return await self._get(channel, located, conditional, how)
        failures: list[tuple[str, UpstreamError]] = []
        order = self.mirrors.order(channel)
        for index, base in enumerate(order):
            try:
                url = URL(unit_url(base, located, channel.token))
                resp, served = await self._get(channel, url, conditional, how)
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                failures.append((redacted_url(base), exc))
                if index + 1 < len(order):
                    log.warning("%s: mirror %s failed (%s); trying the next", channel.name, base, exc.reason)
                continue
            self.mirrors.remember(channel, base)
            return resp, served
        raise _all_failed(failures)

    async def probe(self, channel: ChannelConfig, path: str) -> tuple[int, str]:
        """(status, Content-Type) of HEAD path on the channel, a redirect answered, not followed.

        An upstream refusing HEAD (405, 501) is asked for one byte instead. Mirrors are tried
        in turn as by open(); UpstreamError when none of them answers (or all answer 5xx).
        """
        failures: list[tuple[str, UpstreamError]] = []
        for base in self.mirrors.order(channel):
            url = URL(unit_url(base, path, channel.token))
            try:
                resp, _ = await self._get(channel, url, {}, _How("HEAD", True), follow=False)
                if resp.status in (405, 501):
                    resp.release()
                    one_byte = {"Range": "bytes=0-0"}
                    resp, _ = await self._get(channel, url, one_byte, _How("GET", True), follow=False)
                resp.release()  # a GET answered 200 is not read: the connection is dropped instead
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                failures.append((redacted_url(base), exc))
                continue
            if resp.status >= 500:
                failures.append((redacted_url(base), UpstreamUnavailable(f"upstream answered {resp.status}")))
                continue
            return resp.status, resp.headers.get("Content-Type", "")
        raise _all_failed(failures)

    async def _get(
        self,
        channel: ChannelConfig,
        url: URL,
        conditional: dict[str, str],
        how: _How,
        *,
        follow: bool = True,
    ) -> tuple[aiohttp.ClientResponse, str]:
        """Ask for url, following allowed redirects (follow=False: any status, as answered).

        Credentials and the client certificate go only to the channel's own origins; other
        origins, the channel's metadata naming them or a redirect, only where redirects.py allows.
        """
        bases = [URL(u) for u in channel.urls]
        trusted = [URL(u) for u in channel.trusted_origins]
        credentials = dict([channel.header]) if channel.header else {}
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=channel.connect_timeout, sock_read=channel.read_timeout
        )
        target = url
        hint = ""  # for a connection closed during the handshake: TLS 1.3 reports no reason
        try:
            # Connecting and the wait for headers, redirects included; not the wait for a pooled
            # connection (_PoolWait), which only says our own downloads keep the pool busy.
            async with asyncio.timeout(channel.connect_timeout) as deadline:
                pool_wait = _PoolWait(deadline)
                for hop in range(MAX_REDIRECTS + 1):
                    own = any(same_origin(base, target) for base in bases)
                    allowed = own or any(same_origin(origin, target) for origin in trusted)
                    if not allowed and (why := refusal(target)) is not None:
                        said = "upstream redirect to" if hop else "upstream metadata names"
                        raise UpstreamUnavailable(f"{said} {why}: refused (see trusted_origins)")
                    bare = own and target.scheme == "https" and channel.client_cert is None
                    hint = " (it may require a client certificate: see client_cert)" if bare else ""
                    pools = await self._session(channel, own=own, public_only=not allowed)
                    headers = {**conditional, **credentials} if own else conditional
                    resp = await pools.pick(how.metadata).request(
                        how.method,
                        target,
                        headers=headers,
                        timeout=timeout,
                        allow_redirects=False,
                        trace_request_ctx=pool_wait,
                    )
                    if not follow or resp.status not in REDIRECT_STATUSES:
                        break
                    location = resp.headers.get("Location")
                    resp.release()
                    target = _redirect_target(resp.status, target, location)
                else:
                    raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} upstream redirects")
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            why = getattr(exc.certificate_error, "verify_message", None) or "untrusted certificate"
            raise UpstreamUnavailable(f"upstream certificate verify failed: {why}") from exc
        except aiohttp.ClientConnectorSSLError as exc:
            why = getattr(exc.os_error, "reason", None) or type(exc.os_error).__name__
            raise UpstreamUnavailable(f"TLS handshake with upstream failed: {why}{hint}") from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DisallowedAddress):
                raise UpstreamUnavailable(f"upstream location refused: {exc.os_error}") from exc
            raise UpstreamUnavailable(f"upstream unreachable: {exc.os_error.strerror or exc}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise UpstreamUnavailable(f"upstream closed the connection without answering{hint}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream error: {type(exc).__name__}") from exc
        return (check_status(resp) if follow else resp), redacted_url(target)


def _redirect_target(status: int, current: URL, location: str | None) -> URL:
    if not location:
        raise UpstreamUnavailable(f"upstream redirect without Location ({status})")
    try:
        return current.join(URL(location))
    except ValueError:
        raise UpstreamUnavailable(f"upstream redirect to a malformed Location ({status})") from None


def check_status(resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """Pass 200/304 through; map every other status to an UpstreamError (releasing resp)."""
    if resp.status in (200, 304):
        return resp
    resp.release()
    status = resp.status
    error: UpstreamError
    if status in (404, 410):
        error = UpstreamNotFound(f"not found upstream ({status})")
    elif 400 <= status < 500:
        error = UpstreamRefused(status, f"upstream refused the request ({status})")
    else:
        error = UpstreamUnavailable(f"upstream answered {status}")
    raise error
