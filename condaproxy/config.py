"""INI configuration → frozen dataclasses; every error names file, section and key."""

from __future__ import annotations

import configparser
import ipaddress
import math
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

import platformdirs
import psutil  # psutil ships no type information

from condaproxy.errors import ConfigError

_CHANNEL_PREFIX = "channel:"
# Lowercase segments joined by "/", as anaconda.org names them ("pkgs/main",
# "conda-forge/label/dev"). Each segment starts with a letter or digit, so "." and
# ".." can never be a segment; ".." is refused anywhere as well, as it means nothing
# in a channel name and only invites path tricks upstream.
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*")
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


@dataclass(frozen=True)
class ChannelConfig:
    """One upstream channel: its base URL (no trailing slash) and timeouts."""

    name: str
    url: str
    connect_timeout: float
    read_timeout: float


@dataclass(frozen=True)
class UpstreamConfig:
    """The default upstream for channels without their own section."""

    default: str = "https://conda.anaconda.org"
    allow_unlisted: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


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
    _CHANNEL_PREFIX: tuple(f.name for f in fields(ChannelConfig) if f.name != "name"),
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

    def get(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is not None and "\n" in value:
            # configparser joins indented lines onto the previous value.
            raise self.error(key, f"value spans several lines (is the next line indented?): {value!r}")
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
        try:
            parts = urlsplit(raw)
            valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
            valid = valid and (parts.port is None or parts.port > 0)  # .port raises if not a number
        except ValueError:
            valid = False
        if not valid:
            raise self.error(key, f"expected an http(s) URL with a host, got {raw!r}")
        if "?" in raw or "#" in raw or any(c.isspace() for c in raw):
            # Units are addressed by appending paths, which a query or fragment would break.
            raise self.error(key, f"expected a URL without query, fragment or spaces, got {raw!r}")
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
            channel = _channel(sec, name.removeprefix(_CHANNEL_PREFIX), upstream)
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
        # Zero workers would leave every download unpersisted.
        persist_workers=s.integer("persist_workers", d.persist_workers, minimum=1),
    )


def _upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    return UpstreamConfig(
        default=s.url("default", d.default),
        allow_unlisted=s.boolean("allow_unlisted", d.allow_unlisted),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout),
        read_timeout=s.seconds("read_timeout", d.read_timeout),
    )


def _channel(s: _Section, name: str, upstream: UpstreamConfig) -> ChannelConfig:
    if not is_channel_name(name):
        raise s.error(
            None,
            "expected [channel:NAME], NAME being lowercase segments "
            "[a-z0-9][a-z0-9._-]* joined by '/', without '..'",
        )
    return ChannelConfig(
        name=name,
        url=s.url("url", None),
        connect_timeout=s.seconds("connect_timeout", upstream.connect_timeout),
        read_timeout=s.seconds("read_timeout", upstream.read_timeout),
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
