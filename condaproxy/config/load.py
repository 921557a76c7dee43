"""Reading an INI configuration file into the frozen dataclasses; every error names file, section and key."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType

from condaproxy.conda.rules import Rule, parse_rule
from condaproxy.conda.when import parse_duration
from condaproxy.config.ini import Section, parse_ini
from condaproxy.config.model import (
    AdminConfig,
    CacheConfig,
    ChannelConfig,
    Config,
    LazyConfig,
    LogConfig,
    StoreConfig,
    UpstreamConfig,
    default_cache_dir,
    is_channel_name,
)
from condaproxy.config.tls import TlsIdentity, TlsSetupError, build_context
from condaproxy.errors import ConfigError

_CHANNEL_PREFIX = "channel:"
_POLICY = "policy"
_POLICY_PREFIX = "policy:"
_COOLDOWN_KEYS = ("min_age", "min_age_exempt", "min_age_unknown", "indexed_timestamp")
_TLS_KEYS = ("ca_bundle", "client_cert", "client_key")

# The keys each section accepts are the dataclass fields, so the two cannot drift apart.
_KEYS: dict[str, tuple[str, ...]] = {
    "lazy": tuple(f.name for f in fields(LazyConfig)),
    "cache": tuple(f.name for f in fields(CacheConfig)),
    "upstream": tuple(f.name for f in fields(UpstreamConfig)),
    "log": tuple(f.name for f in fields(LogConfig)),
    "admin": tuple(f.name for f in fields(AdminConfig)),
    "store": tuple(f.name for f in fields(StoreConfig)),
    _CHANNEL_PREFIX: tuple(
        f.name for f in fields(ChannelConfig) if f.name not in ("name", "urls", "private_configured")
    ),
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
    rules: list[Rule] = []
    for name in parser.sections():
        if name == _POLICY or name.startswith(_POLICY_PREFIX):
            rules += _rules(Section(file, name, parser[name]), name.removeprefix(_POLICY).removeprefix(":"))
            continue
        kind = _CHANNEL_PREFIX if name.startswith(_CHANNEL_PREFIX) else name
        if kind not in _KEYS:
            message = (
                "unknown section; expected [lazy], [cache], [store], [upstream], [log], [admin],"
                " [channel:NAME], [policy] or [policy:NAME]"
            )
            raise ConfigError(file, name, None, message)
        sections[name] = Section(file, name, parser[name])
        sections[name].check_keys(_KEYS[kind])

    def section(name: str) -> Section:
        return sections.get(name) or Section(file, name, {})

    lazy = _lazy(section("lazy"))
    log = LogConfig(
        format=section("log").choice("format", LogConfig.format, ("text", "json")),
        access_log=section("log").log_target("access_log", path.absolute().parent),
    )
    admin = AdminConfig(token_file=_token_file(section("admin"), path.absolute().parent))
    cache = _cache(section("cache"), path.absolute().parent)
    upstream = _upstream(section("upstream"))
    channels = {}
    for name, sec in sections.items():
        if name.startswith(_CHANNEL_PREFIX):
            channel = _channel(sec, name.removeprefix(_CHANNEL_PREFIX), upstream, path.absolute().parent)
            channels[channel.name] = channel
    store = _store(section("store"))
    return Config(
        lazy,
        cache,
        upstream,
        MappingProxyType(channels),
        source=path,
        rules=tuple(rules),
        log=log,
        admin=admin,
        store=store,
    )


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
        send_timeout=s.seconds("send_timeout", d.send_timeout),
        max_cold_per_client=s.integer("max_cold_per_client", d.max_cold_per_client),
        hot_cache=s.size("hot_cache", d.hot_cache),
        trusted_proxies=s.networks("trusted_proxies"),
        public_url=s.url("public_url", None) if s.get("public_url") else None,
    )


def _token_file(s: Section, base: Path) -> Path | None:
    raw = s.get("token_file")
    if not raw:
        return None  # the admin API does not exist
    path = base / Path(raw).expanduser()
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    # Under systemd (LoadCredential=admin.token:/etc/condaproxy/admin.token) the service's
    # transient user cannot read the file itself, only its credential copy of the same name.
    if creds and not os.access(path, os.R_OK) and os.access(Path(creds) / path.name, os.R_OK):
        return Path(creds) / path.name
    if not path.is_file():
        raise s.error("token_file", f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise s.error("token_file", f"not readable by this user: {path}")
    return path


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
        history=_duration(s, "history", d.history),
        cpu_workers=s.integer("cpu_workers", d.cpu_workers),
        cpu_queue=s.integer("cpu_queue", d.cpu_queue),
        derivations_per_client=s.integer("derivations_per_client", d.derivations_per_client, minimum=1),
    )


def _duration(s: Section, key: str, default: float) -> float:
    raw = s.get(key)
    if raw is None:
        return default
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise s.error(key, str(exc)) from None


def _notice_level(s: Section) -> str:
    level = (s.get("notice_level") or "info").lower()
    if level not in ("info", "warning", "critical"):
        raise s.error("notice_level", f"expected info, warning or critical, got {level!r}")
    return level


def _cooldown(s: Section, inherited: UpstreamConfig | None) -> dict[str, object]:
    """min_age, min_age_exempt, min_age_unknown and indexed_timestamp, defaulting to inherited."""
    d = inherited or UpstreamConfig()
    unknown = s.get("min_age_unknown")
    if unknown is not None and unknown not in ("allow", "hold"):
        raise s.error("min_age_unknown", f"expected allow or hold, got {unknown!r}")
    return {
        "min_age": _duration(s, "min_age", d.min_age),
        "min_age_exempt": s.words("min_age_exempt")
        if s.get("min_age_exempt") is not None
        else d.min_age_exempt,
        "min_age_unknown": unknown or d.min_age_unknown,
        "indexed_timestamp": s.boolean("indexed_timestamp", d.indexed_timestamp),
    }


def _rules(s: Section, channel: str) -> list[Rule]:
    """[policy] (every channel) or [policy:NAME]: keys hide, deny, hide.RULE or deny.RULE; one
    MatchSpec per line."""
    if channel and not is_channel_name(channel):
        raise s.error(None, "expected [policy:NAME], NAME being a channel name")
    rules = []
    for key, raw in s.values.items():
        action, _, label = key.partition(".")
        if action not in ("hide", "deny"):
            raise s.error(key, "expected hide, deny, hide.NAME or deny.NAME")
        specs = [line.strip() for line in raw.splitlines() if line.strip()]
        if not specs:
            raise s.error(key, "expected a MatchSpec such as 'openssl <3' or '*-nightly'")
        for spec in specs:
            name = label or f"{action} {spec}"
            try:
                rules.append(parse_rule(name, action, spec, channel or None))
            except ValueError as exc:
                raise s.error(key, str(exc)) from None
    return rules


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
        auth_probe_rate=s.rates("auth_probe_rate", d.auth_probe_rate),
        **_cooldown(s, None),  # type: ignore[arg-type]
    )


def _channel(s: Section, name: str, upstream: UpstreamConfig, base: Path) -> ChannelConfig:
    if not is_channel_name(name):
        raise s.error(
            None,
            "expected [channel:NAME], NAME being lowercase segments "
            "[a-z0-9][a-z0-9._-]* joined by '/', without '..'",
        )
    urls = s.urls("url")
    private = s.boolean("private", False)
    if private and (own := next((k for k in ("token", "header", "client_cert") if k in s.values), None)):
        # The admission check must show whether the upstream accepts the client's token; with
        # the proxy's own credentials beside it, the upstream would accept any token at all.
        raise s.error(
            own,
            "a private channel admits each client by its own /t/<token>/ alone; "
            f"remove {own}, or drop 'private' (the proxy's {own} would let any token in)",
        )
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
        private=private,
        private_configured=s.get("private") is not None,
        notice=s.get("notice"),
        notice_level=_notice_level(s),
        trusted_origins=s.origins("trusted_origins"),
        **_cooldown(s, upstream),  # type: ignore[arg-type]
    )
