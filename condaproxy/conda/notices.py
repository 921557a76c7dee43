"""CEP-6 channel notices (`<channel>/notices.json`): the upstream's, and the proxy's own (pure).

conda and pixi show a channel's notices to their users. The proxy passes the upstream's
through and adds its own: a channel served stale while its upstream fails, a channel failed
over to a mirror, and what an admin wrote in the config.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

NOTICES_NAME = "notices.json"
LEVELS = ("info", "warning", "critical")
MAX_UPSTREAM_BYTES = 1 << 20  # a notices document is small; more is not one


def _rfc3339(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def notice(topic: str, message: str, level: str, created: float, *, interval: int = 3600) -> dict[str, Any]:
    """One notice; its id is stable for a topic and message, so clients show it once per interval."""
    digest = hashlib.sha256(f"{topic}\0{message}".encode()).hexdigest()
    ident = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    return {
        "id": ident,
        "message": message,
        "level": level if level in LEVELS else "info",
        "created_at": _rfc3339(created),
        "interval": interval,
    }


def upstream_notices(body: bytes | None) -> list[Any]:
    """The notices an upstream document lists; none if it is missing or not one."""
    if not body or len(body) > MAX_UPSTREAM_BYTES:
        return []
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    found = doc.get("notices") if isinstance(doc, dict) else None
    return [n for n in found if isinstance(n, dict)] if isinstance(found, list) else []


def merged(upstream: bytes | None, ours: list[dict[str, Any]]) -> bytes:
    """The notices document served: the upstream's notices, then ours."""
    return json.dumps({"notices": [*upstream_notices(upstream), *ours]}).encode()
