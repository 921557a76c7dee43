"""Prometheus metrics, one registry per application (no global state shared between apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The counters condaproxy keeps; exposed at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter(
            "condaproxy_responses", "Responses by X-Cache outcome and status", ["cache", "status"], registry=r
        )
        self.upstream_fetches = Counter(
            "condaproxy_upstream_fetches", "Upstream fetches started, by unit kind", ["kind"], registry=r
        )
        self.upstream_failures = Counter(
            "condaproxy_upstream_failures", "Upstream fetches that failed, by reason", ["reason"], registry=r
        )
        self.integrity_failures = Counter(
            "condaproxy_integrity_failures", "Downloads discarded for a size/sha256 mismatch", registry=r
        )
        self.unverified = Counter(
            "condaproxy_unverified",
            "Packages served but not cached: no digest in channel metadata",
            registry=r,
        )
        self.persisted = Counter(
            "condaproxy_persisted", "Units moved into the blob store", ["kind"], registry=r
        )
        self.persist_failures = Counter(
            "condaproxy_persist_failures", "Verified downloads that could not be stored", registry=r
        )
        self.bytes_upstream = Counter(
            "condaproxy_upstream_bytes", "Body bytes received from upstreams", registry=r
        )
        self.inflight = Gauge("condaproxy_inflight", "Downloads in flight", registry=r)
        self.spool_failures = Counter(
            "condaproxy_spool_failures",
            "Downloads the cache disk could not hold (ENOSPC...): relayed to attached clients, not cached",
            registry=r,
        )
        self.scrub_purged = Counter(
            "condaproxy_scrub_purged", "Units dropped by the scrub: their blob no longer matched", registry=r
        )
        self.refused_documents = Counter(
            "condaproxy_refused_documents",
            "Documents refused once and never read again: past a nesting, work, size or object bound",
            ["reason"],
            registry=r,
        )
        self.cpu_jobs = Gauge(
            "condaproxy_cpu_jobs", "CPU jobs admitted to the CPU pool (running or queued there)", registry=r
        )
        self.cpu_waiting = Gauge(
            "condaproxy_cpu_waiting", "CPU jobs waiting for room in the CPU pool's queue", registry=r
        )
        self.overloaded = Counter(
            "condaproxy_overloaded",
            "Derivations refused with 503: the CPU pool's queue was full (pool), or the client had "
            "enough running (client)",
            ["reason"],
            registry=r,
        )

        self.policy_held = Gauge(
            "condaproxy_policy_held",
            "Records the release cooldown holds back from the index now, by channel",
            ["channel"],
            registry=r,
        )
        self.policy_next_release = Gauge(
            "condaproxy_policy_next_release_timestamp_seconds",
            "When the next held record of a channel comes of age (Unix time)",
            ["channel"],
            registry=r,
        )
        self.policy_hidden = Gauge(
            "condaproxy_policy_hidden",
            "Records a hide rule keeps out of the index now, by channel and rule",
            ["channel", "rule"],
            registry=r,
        )
        self.policy_refused = Counter(
            "condaproxy_policy_refused",
            "Package requests refused with 403 by the cooldown or a rule",
            ["channel", "reason"],
            registry=r,
        )
        self.persist_queued = Gauge(
            "condaproxy_persist_queue_depth",
            "Verified downloads waiting for a persist worker",
            registry=r,
        )
        self.persist_backlog = Gauge(
            "condaproxy_persist_backlog_depth",
            "Verified downloads the store refused for now (S3 down or slow), tried again with backoff",
            registry=r,
        )
        self.persist_dropped = Counter(
            "condaproxy_persist_dropped",
            "Verified downloads served but not stored: the persist queue or backlog was full",
            registry=r,
        )
        self.store_read_failures = Counter(
            "condaproxy_store_read_failures",
            "Hits the blob store could not serve (S3 down, slow or damaged): fetched from upstream instead",
            registry=r,
        )
        self.adopted = Counter(
            "condaproxy_adopted",
            "Units found in the shared store (stored by another node) instead of fetched upstream",
            ["kind"],
            registry=r,
        )
        self.redirects = Counter(
            "condaproxy_store_redirects", "Hits answered with a redirect to a presigned URL", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
