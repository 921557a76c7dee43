"""Channel URLs as anaconda.org spells them: /t/<token>/ after the host, and their redaction."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# Where unit_url() puts a token: first in the path ("/conda-forge/t/..." is a channel's own path).
_TOKEN_SEGMENT = re.compile(r"^/t/[^/]+(?=/|$)")


def unit_url(base: str, path: str, token: str | None) -> str:
    """base/path, with /t/<token> right after the host (anaconda.org's token URLs)."""
    if token is None:
        return f"{base}/{path}"
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}/t/{token}{parts.path}/{path}"


def redacted_url(url: object) -> str:
    """url as logs and the catalog may show it: no userinfo, /t/<redacted>/, no query string."""
    parts = urlsplit(str(url))
    host = parts.netloc.rpartition("@")[2]
    # A redirect target's query string may be a signature (S3, CDNs): a credential too.
    query = "?<redacted>" if parts.query else ""
    return f"{parts.scheme}://{host}{_TOKEN_SEGMENT.sub('/t/<redacted>', parts.path)}{query}"
