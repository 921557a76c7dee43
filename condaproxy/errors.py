"""The project's exceptions; foreign errors are translated into these at the boundary."""

from __future__ import annotations


class CondaproxyError(Exception):
    """Base class of every error condaproxy raises on purpose; status is what a client gets."""

    status = 500


class ConfigError(CondaproxyError):
    """A configuration file, section, key or value is wrong."""

    def __init__(self, file: str, section: str | None, key: str | None, message: str) -> None:
        self.file = file
        self.section = section
        self.key = key
        self.message = message
        where = file
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class UpstreamError(CondaproxyError):
    """The upstream could not give us the unit; carries the status to answer with."""

    status = 502

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UpstreamUnavailable(UpstreamError):
    """Connection refused, reset, DNS failure or 5xx from the upstream."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (or stalled) within the configured timeout."""

    status = 504


class UpstreamNotFound(UpstreamError):
    """The upstream answered 404 (or 410)."""

    status = 404


class UpstreamRefused(UpstreamError):
    """The upstream answered another 4xx (401, 403, ...): passed on as it is."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class IntegrityError(CondaproxyError):
    """Downloaded bytes do not match the channel's own metadata (size or sha256)."""

    status = 502


class TruncatedError(UpstreamUnavailable):
    """The upstream body ended before its declared length, or broke midway."""


class CacheDiskError(CondaproxyError):
    """The cache's disk refused a write (full, over quota, failing): relayed, not cached."""

    status = 503


class RefusedDocument(CondaproxyError, ValueError):
    """A document past a bound set for reading it (nesting, work, size, objects): never parsed on.

    reason is a short label for metrics: depth, work, token, inflated or objects.
    """

    status = 502

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Overloaded(CondaproxyError):
    """Too much CPU work is queued, or this client started enough of it: try again shortly."""

    status = 503


class CatalogBusy(CondaproxyError):
    """SQLite stayed locked beyond its timeout."""

    status = 503


class DownloadAbandoned(CondaproxyError):
    """A download that could never be cached lost its last reader, and was stopped."""

    status = 503


class ClientStalled(CondaproxyError):
    """A client accepted no response bytes for send_timeout seconds: its response is cut off."""


class StoreError(CondaproxyError):
    """The blob store failed an operation; not worth retrying as it is (see StoreUnavailable)."""

    status = 503


class StoreUnavailable(StoreError):
    """The blob store (S3) could not be reached, stalled or answered with an error: try later."""


class BlobDamaged(StoreError):
    """A stored blob is missing or not the size its catalog row says: drop the row, fetch again."""
