"""Which of this proxy's channels a package URL belongs to: lock files name canonical URLs
(`https://conda.anaconda.org/conda-forge/...`, a channel's own upstream), the proxy serves them
as `/<channel>/<subdir>/<file>`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from condaproxy.conda.paths import Kind, Rejection, UnitKey, parse_path
from condaproxy.config.model import Config

# conda's default channel_alias: a bare channel name means https://conda.anaconda.org/<name>.
CANONICAL_ALIAS = "https://conda.anaconda.org"
_TOKEN = re.compile(r"^/t/([^/]+)(/.*)$")


@dataclass(frozen=True, slots=True)
class Mapped:
    """A package URL as this proxy serves it; token is a client token the URL carried."""

    key: UnitKey
    token: str | None = None

    @property
    def path(self) -> str:
        """The request path on the proxy (with /t/<token>/ when the URL had one)."""
        prefix = f"/t/{self.token}" if self.token else ""
        return f"{prefix}/{self.key.channel}/{self.key.path}"


def _bases(config: Config, extra: Sequence[str]) -> list[tuple[str, str | None]]:
    """(base URL without trailing slash, channel name or None when the name follows the base)."""
    bases: list[tuple[str, str | None]] = []
    for channel in config.channels.values():
        bases += [(url.rstrip("/"), channel.name) for url in channel.urls]
    bases += [(config.upstream.default.rstrip("/"), None), (CANONICAL_ALIAS, None)]
    bases += [(url.rstrip("/"), None) for url in extra]
    # Longest first: https://x/conda-forge/label/dev before https://x/conda-forge.
    return sorted(bases, key=lambda b: -len(b[0]))


def map_url(config: Config, url: str, *, extra_bases: Sequence[str] = ()) -> Mapped | str:
    """The proxy path for a package URL, or a one-line reason why this proxy cannot serve it.

    extra_bases are URLs whose paths are already channel paths (the proxy's own public URL).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "malformed URL"
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        return "not an http(s) package URL"
    token = None
    path = parts.path
    if (m := _TOKEN.match(path)) is not None:
        token, path = m[1], m[2]
    plain = f"{parts.scheme}://{parts.netloc}{path}"
    for base, name in _bases(config, extra_bases):
        if not plain.startswith(base + "/"):
            continue
        rest = plain[len(base) :]
        parsed = parse_path(f"/{name}{rest}" if name else rest)
        if isinstance(parsed, Rejection):
            continue
        key = parsed.key
        if key.kind is not Kind.PACKAGE:
            return "not a package file (.conda or .tar.bz2)"
        if config.channel(key.channel) is None:
            return f"channel {key.channel} is not served by this proxy"
        return Mapped(key, token)
    return "no channel of this proxy serves this URL"


def channel_url(config: Config, channel: str, proxy_url: str) -> str:
    """The proxy URL of a channel given as a name or a URL (environment.yml `channels:`)."""
    if "://" not in channel:
        return f"{proxy_url.rstrip('/')}/{channel.strip('/')}"
    probe = map_url(config, f"{channel.rstrip('/')}/noarch/x-0-0.conda", extra_bases=(proxy_url,))
    if isinstance(probe, str):
        raise ValueError(f"{channel}: {probe}")
    return f"{proxy_url.rstrip('/')}/{probe.key.channel}"
