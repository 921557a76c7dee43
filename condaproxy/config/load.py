"""Reading an INI configuration file into the frozen dataclasses; every error names file, section and key."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType

from condaproxy.config.ini import Section, parse_ini
from condaproxy.config.model import (
    CacheConfig,
    ChannelConfig,
    Config,
    LazyConfig,
    StoreConfig,
    UpstreamConfig,
    default_cache_dir,
    is_channel_name,
)
from condaproxy.config.tls import TlsIdentity, TlsSetupError, build_context
from condaproxy.errors import ConfigError

_CHANNEL_PREFIX = "channel:"
_TLS_KEYS = ("ca_bundle", "client_cert", "client_key")

# The keys each section accepts are the dataclass fields, so the two cannot drift apart.
_KEYS: dict[str, tuple[str, ...]] = {
    "lazy": tuple(f.name for f in fields(LazyConfig)),
    "cache": tuple(f.name for f in fields(CacheConfig)),
    "upstream": tuple(f.name for f in fields(UpstreamConfig)),
    "store": tuple(f.name for f in fields(StoreConfig)),
    _CHANNEL_PREFIX: tuple(f.name for f in fields(ChannelConfig) if f.name not in ("name", "urls")),
}


def load_config(path: Path | str) -> Config:
    """Read and validate an INI configuration file."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(file, None, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(file, None, None, f"cannot read: {exc.strerror or exc}") from None
    parser = parse_ini(file, text)

    sections: dict[str, Section] = {}
    for name in parser.sections():
        kind = _CHANNEL_PREFIX if name.startswith(_CHANNEL_PREFIX) else name
        if kind not in _KEYS:
            message = "unknown section; expected [lazy], [cache], [store], [upstream] or [channel:NAME]"
            raise ConfigError(file, name, None, message)
        sections[name] = Section(file, name, parser[name])
        sections[name].check_keys(_KEYS[kind])

    def section(name: str) -> Section:
        return sections.get(name) or Section(file, name, {})

    lazy = _lazy(section("lazy"))
    cache = _cache(section("cache"), path.absolute().parent)
    upstream = _upstream(section("upstream"))
    channels = {}
    for name, sec in sections.items():
        if name.startswith(_CHANNEL_PREFIX):
            channel = _channel(sec, name.removeprefix(_CHANNEL_PREFIX), upstream, path.absolute().parent)
            channels[channel.name] = channel
    store = _store(section("store"))
    return Config(lazy, cache, upstream, MappingProxyType(channels), source=path, store=store)


def default_config(directory: Path | None = None) -> Config:
    """The built-in defaults, optionally with another cache directory."""
    cache = CacheConfig() if directory is None else CacheConfig(directory=directory)
    return Config(LazyConfig(), cache, UpstreamConfig())


def _lazy(s: Section) -> LazyConfig:
    d = LazyConfig()
    return LazyConfig(
        streamer_port=s.integer("streamer_port", d.streamer_port, minimum=1, maximum=65535),
        streamer_interface=s.interfaces("streamer_interface", d.streamer_interface),
        streamer_cache_timeout=s.integer("streamer_cache_timeout", d.streamer_cache_timeout),
        shutdown_grace=s.seconds("shutdown_grace", d.shutdown_grace),
    )


def _cache(s: Section, base: Path) -> CacheConfig:
    d = CacheConfig(directory=base)
    return CacheConfig(
        directory=s.directory("directory", base, default_cache_dir()),
        repodata_ttl=s.integer("repodata_ttl", d.repodata_ttl),
        negative_ttl=s.integer("negative_ttl", d.negative_ttl),
        max_stale=s.integer("max_stale", d.max_stale),
        integrity_cooldown=s.integer("integrity_cooldown", d.integrity_cooldown),
        repodata_stale_while_revalidate=s.integer(
            "repodata_stale_while_revalidate", d.repodata_stale_while_revalidate
        ),
        # Zero workers would leave every download unpersisted.
        persist_workers=s.integer("persist_workers", d.persist_workers, minimum=1),
        max_size=s.size("max_size", d.max_size),
        evict_interval=s.seconds("evict_interval", d.evict_interval),
        pin=s.words("pin"),
        pin_lockfile=s.readable_file("pin_lockfile", base) if s.get("pin_lockfile") else None,
        scrub_interval=s.integer("scrub_interval", d.scrub_interval),
    )


# S3 bucket names (AWS rules, which MinIO and Ceph follow): 3-63 of a-z 0-9 . -, ends alphanumeric.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_ONLY = tuple(f.name for f in fields(StoreConfig) if f.name != "backend")


def _store(s: Section) -> StoreConfig:
    d = StoreConfig()
    backend = s.get("backend") or d.backend
    if backend not in ("filesystem", "s3"):
        raise s.error("backend", f"expected filesystem or s3, got {backend!r}")
    if backend != "s3":
        for key in _S3_ONLY:
            if key in s.values:
                raise s.error(key, "applies to backend = s3 only")
        return d
    bucket = s.get("bucket")
    if not bucket:
        raise s.error("bucket", "missing; backend = s3 needs a bucket name")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise s.error("bucket", f"expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'), got {bucket!r}")
    prefix = (s.get("prefix") or "").strip()
    if prefix.startswith("/") or "//" in prefix or any(c.isspace() or ord(c) < 0x20 for c in prefix):
        raise s.error("prefix", f"expected a key prefix such as condaproxy/ (no leading '/'), got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    style = s.get("addressing_style") or d.addressing_style
    if style not in ("path", "virtual", "auto"):
        raise s.error("addressing_style", f"expected path, virtual or auto, got {style!r}")
    part_size = s.size("part_size", d.part_size)
    if not 5 << 20 <= part_size <= 5 << 30:
        raise s.error("part_size", "expected 5M to 5G (S3's limits for a part)")
    return StoreConfig(
        backend="s3",
        bucket=bucket,
        prefix=prefix,
        endpoint_url=s.url("endpoint_url", None) if s.get("endpoint_url") is not None else None,
        region=s.get("region") or None,
        addressing_style=style,
        redirect=s.boolean("redirect", d.redirect),
        # SigV4 presigned URLs live at most 7 days.
        presign_ttl=s.integer("presign_ttl", d.presign_ttl, minimum=1, maximum=604800),
        local_cache=s.size("local_cache", d.local_cache),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout),
        read_timeout=s.seconds("read_timeout", d.read_timeout),
        part_size=part_size,
        part_concurrency=s.integer("part_concurrency", d.part_concurrency, minimum=1, maximum=64),
        max_connections=s.integer("max_connections", d.max_connections, minimum=8),
        persist_backlog=s.integer("persist_backlog", d.persist_backlog),
        persist_retry_max=s.seconds("persist_retry_max", d.persist_retry_max),
    )


def _upstream(s: Section) -> UpstreamConfig:
    d = UpstreamConfig()
    return UpstreamConfig(
        default=s.url("default", d.default),
        allow_unlisted=s.boolean("allow_unlisted", d.allow_unlisted),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout),
        read_timeout=s.seconds("read_timeout", d.read_timeout),
        auth_ttl=s.seconds("auth_ttl", d.auth_ttl),
    )


def _channel(s: Section, name: str, upstream: UpstreamConfig, base: Path) -> ChannelConfig:
    if not is_channel_name(name):
        raise s.error(
            None,
            "expected [channel:NAME], NAME being lowercase segments "
            "[a-z0-9][a-z0-9._-]* joined by '/', without '..'",
        )
    urls = s.urls("url")
    tls = TlsIdentity(*(s.readable_file(key, base) for key in _TLS_KEYS))
    if tls.client_key is not None and tls.client_cert is None:
        raise s.error("client_key", "given without client_cert")
    if not tls.is_default:
        if not any(u.lower().startswith("https:") for u in urls):
            key = "ca_bundle" if tls.ca_bundle is not None else "client_cert"
            raise s.error(key, "applies to https URLs only, and url lists none")
        try:
            # Loaded once here so a bad bundle, a key not matching its certificate or an
            # encrypted key is a configuration error, not a failure at the first request.
            build_context(tls)
        except TlsSetupError as exc:
            raise s.error(exc.key, exc.message) from None
    return ChannelConfig(
        name=name,
        url=urls[0],
        connect_timeout=s.seconds("connect_timeout", upstream.connect_timeout),
        read_timeout=s.seconds("read_timeout", upstream.read_timeout),
        urls=urls,
        ca_bundle=tls.ca_bundle,
        client_cert=tls.client_cert,
        client_key=tls.client_key,
        token=s.token("token"),
        header=s.header("header"),
        alternate_source=s.existing_directory("alternate_source", base),
        private=s.boolean("private", False),
    )
