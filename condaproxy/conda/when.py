"""Times as people write them: durations (`7d`, `12h`) and the `@<when>` of a channel view.

`/@<when>/<channel>/...` serves a channel as it was at a moment: a date (`2026-06-01`, the end
of that UTC day), an RFC 3339 time (`2026-06-01T12:00:00Z`), or an age (`7d`: now minus seven
days, rounded down to the hour so that a view asked for all day long stays one cacheable view).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# RFC 3339 section 5.6: full-date "T" full-time, with a mandatory offset.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_AGE = re.compile(r"([0-9]{1,6})([smhd])")
HOUR = 3600


def parse_duration(text: str) -> float:
    """Seconds in `30`, `90s`, `15m`, `12h` or `7d`; ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 7d, 12h, 30m or 90s, got {text!r}")
    return float(match[1]) * UNITS[match[2] or "s"]


def format_duration(seconds: float) -> str:
    """The largest whole unit that says it: 604800 -> 7d."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class When:
    """A view's moment as written: an absolute instant, or an age to subtract from now."""

    text: str
    instant: float | None = None  # seconds since the epoch
    age: float | None = None  # seconds before now

    def resolve(self, now: float) -> float:
        """The instant this view shows, given the current time."""
        if self.instant is not None:
            return self.instant
        assert self.age is not None
        # Rounded down to the hour: "7d" means one view per hour, not one per request.
        return (now - self.age) // HOUR * HOUR


def parse_when(text: str) -> When | None:
    """The moment `@<when>` names (text without the `@`), or None if it names none."""
    if _DATE.fullmatch(text):
        try:
            day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        # The end of that UTC day: everything published on it is in the view.
        end = day + dt.timedelta(days=1)
        return When(text, instant=end.timestamp() - 0.001)
    if _RFC3339.fullmatch(text):
        try:
            moment = dt.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
        except ValueError:
            return None
        return When(text, instant=moment.timestamp())
    match = _AGE.fullmatch(text)
    if match is not None:
        return When(text, age=float(match[1]) * UNITS[match[2]])
    return None
