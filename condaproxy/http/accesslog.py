"""The access log: one line per response, with tokens and credentials redacted (rule 9)."""

from __future__ import annotations

import logging
import re

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse

from condaproxy.conda.paths import Rejection, parse_path
from condaproxy.http.operations import CLIENT, HEAD_SENT, STARTED

# Every /t/<token> segment pair, not only a leading one: a client may send several (refused,
# but logged), or a token with no path after it.
_TOKEN = re.compile(r"/t/[^/]*")


def redact(path: str) -> str:
    """Replace every /t/<token> so tokens never reach a log line."""
    return _TOKEN.sub("/t/<redacted>", path)


_UPSTREAM_WAITS = frozenset({"MISS", "COLLAPSED", "REVALIDATED"})


class AccessLogger(AbstractAccessLogger):
    """client "METHOD path" status bytes X-Cache seconds; never headers, never the query.

    The record also carries the line's fields (record.access) for the JSON formatter: time,
    client, method, path, status, bytes, duration, x_cache, upstream_time, channel, kind.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        """Write one access line."""
        client = request.get(CLIENT) or request.remote
        path = redact(request.rel_url.path)
        # sendfile bypasses body_length: the declared length is what went out.
        nbytes = response.content_length if response.content_length is not None else response.body_length
        xcache = response.headers.get("X-Cache", "-")
        started, head_sent = request.get(STARTED), request.get(HEAD_SENT)
        upstream = None
        if xcache in _UPSTREAM_WAITS and started is not None and head_sent is not None:
            upstream = round(max(0.0, head_sent - started), 6)  # the wait before the head went out
        parsed = parse_path(request.raw_path)
        key = None if isinstance(parsed, Rejection) else parsed.key
        fields = {
            "client": client,
            "method": request.method,
            "path": path,
            "status": response.status,
            "bytes": nbytes,
            "duration": round(time, 6),
            "x_cache": xcache,
            "upstream_time": upstream,
            "channel": key.channel if key else None,
            "kind": key.kind.value if key else None,
        }
        self.logger.info(
            '%s "%s %s" %d %s %s %.3f',
            client,
            request.method,
            path,
            response.status,
            nbytes,
            xcache,
            time,
            extra={"access": fields},
        )

    @property
    def enabled(self) -> bool:
        """Only format lines someone will read."""
        return self.logger.isEnabledFor(logging.INFO)


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs a malformed request as an error whose traceback quotes the request's bytes:
    tokens in /t/<token>/ paths, Authorization values (rule 9), and a flood of tracebacks
    under attack. Such a record becomes one line naming the parser's complaint, not its input.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite records about HttpProcessingError; let every other record through."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s"
            record.args = (remote, type(exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
