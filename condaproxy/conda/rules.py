"""Allow/deny rules over package records, in conda MatchSpec syntax (parsed by rattler).

A `hide` rule takes matching records out of every form of the index (and refuses their package
files); a `deny` rule leaves the index alone and refuses the package files, so a client that
picks one is told which rule stopped it. A rule may be scoped to one channel.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import rattler


class Action(enum.StrEnum):
    """What a matching rule does."""

    HIDE = "hide"  # absent from every index form; the package file is refused too
    DENY = "deny"  # the package file is refused (403) with the rule's name


@dataclass(frozen=True)
class Rule:
    """One rule: a MatchSpec, what to do with what it matches, and where it applies."""

    name: str
    action: Action
    spec: str
    channel: str | None = None  # None: every channel
    _match: Any = field(default=None, compare=False, repr=False, hash=False)
    _names: Any = field(default=None, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        # Globs in names (`*-nightly`) are MatchSpec syntax rattler accepts when asked to.
        match = rattler.MatchSpec(self.spec, exact_names_only=False)
        matcher = match.name
        if matcher is None:
            raise ValueError(f"{self.spec!r} names no package (a rule needs a name or a glob)")
        object.__setattr__(self, "_match", match)
        # A spec of the name alone answers "may this package name match?" without a version.
        object.__setattr__(self, "_names", rattler.MatchSpec(matcher.normalized, exact_names_only=False))
        exact = matcher.as_package_name()
        object.__setattr__(self, "_exact", None if exact is None else exact.normalized)

    def applies_to(self, channel: str) -> bool:
        """Whether the rule is in force for channel."""
        return self.channel is None or self.channel == channel

    def may_match_name(self, name: str) -> bool:
        """Whether some record of package name could match (its name part matches)."""
        exact: str | None = getattr(self, "_exact", None)
        if exact is not None:
            return name.lower() == exact
        return bool(self._names.matches(_record(name, "0", "0", 0, "noarch")))

    def matches(
        self, name: str, version: str, build: str, build_number: int = 0, subdir: str = "noarch"
    ) -> bool:
        """Whether a record (its name, version and build) matches the rule's MatchSpec."""
        if not self.may_match_name(name):
            return False
        try:
            record = _record(name, version, build, build_number, subdir)
        except Exception:
            return False  # not a record rattler can read: no spec can speak of it
        return bool(self._match.matches(record))


def _record(name: str, version: str, build: str, build_number: int, subdir: str) -> Any:
    return rattler.PackageRecord(name, version, rattler.BuildString(build), build_number, subdir or "noarch")


def parse_rule(name: str, action: str, spec: str, channel: str | None = None) -> Rule:
    """A rule from its parts; ValueError with rattler's reason when the spec is not a MatchSpec."""
    try:
        kind = Action(action)
    except ValueError:
        raise ValueError(f"a rule is hide or deny, not {action!r}") from None
    try:
        return Rule(name, kind, spec.strip(), channel)
    except ValueError:
        raise
    except Exception as exc:  # rattler's own parse errors
        raise ValueError(f"{spec!r} is not a MatchSpec: {exc}") from None


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a package name is one of patterns (names or shell globs), as exemptions list them."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
