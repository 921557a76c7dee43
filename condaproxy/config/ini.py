"""Reading an INI file: sections with typed getters whose errors name file, section and key."""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from condaproxy.errors import ConfigError

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


class Section:
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

    def rates(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        """Two counts per minute, such as "20 300" or "20, 300": per client, then overall."""
        raw = self.get(key)
        if raw is None:
            return default
        items = [item for item in _URL_SEPARATORS.split(raw) if item]
        if len(items) != 2 or not all(i.isascii() and i.isdigit() and int(i) >= 1 for i in items):
            message = "expected two integers >= 1 (per minute: per client address, then overall)"
            raise self.error(key, f"{message}, e.g. '20 300', got {raw!r}")
        return int(items[0]), int(items[1])

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

    def origins(self, key: str) -> tuple[str, ...]:
        """Origins as scheme://host[:port] (lowercase), separated by whitespace and/or commas."""
        raw = self.values.get(key)  # like urls: the list may go on over indented lines
        found: dict[str, None] = {}
        for item in (item for item in _URL_SEPARATORS.split(raw or "") if item):
            parts = urlsplit(self._checked_url(key, item))
            if parts.path:
                message = f"expected origins (scheme://host or scheme://host:port), not a path: {item!r}"
                raise self.error(key, message)
            host = parts.hostname or ""
            host = f"[{host}]" if ":" in host else host
            found[f"{parts.scheme.lower()}://{host}" + (f":{parts.port}" if parts.port else "")] = None
        return tuple(found)

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

    def directory(self, key: str, base: Path, default: Path) -> Path:
        raw = self.get(key)
        if raw is None:
            return default
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

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        raw = self.get(key)
        if raw is None:
            return default
        if raw not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw

    def networks(self, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        raw = self.get(key)
        items = [w for w in _URL_SEPARATORS.split(raw or "") if w]
        nets = []
        for item in items:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                message = f"expected IP addresses or networks (10.0.0.0/8), got {item!r}"
                raise self.error(key, message) from None
        return tuple(dict.fromkeys(nets))

    def log_target(self, key: str, base: Path) -> Path | None:
        raw = self.get(key)
        if raw is None or raw == "stderr":
            return None
        if not raw:
            raise self.error(key, "expected stderr or a file path")
        path = base / Path(raw).expanduser()
        if not path.parent.is_dir():
            raise self.error(key, f"no such directory: {path.parent}")
        return path

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


def parse_ini(file: str, text: str) -> configparser.ConfigParser:
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
