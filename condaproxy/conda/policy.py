"""The supply-chain policy of one channel, and what it decides for one record (pure).

Three things can keep a record from clients: a `hide` rule (gone from every index form, file
refused), a `deny` rule (file refused, index untouched, so the client hears which rule), and the
release cooldown (`min_age`: too young, gone from the index and refused until it comes of age).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

from condaproxy.conda.rules import Action, Rule, name_matches


class Verdict(enum.Enum):
    """What the policy says of one record."""

    KEEP = "keep"
    HOLD = "hold"  # younger than min_age (or of unknown age, with min_age_unknown = hold)
    HIDE = "hide"
    DENY = "deny"

    @property
    def in_index(self) -> bool:
        """Whether the record stays in served repodata and shards."""
        return self in (Verdict.KEEP, Verdict.DENY)


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict, the rule behind it, and for a held record when it comes of age (None: never)."""

    verdict: Verdict
    rule: str | None = None
    release: float | None = None


KEEP = Decision(Verdict.KEEP)


@dataclass(frozen=True)
class Policy:
    """What one channel's clients may see and fetch."""

    channel: str
    min_age: float = 0.0  # seconds; 0: no cooldown
    exempt: tuple[str, ...] = ()  # package names or globs the cooldown spares
    unknown_hold: bool = False  # records of unknown age: held (True) or allowed, as clients do
    rules: tuple[Rule, ...] = ()
    stamp: bool = False  # write each record's effective time as its indexed_timestamp

    @property
    def filters(self) -> bool:
        """Whether served index documents differ from the upstream's."""
        return bool(self.min_age or self.stamp or any(r.action is Action.HIDE for r in self.rules))

    @property
    def guards_packages(self) -> bool:
        """Whether package requests must be checked."""
        return bool(self.min_age or self.rules)

    def digest(self) -> str:
        """A short stable name of what the policy does to documents (for derived unit names)."""
        hides = sorted(r.spec for r in self.rules if r.action is Action.HIDE)
        shape = [self.min_age, sorted(self.exempt), self.unknown_hold, hides, self.stamp]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def decide(
        self,
        name: str,
        version: str,
        build: str,
        appeared: float | None,
        now: float,
        *,
        build_number: int = 0,
        subdir: str = "noarch",
    ) -> Decision:
        """The verdict for one record, given when it appeared (None: unknown) and the time now."""
        for rule in self.rules:
            if rule.matches(name, version, build, build_number, subdir):
                return Decision(Verdict.HIDE if rule.action is Action.HIDE else Verdict.DENY, rule.name)
        if not self.min_age or name_matches(name, self.exempt):
            return KEEP
        if appeared is None:
            return Decision(Verdict.HOLD, "min_age_unknown") if self.unknown_hold else KEEP
        release = appeared + self.min_age
        if release > now:
            return Decision(Verdict.HOLD, "min_age", release)
        return KEEP
