"""The configuration as frozen dataclasses: what each section means once it has been read."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import platformdirs
from cachetools import LRUCache

from condaproxy.conda.policy import Policy
from condaproxy.conda.rules import Rule
from condaproxy.config.tls import TlsIdentity

# Lowercase segments joined by "/", as anaconda.org names them ("pkgs/main",
# "conda-forge/label/dev"). Each segment starts with a letter or digit, so "." and
# ".." can never be a segment; ".." is refused anywhere as well, as it means nothing
# in a channel name and only invites path tricks upstream.
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def default_cache_dir() -> Path:
    return Path(platformdirs.user_data_dir("condaproxy"))


@dataclass(frozen=True)
class LazyConfig:
    """The streamer: where it listens, client cache lifetimes, bounds on clients, how it stops."""

    streamer_port: int = 8751
    streamer_interface: tuple[str, ...] = ("lo",)
    streamer_cache_timeout: int = 86400
    shutdown_grace: float = 20.0  # seconds from SIGTERM to exit (systemd's TimeoutStopSec is more)
    # Seconds a response body may make no progress (a client not reading) before it is cut off.
    send_timeout: float = 60.0
    # Cold fetches (upstream downloads or HEADs) one client address may have running; 0: no bound.
    max_cold_per_client: int = 64
    # Bytes of small blobs (shards, small packages) kept in memory for hits; 0: none.
    hot_cache: int = 64 * 1024 * 1024
    # Front proxies whose X-Forwarded-For / Forwarded name the client (addresses or networks).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    public_url: str | None = None  # what clients use to reach the proxy, for the /_setup page


@dataclass(frozen=True)
class CacheConfig:
    """Where units are kept and how long repodata stays fresh."""

    directory: Path = field(default_factory=default_cache_dir)
    repodata_ttl: int = 60
    negative_ttl: int = 30
    max_stale: int = 604800
    integrity_cooldown: int = 10
    persist_workers: int = 2
    max_size: int = 0  # bytes; 0 means unlimited
    evict_interval: float = 60.0
    pin: tuple[str, ...] = ()  # package file names or globs never evicted
    pin_lockfile: Path | None = None
    repodata_stale_while_revalidate: int = 0  # seconds past TTL served at once while revalidating
    scrub_interval: int = 0  # seconds between passes re-hashing every blob; 0 means never
    history: float = 90 * 86400.0  # seconds superseded repodata revisions are kept for views
    # The CPU pool (transcoding, digest learning, rewrites, hashing): its threads (0: half the
    # cores, at least two), the jobs that may queue behind them, and the derivations one client
    # address may have running at once.
    cpu_workers: int = 0
    cpu_queue: int = 8
    derivations_per_client: int = 4


@dataclass(frozen=True)
class StoreConfig:
    """Where blobs live: the cache directory (filesystem) or an S3 bucket shared by several nodes.

    No credentials here: S3 uses the standard AWS chain (environment, shared profile, role).
    """

    backend: str = "filesystem"  # filesystem | s3
    bucket: str = ""
    prefix: str = ""  # key prefix inside the bucket, "" or ending in "/"
    endpoint_url: str | None = None  # None: AWS
    region: str | None = None
    addressing_style: str = "auto"  # path | virtual | auto
    redirect: bool = False  # package/shard hits answer 302 to a presigned GET URL
    presign_ttl: int = 300
    local_cache: int = 0  # bytes of hot blobs kept on this node's disk; 0 = none
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    part_size: int = 16 << 20  # multipart part size; blobs up to this size are one PUT
    part_concurrency: int = 4  # parts of one upload in flight (and in memory) at once
    max_connections: int = 64  # the S3 client's connection pool
    persist_backlog: int = 1000  # verified downloads waiting for S3 to come back; past it, not stored
    persist_retry_max: float = 300.0  # longest wait between two tries of a persist

    @property
    def s3(self) -> bool:
        """Blobs live in S3."""
        return self.backend == "s3"


@dataclass(frozen=True)
class ChannelConfig:
    """One upstream channel: its base URLs (no trailing slash), timeouts, TLS and credentials."""

    name: str
    url: str  # the first (preferred) of urls
    connect_timeout: float
    read_timeout: float
    urls: tuple[str, ...] = ()  # mirrors, tried in order; () means (url,)
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # Secrets: kept out of repr() so that logging a ChannelConfig cannot leak them.
    token: str | None = field(default=None, repr=False)
    header: tuple[str, str] | None = field(default=None, repr=False)
    alternate_source: Path | None = None  # a local tree laid out like the channel (<subdir>/<file>)
    # Private: served only to clients whose own /t/<token>/ the upstream accepts for the channel.
    private: bool = False
    notice: str | None = None  # a CEP-6 notice the admin wants this channel's users to see
    notice_level: str = "info"  # info, warning or critical
    # Whether the config says `private` at all (yes or no): if not, the proxy may learn it is.
    private_configured: bool = False
    # Release cooldown: records younger than min_age seconds are kept from clients (0: none).
    min_age: float = 0.0
    min_age_exempt: tuple[str, ...] = ()  # package names or globs the cooldown spares
    min_age_unknown: str = "allow"  # records of unknown age: "allow" (as clients do) or "hold"
    indexed_timestamp: bool = False  # serve each record's effective time as CEP-47 indexed_timestamp
    # Origins ("scheme://host:port") the channel's metadata may name although they are not
    # public https hosts: an internal server holding its shards or packages, say.
    trusted_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))
        elif self.urls[0] != self.url:
            raise ValueError("ChannelConfig.url must be the first of its urls")

    @property
    def tls(self) -> TlsIdentity:
        """The TLS identity the channel's connections use."""
        return TlsIdentity(self.ca_bundle, self.client_cert, self.client_key)


@dataclass(frozen=True)
class UpstreamConfig:
    """The default upstream for channels without their own section."""

    default: str = "https://conda.anaconda.org"
    allow_unlisted: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    auth_ttl: float = 300.0  # seconds an upstream's "yes" to a client token is remembered
    # The release cooldown of channels without their own setting (see ChannelConfig).
    min_age: float = 0.0
    min_age_exempt: tuple[str, ...] = ()
    min_age_unknown: str = "allow"
    indexed_timestamp: bool = False
    # Token checks per minute (bursts of as many): per client address, and for all clients.
    auth_probe_rate: tuple[int, int] = (20, 300)


UNLISTED_KEPT = 1024


@dataclass(frozen=True)
class LogConfig:
    """Where log lines go and how they look."""

    format: str = "text"  # "text" or "json"
    access_log: Path | None = None  # None: stderr, with the other logs


@dataclass(frozen=True)
class AdminConfig:
    """The admin API: it exists only when a token file is configured."""

    token_file: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration; build it with load_config() or default_config()."""

    lazy: LazyConfig
    cache: CacheConfig
    upstream: UpstreamConfig
    channels: Mapping[str, ChannelConfig] = field(default_factory=lambda: MappingProxyType({}))
    source: Path | None = None
    rules: tuple[Rule, ...] = ()  # [policy] and [policy:NAME]: hide and deny rules
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    # Unlisted channels' sections, made once per name rather than per request (bounded: names
    # come from clients).
    _unlisted: LRUCache[str, ChannelConfig] = field(
        default_factory=lambda: LRUCache(maxsize=UNLISTED_KEPT), init=False, repr=False, compare=False
    )
    _policies: LRUCache[tuple[object, ...], Policy] = field(
        default_factory=lambda: LRUCache(maxsize=UNLISTED_KEPT), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A frozen dataclass still hands out its dict; a proxy keeps channels read-only.
        if not isinstance(self.channels, MappingProxyType):
            object.__setattr__(self, "channels", MappingProxyType(dict(self.channels)))

    def channel(self, name: str) -> ChannelConfig | None:
        """The channel's configured section, else one under the default upstream if allowed."""
        configured = self.channels.get(name)
        if configured is not None:
            return configured
        made = self._unlisted.get(name)  # holds valid names only
        if made is None:
            # An invalid name must never be turned into an upstream URL, whoever asks.
            if not self.upstream.allow_unlisted or not is_channel_name(name):
                return None
            made = self._unlisted[name] = self._unlisted_channel(name)
        return made

    def _unlisted_channel(self, name: str) -> ChannelConfig:
        # anaconda.org labels live under their channel: <parent>/label/<label> follows the
        # parent's section (its mirrors, TLS and credentials), not the default upstream.
        parent, sep, label = name.rpartition("/label/")
        if sep and "/" not in label and (up_ch := self.channels.get(parent)) is not None:
            urls = tuple(f"{u}/label/{label}" for u in up_ch.urls)
            return replace(up_ch, name=name, url=urls[0], urls=urls, alternate_source=None)
        up = self.upstream
        return ChannelConfig(
            name,
            f"{up.default}/{name}",
            up.connect_timeout,
            up.read_timeout,
            min_age=up.min_age,
            min_age_exempt=up.min_age_exempt,
            min_age_unknown=up.min_age_unknown,
            indexed_timestamp=up.indexed_timestamp,
        )

    def policy(self, channel: ChannelConfig) -> Policy:
        """What the channel's clients may see and fetch: its cooldown and the rules in force for it."""
        # Asked on every request: made once per distinct set of what it depends on.
        key = (
            channel.name,
            channel.min_age,
            channel.min_age_exempt,
            channel.min_age_unknown,
            channel.indexed_timestamp,
        )
        made = self._policies.get(key)
        if made is None:
            made = self._policies[key] = self._make_policy(channel)
        return made

    def _make_policy(self, channel: ChannelConfig) -> Policy:
        return Policy(
            channel=channel.name,
            min_age=channel.min_age,
            exempt=channel.min_age_exempt,
            unknown_hold=channel.min_age_unknown == "hold",
            rules=tuple(r for r in self.rules if r.applies_to(channel.name)),
            stamp=channel.indexed_timestamp,
        )


def is_channel_name(name: str) -> bool:
    """Whether name is a valid channel name such as "conda-forge" or "pkgs/main"."""
    return _CHANNEL_NAME.fullmatch(name) is not None and ".." not in name
