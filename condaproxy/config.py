"""INI configuration → frozen dataclasses; every error names file, section and key."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

import platformdirs
import psutil  # psutil ships no type information

from condaproxy.errors import ConfigError
from condaproxy.inifile import Section, parse_ini
from condaproxy.tls import TlsIdentity, TlsSetupError, build_context

_CHANNEL_PREFIX = "channel:"
# Lowercase segments joined by "/", as anaconda.org names them ("pkgs/main",
# "conda-forge/label/dev"). Each segment starts with a letter or digit, so "." and
# ".." can never be a segment; ".." is refused anywhere as well, as it means nothing
# in a channel name and only invites path tricks upstream.
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*")
_TLS_KEYS = ("ca_bundle", "client_cert", "client_key")


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_data_dir("condaproxy"))


@dataclass(frozen=True)
class LazyConfig:
    """The streamer: where it listens and how long clients may cache immutable units."""

    streamer_port: int = 8751
    streamer_interface: tuple[str, ...] = ("lo",)
    streamer_cache_timeout: int = 86400


@dataclass(frozen=True)
class CacheConfig:
    """Where units are kept and how long repodata stays fresh."""

    directory: Path = field(default_factory=_default_cache_dir)
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


@dataclass(frozen=True)
class Config:
    """The whole configuration; build it with load_config() or default_config()."""

    lazy: LazyConfig
    cache: CacheConfig
    upstream: UpstreamConfig
    channels: Mapping[str, ChannelConfig] = field(default_factory=lambda: MappingProxyType({}))
    source: Path | None = None

    def __post_init__(self) -> None:
        # A frozen dataclass still hands out its dict; a proxy keeps channels read-only.
        if not isinstance(self.channels, MappingProxyType):
            object.__setattr__(self, "channels", MappingProxyType(dict(self.channels)))

    def channel(self, name: str) -> ChannelConfig | None:
        """The channel's configured section, else one under the default upstream if allowed."""
        configured = self.channels.get(name)
        if configured is not None:
            return configured
        # An invalid name must never be turned into an upstream URL, whoever asks.
        if not self.upstream.allow_unlisted or not is_channel_name(name):
            return None
        # anaconda.org labels live under their channel: <parent>/label/<label> follows the
        # parent's section (its mirrors, TLS and credentials), not the default upstream.
        parent, sep, label = name.rpartition("/label/")
        if sep and "/" not in label and (up_ch := self.channels.get(parent)) is not None:
            urls = tuple(f"{u}/label/{label}" for u in up_ch.urls)
            return replace(up_ch, name=name, url=urls[0], urls=urls, alternate_source=None)
        up = self.upstream
        return ChannelConfig(name, f"{up.default}/{name}", up.connect_timeout, up.read_timeout)


def is_channel_name(name: str) -> bool:
    """Whether name is a valid channel name such as "conda-forge" or "pkgs/main"."""
    return _CHANNEL_NAME.fullmatch(name) is not None and ".." not in name


# The keys each section accepts are the dataclass fields, so the two cannot drift apart.
_KEYS: dict[str, tuple[str, ...]] = {
    "lazy": tuple(f.name for f in fields(LazyConfig)),
    "cache": tuple(f.name for f in fields(CacheConfig)),
    "upstream": tuple(f.name for f in fields(UpstreamConfig)),
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
            message = "unknown section; expected [lazy], [cache], [upstream] or [channel:NAME]"
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
    return Config(lazy, cache, upstream, MappingProxyType(channels), source=path)


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
    )


def _cache(s: Section, base: Path) -> CacheConfig:
    d = CacheConfig(directory=base)
    return CacheConfig(
        directory=s.directory("directory", base, _default_cache_dir()),
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


def bind_addresses(interfaces: Sequence[str], *, source: Path | str | None = None) -> list[str]:
    """The IP addresses to listen on: IP literals as given, interface names resolved."""
    file = str(source) if source is not None else "<config>"

    def error(message: str) -> ConfigError:
        return ConfigError(file, "lazy", "streamer_interface", message)

    if not interfaces:
        raise error("expected at least one interface name or IP address")
    table: dict[str, list[str]] | None = None
    addresses: dict[str, None] = {}  # ordered set
    for item in interfaces:
        try:
            found = [str(ipaddress.ip_address(item))]
        except ValueError:
            table = _interface_addresses() if table is None else table
            if item not in table:
                known = ", ".join(sorted(table))
                message = f"{item!r} is neither an IP address nor a network interface here"
                raise error(f"{message} (interfaces: {known})") from None
            found = table[item]
            if not found:
                raise error(f"interface {item!r} has no IPv4 or IPv6 address") from None
        addresses.update(dict.fromkeys(found))
    return list(addresses)


def _interface_addresses() -> dict[str, list[str]]:
    """Each interface's IPv4 and IPv6 addresses, as psutil reports them now."""
    table: dict[str, list[str]] = {}
    for name, entries in psutil.net_if_addrs().items():
        table[str(name)] = [
            str(entry.address)
            for entry in entries
            # Link-local IPv6 carries a %scope and is of no use to conda clients.
            if entry.family in (socket.AF_INET, socket.AF_INET6) and "%" not in entry.address
        ]
    return table
