"""INI configuration → frozen dataclasses; every error names file, section and key."""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

import platformdirs
import psutil  # psutil ships no type information

from condaproxy.errors import ConfigError
from condaproxy.tls import TlsIdentity, TlsSetupError, build_context

_CHANNEL_PREFIX = "channel:"
# Lowercase segments joined by "/", as anaconda.org names them ("pkgs/main",
# "conda-forge/label/dev"). Each segment starts with a letter or digit, so "." and
# ".." can never be a segment; ".." is refused anywhere as well, as it means nothing
# in a channel name and only invites path tricks upstream.
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*")
# Mirrors in a channel's url are separated by whitespace and/or commas.
_URL_SEPARATORS = re.compile(r"[\s,]+")
# Unreserved URL characters (RFC 3986 2.3): a token must survive as one path segment unchanged.
_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.1 token
# Headers that frame or condition the upstream request: configuring them would break fetches.
_RESERVED_HEADERS = frozenset(
    {
        *("host", "content-length", "transfer-encoding", "connection", "keep-alive", "te"),
        *("trailer", "upgrade", "range", "if-range", "if-none-match", "if-modified-since"),
        *("if-match", "if-unmodified-since", "accept-encoding", "user-agent"),
    }
)
_TLS_KEYS = ("ca_bundle", "client_cert", "client_key")
_SIZE = re.compile(r"([0-9]+)\s*([KMGTkmgt]?)")  # powers of 1024
_PIN = re.compile(r"[A-Za-z0-9_+!*?\[\]][A-Za-z0-9._+!*?\[\]-]*")
_BOOLEANS = {
    "yes": True,
    "true": True,
    "on": True,
    "1": True,
    "no": False,
    "false": False,
    "off": False,
    "0": False,
}


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


class _Section:
    """One section's raw values with typed getters whose errors name file, section and key."""

    def __init__(self, file: str, name: str, values: Mapping[str, str]) -> None:
        self.file = file
        self.name = name
        self.values = dict(values)

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.file, self.name, key, message)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.values:
            if key not in allowed:
                raise self.error(key, f"unknown key; allowed keys: {', '.join(allowed)}")

    def get(self, key: str, *, secret: bool = False) -> str | None:
        value = self.values.get(key)
        if value is not None and "\n" in value:
            # configparser joins indented lines onto the previous value.
            shown = "" if secret else f": {value!r}"
            raise self.error(key, f"value spans several lines (is the next line indented?){shown}")
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.get(key)
        if raw is None:
            return default
        wanted = f"an integer >= {minimum}"
        if maximum is not None:
            wanted = f"an integer from {minimum} to {maximum}"
        # isdigit() alone would accept "²"; int() alone would accept "1_000" and "+5".
        if not (raw.isascii() and raw.isdigit()):
            raise self.error(key, f"expected {wanted}, got {raw!r}")
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            raise self.error(key, f"expected {wanted}, got {raw!r}")
        return value

    def seconds(self, key: str, default: float) -> float:
        raw = self.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, f"expected a positive number of seconds, got {raw!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self.get(key)
        if raw is None:
            return default
        try:
            return _BOOLEANS[raw.lower()]
        except KeyError:
            raise self.error(key, f"expected yes/no, true/false, on/off or 1/0, got {raw!r}") from None

    def url(self, key: str, default: str | None) -> str:
        raw = self.get(key)
        if raw is None:
            if default is None:
                raise self.error(key, "missing; expected the channel's base URL")
            return default
        return self._checked_url(key, raw)

    def urls(self, key: str) -> tuple[str, ...]:
        # Not get(): a list of mirrors may go on over indented lines.
        raw = self.values.get(key)
        if raw is None:
            raise self.error(key, "missing; expected the channel's base URL")
        items = [item for item in _URL_SEPARATORS.split(raw) if item]
        if not items:
            raise self.error(key, "missing; expected the channel's base URL")
        try:
            return tuple(dict.fromkeys(self._checked_url(key, item) for item in items))  # drop repeats
        except ConfigError as exc:
            if "\n" not in raw:
                raise
            raise self.error(key, f"{exc.message} (is the next line indented?)") from None

    def _checked_url(self, key: str, raw: str) -> str:
        # Never echoed if it may hold a user and password: credentials have keys of their own.
        shown = "" if "@" in raw else f", got {raw!r}"
        try:
            parts = urlsplit(raw)
        except ValueError:
            raise self.error(key, f"expected an http(s) URL with a host{shown}") from None
        if "@" in parts.netloc:
            message = "expected a URL without user or password; use [channel:NAME] token or header"
            raise self.error(key, message)
        try:
            valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
            valid = valid and (parts.port is None or parts.port > 0)  # .port raises if not a number
        except ValueError:
            valid = False
        if not valid:
            raise self.error(key, f"expected an http(s) URL with a host{shown}")
        if "?" in raw or "#" in raw or any(c.isspace() for c in raw):
            # Units are addressed by appending paths, which a query or fragment would break.
            raise self.error(key, f"expected a URL without query, fragment or spaces{shown}")
        return raw.rstrip("/")

    def interfaces(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.get(key)
        if raw is None:
            return default
        items = [item.strip() for item in raw.split(",")]
        if not any(items):
            raise self.error(key, "expected at least one interface name or IP address")
        if not all(items):
            raise self.error(key, f"empty item in comma-separated list {raw!r}")
        return tuple(dict.fromkeys(items))  # drop repeats, keep order

    def directory(self, key: str, base: Path) -> Path:
        raw = self.get(key)
        if raw is None:
            return _default_cache_dir()
        if not raw:
            raise self.error(key, "expected a directory path")
        # Relative to the config file, not to wherever the service happens to start.
        return base / Path(raw).expanduser()

    def size(self, key: str, default: int) -> int:
        raw = self.get(key)
        if raw is None:
            return default
        match = _SIZE.fullmatch(raw.strip())
        if match is None:
            raise self.error(key, f"expected a number of bytes, optionally with K, M, G or T, got {raw!r}")
        exponent = " KMGT".index((match[2] or " ").upper())
        return int(match[1]) << (10 * exponent)

    def words(self, key: str) -> tuple[str, ...]:
        raw = self.get(key)
        items = tuple(dict.fromkeys(w for w in _URL_SEPARATORS.split(raw or "") if w))
        for item in items:
            if not _PIN.fullmatch(item):
                raise self.error(key, f"expected package file names or globs such as numpy-*, got {item!r}")
        return items

    def existing_directory(self, key: str, base: Path) -> Path | None:
        raw = self.get(key)
        if raw is None:
            return None
        path = base / Path(raw).expanduser()  # relative to the config file, like directory
        if not raw or not path.is_dir():
            raise self.error(key, f"not a directory: {path}")
        return path

    def readable_file(self, key: str, base: Path) -> Path | None:
        raw = self.get(key)
        if raw is None:
            return None
        if not raw:
            raise self.error(key, "expected a file path")
        # Relative to the config file, like [cache] directory.
        path = base / Path(raw).expanduser()
        if not path.exists():
            raise self.error(key, f"no such file: {path}")
        if not path.is_file():
            raise self.error(key, f"not a regular file: {path}")
        if not os.access(path, os.R_OK):
            raise self.error(key, f"not readable by this user: {path}")
        return path

    def token(self, key: str) -> str | None:
        raw = self.get(key, secret=True)
        if raw is None:
            return None
        # The token becomes a path segment (/t/<token>/); the value is never echoed.
        if not _TOKEN.fullmatch(raw):
            raise self.error(key, "expected letters, digits, '.', '_', '~' and '-' only (value not shown)")
        return raw

    def header(self, key: str) -> tuple[str, str] | None:
        raw = self.get(key, secret=True)
        if raw is None:
            return None
        name, colon, value = raw.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.fullmatch(name):
            message = "expected 'Name: value', e.g. 'Authorization: Bearer ...' (value not shown)"
            raise self.error(key, message)
        if name.lower() in _RESERVED_HEADERS:
            raise self.error(key, f"{name} is set by the proxy itself and cannot be configured")
        if not value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise self.error(key, f"{name}: expected a non-empty value without control characters")
        return name, value


def _parse_ini(file: str, text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        empty_lines_in_values=False,
        # [DEFAULT] would silently leak its keys into every section; with the default
        # section renamed to something unwritable, [DEFAULT] is merely an unknown section.
        default_section="\0",
    )
    lines = text.splitlines()

    def line(lineno: int) -> str:
        return lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""

    try:
        parser.read_string(text, source=file)
    except configparser.MissingSectionHeaderError as exc:
        message = f"line {exc.lineno}: {line(exc.lineno)!r} comes before any [section]"
        raise ConfigError(file, None, None, message) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(file, exc.section, None, f"line {exc.lineno}: section appears twice") from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(file, exc.section, exc.option, f"line {exc.lineno}: key appears twice") from None
    except configparser.ParsingError as exc:
        lineno = exc.errors[0][0]
        message = f"line {lineno}: expected 'key = value' or [section], got {line(lineno)!r}"
        raise ConfigError(file, None, None, message) from None
    return parser


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
    parser = _parse_ini(file, text)

    sections: dict[str, _Section] = {}
    for name in parser.sections():
        kind = _CHANNEL_PREFIX if name.startswith(_CHANNEL_PREFIX) else name
        if kind not in _KEYS:
            message = "unknown section; expected [lazy], [cache], [upstream] or [channel:NAME]"
            raise ConfigError(file, name, None, message)
        sections[name] = _Section(file, name, parser[name])
        sections[name].check_keys(_KEYS[kind])

    def section(name: str) -> _Section:
        return sections.get(name) or _Section(file, name, {})

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


def _lazy(s: _Section) -> LazyConfig:
    d = LazyConfig()
    return LazyConfig(
        streamer_port=s.integer("streamer_port", d.streamer_port, minimum=1, maximum=65535),
        streamer_interface=s.interfaces("streamer_interface", d.streamer_interface),
        streamer_cache_timeout=s.integer("streamer_cache_timeout", d.streamer_cache_timeout),
    )


def _cache(s: _Section, base: Path) -> CacheConfig:
    d = CacheConfig(directory=base)
    return CacheConfig(
        directory=s.directory("directory", base),
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


def _upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    return UpstreamConfig(
        default=s.url("default", d.default),
        allow_unlisted=s.boolean("allow_unlisted", d.allow_unlisted),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout),
        read_timeout=s.seconds("read_timeout", d.read_timeout),
        auth_ttl=s.seconds("auth_ttl", d.auth_ttl),
    )


def _channel(s: _Section, name: str, upstream: UpstreamConfig, base: Path) -> ChannelConfig:
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
