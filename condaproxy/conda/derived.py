"""Internal names of the documents the proxy makes for policies, views and revision history.

Like `repodata.json@gzip`, they contain an `@`, which no request path can spell, so a client
can never ask for one by name: `repodata.json.zst@policy-<digest>` (a channel's policy applied),
`repodata.json@view-<ms>-<digest>` (the channel as of a moment, filtered), and
`repodata.json@rev-<sha256>` (a revision kept for views).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from condaproxy.conda.paths import SHARD_INDEX_NAME
from condaproxy.conda.variants import BASES, SUFFIXES

# Documents whose revisions are kept and which policies and views filter.
TRACKED = frozenset({*(b + s for b in BASES for s in SUFFIXES), SHARD_INDEX_NAME})


class Form(enum.Enum):
    """Which kind of made document an internal name is."""

    POLICY = "policy"
    VIEW = "view"
    REV = "rev"


@dataclass(frozen=True, slots=True)
class Derived:
    """A parsed internal name."""

    base: str  # the client-facing document, e.g. repodata.json.zst
    form: Form
    digest: str = ""  # the policy's digest (policy, view)
    cutoff: float | None = None  # a view's instant, in seconds
    blob: str = ""  # a revision's blob key


def policy_name(base: str, digest: str) -> str:
    """The document base with the policy of this digest applied."""
    return f"{base}@policy-{digest}"


def view_name(base: str, cutoff: float, digest: str) -> str:
    """The document base as of cutoff (milliseconds in the name), with the policy applied."""
    return f"{base}@view-{int(cutoff * 1000)}-{digest}"


def rev_name(base: str, blob: str) -> str:
    """A kept revision of base."""
    return f"{base}@rev-{blob}"


def parse(filename: str) -> Derived | None:
    """The parts of an internal name made here, or None."""
    base, sep, rest = filename.partition("@")
    if not sep or base not in TRACKED:
        return None
    form, _, tail = rest.partition("-")
    if form == Form.POLICY.value and tail:
        return Derived(base, Form.POLICY, digest=tail)
    if form == Form.VIEW.value:
        ms, _, digest = tail.partition("-")
        if ms.isdigit() and digest:
            return Derived(base, Form.VIEW, digest=digest, cutoff=int(ms) / 1000)
    if form == Form.REV.value and len(tail) == 64:
        return Derived(base, Form.REV, blob=tail)
    return None
