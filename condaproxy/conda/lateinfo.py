"""CEP-15 `info.base_url` found anywhere in a repodata document, not only in its head (pure).

Indexers write `info` first, and such documents are decided from their head (baseurl.py).
A document whose head runs out before `info` does is held back whole and read here once it
is in, streaming (ijson), in bounded memory: if its info names a foreign base, our copy
says "" instead (re-serialised record by record, unknown keys and v3 groups kept); else its
bytes stay as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from condaproxy.conda import variants
from condaproxy.conda.baseurl import foreign_base
from condaproxy.conda.decoding import open_decoded
from condaproxy.conda.filtering import build_value, filter_repodata, json_events


def find_base_url(src: Path, filename: str) -> str | None:
    """The top-level info.base_url of a repodata document (any encoding), None when it has none."""
    with open_decoded(src, filename) as reader:
        events = json_events(reader)
        for prefix, event, value in events:
            if prefix == "" and event == "map_key" and value == "info":
                info = build_value(events)
                if isinstance(info, dict) and isinstance(info.get("base_url"), str):
                    return str(info["base_url"])
                return None
    return None


def _keep(_filename: str, record: dict[str, Any]) -> dict[str, Any]:
    return record


def rewrite_late(src: Path, dst: Path, filename: str, location: str) -> tuple[str | None, str | None]:
    """(info.base_url as found, the foreign base it names); dst written only when there is one.

    ValueError: the base is not http(s).
    """
    value = find_base_url(src, filename)
    base = foreign_base(location, value) if value is not None else None
    if base is None:
        return value, None

    def local(info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "base_url": ""}

    with open_decoded(src, filename) as reader, variants.encoder(dst, filename) as writer:
        filter_repodata(reader, writer, _keep, info=local)
    return value, base
