"""What a lock file names: the package URLs (with their sha256 where given) of a pixi.lock, a
conda-lock.yml or an @EXPLICIT file, and the channels and specs of an environment.yml.

Pure: text in, records out. YAML is read with PyYAML's safe loader (its C loader when built):
a pixi.lock of a large workspace is megabytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LockfileError(ValueError):
    """The text is no lock file this module knows, or is malformed."""


@dataclass(frozen=True, slots=True)
class Locked:
    """One conda package a lock file names."""

    url: str
    sha256: str | None = None
    md5: str | None = None

    @property
    def filename(self) -> str:
        """The package file name (the URL's last segment)."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Lockfile:
    """A parsed lock file: its format and its conda packages (each URL once)."""

    format: str  # "pixi.lock", "conda-lock.yml", "explicit"
    packages: tuple[Locked, ...]
    skipped: int = 0  # entries that are not conda package URLs (pypi, source, file paths)


@dataclass(frozen=True)
class EnvironmentSpec:
    """An environment.yml: channels and conda specs to solve (pip entries are left out)."""

    name: str | None
    channels: tuple[str, ...]
    specs: tuple[str, ...]
    platforms: tuple[str, ...] = field(default=())


def parse(text: str) -> Lockfile | EnvironmentSpec:
    """Recognise and parse a lock file or environment.yml."""
    if any(line.strip() == "@EXPLICIT" for line in text.splitlines()):
        return parse_explicit(text)
    try:
        doc = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LockfileError(f"not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise LockfileError("not a pixi.lock, conda-lock.yml, @EXPLICIT file or environment.yml")
    if "environments" in doc and "packages" in doc:
        return _pixi(doc)
    if "package" in doc and "metadata" in doc:
        return _conda_lock(doc)
    if "dependencies" in doc:
        return _environment(doc)
    raise LockfileError("not a pixi.lock, conda-lock.yml, @EXPLICIT file or environment.yml")


def parse_explicit(text: str) -> Lockfile:
    """`conda list --explicit [--md5|--sha256]`: one URL a line after @EXPLICIT, `#hash` optional."""
    found: list[Locked] = []
    started = False
    skipped = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line == "@EXPLICIT":
            started = True
            continue
        if not started or not line or line.startswith("#"):
            continue
        url, _, digest = line.partition("#")
        url = url.strip()
        if not url.startswith(("http://", "https://")):
            skipped += 1
            continue
        digest = digest.strip().removeprefix("sha256:")
        sha = digest if _SHA256.fullmatch(digest) else None
        md5 = digest if _MD5.fullmatch(digest) else None
        found.append(Locked(url, sha, md5))
    return Lockfile("explicit", _unique(found), skipped)


def _pixi(doc: dict[str, Any]) -> Lockfile:
    """pixi.lock, versions 4 to 7: `packages` is a list; v6 on name conda URLs `conda:`, v4-5 `url:`."""
    version = doc.get("version")
    if not isinstance(version, int) or not 4 <= version <= 7:
        raise LockfileError(f"pixi.lock version {version!r} is not supported (4 to 7 are)")
    packages = doc.get("packages")
    if not isinstance(packages, list):
        raise LockfileError("pixi.lock: 'packages' is not a list")
    found: list[Locked] = []
    skipped = 0
    for entry in packages:
        if not isinstance(entry, dict):
            raise LockfileError("pixi.lock: a package entry is not a mapping")
        url = (
            entry.get("conda") if version >= 6 else entry.get("url") if entry.get("kind") == "conda" else None
        )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            skipped += 1  # pypi packages, source packages (paths)
            continue
        found.append(Locked(url, _digest(entry.get("sha256"), _SHA256), _digest(entry.get("md5"), _MD5)))
    return Lockfile("pixi.lock", _unique(found), skipped)


def _conda_lock(doc: dict[str, Any]) -> Lockfile:
    """conda-lock.yml (version 1): `package` entries with manager, url and hash."""
    if doc.get("version") != 1:
        raise LockfileError(f"conda-lock.yml version {doc.get('version')!r} is not supported (1 is)")
    packages = doc.get("package")
    if not isinstance(packages, list):
        raise LockfileError("conda-lock.yml: 'package' is not a list")
    found: list[Locked] = []
    skipped = 0
    for entry in packages:
        if not isinstance(entry, dict):
            raise LockfileError("conda-lock.yml: a package entry is not a mapping")
        url = entry.get("url")
        if entry.get("manager", "conda") != "conda" or not isinstance(url, str) or "://" not in url:
            skipped += 1
            continue
        hashes = entry.get("hash")
        hashes = hashes if isinstance(hashes, dict) else {}
        found.append(Locked(url, _digest(hashes.get("sha256"), _SHA256), _digest(hashes.get("md5"), _MD5)))
    return Lockfile("conda-lock.yml", _unique(found), skipped)


def _environment(doc: dict[str, Any]) -> EnvironmentSpec:
    channels = doc.get("channels") or []
    deps = doc.get("dependencies") or []
    platforms = doc.get("platforms") or []
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise LockfileError("environment.yml: 'channels' is not a list of names or URLs")
    if not isinstance(deps, list):
        raise LockfileError("environment.yml: 'dependencies' is not a list")
    specs = tuple(d.strip() for d in deps if isinstance(d, str))  # {pip: [...]} entries are not conda's
    if not specs:
        raise LockfileError("environment.yml: no conda dependencies")
    name = doc.get("name")
    return EnvironmentSpec(
        name if isinstance(name, str) else None,
        tuple(channels),
        specs,
        tuple(p for p in platforms if isinstance(p, str)),
    )


def _digest(value: object, pattern: re.Pattern[str]) -> str | None:
    return value.lower() if isinstance(value, str) and pattern.fullmatch(value.lower()) else None


def _unique(found: list[Locked]) -> tuple[Locked, ...]:
    # One entry per URL; the first one that gives a sha256 wins.
    by_url: dict[str, Locked] = {}
    for item in found:
        known = by_url.get(item.url)
        if known is None or (known.sha256 is None and item.sha256 is not None):
            by_url[item.url] = item
    return tuple(by_url.values())
