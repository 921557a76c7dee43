"""What the cache has been doing, in bounded memory: hit ratios over windows, recent misses and
refusals, the most requested packages, and each channel's upstream health.

Fed by the HTTP layer (one call per response) and by the download task's hooks (a fetch started,
a fetch failed); read by the status page and `condaproxy stats`. Nothing here touches the disk or
the network, and every collection has a fixed bound.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from cachetools import LRUCache

from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.errors import CondaproxyError, IntegrityError, UpstreamError, UpstreamNotFound

BUCKET = 60.0  # seconds per bucket of the windowed counters
WINDOWS = {"hour": 3600.0, "day": 86400.0}
RECENT = 200  # misses and refusals kept
TOP = 500  # packages tracked for the top list (Space-Saving)
CHANNELS = 256  # channels with counters of their own; the rest are counted under "(other)"
OTHER = "(other)"


class Outcome(enum.StrEnum):
    """How a response was served, for the hit ratio."""

    HIT = "hit"  # from the store: X-Cache HIT, STALE or REVALIDATED
    COLLAPSED = "collapsed"  # joined a fetch another request started
    MISS = "miss"  # started an upstream fetch
    ERROR = "error"  # 4xx/5xx: not in the ratio


def outcome(xcache: str | None, status: int) -> Outcome:
    """Classify a response from its X-Cache value and status."""
    if status >= 400:
        return Outcome.ERROR
    if xcache in ("HIT", "STALE", "REVALIDATED"):
        return Outcome.HIT
    if xcache == "COLLAPSED":
        return Outcome.COLLAPSED
    return Outcome.MISS


@dataclass(slots=True)
class Tally:
    """Counts over some span of time."""

    hits: int = 0
    collapsed: int = 0
    misses: int = 0
    errors: int = 0
    bytes_served: int = 0
    bytes_from_store: int = 0

    def add(self, kind: Outcome, nbytes: int) -> None:
        if kind is Outcome.HIT:
            self.hits += 1
            self.bytes_from_store += nbytes
        elif kind is Outcome.COLLAPSED:
            self.collapsed += 1
        elif kind is Outcome.MISS:
            self.misses += 1
        else:
            self.errors += 1
        self.bytes_served += nbytes

    def merge(self, other: Tally) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, float | int | None]:
        """The counts with the hit ratios by requests and by bytes (None when nothing was served)."""
        served = self.hits + self.collapsed + self.misses
        return {
            **asdict(self),
            "requests": served + self.errors,
            "hit_ratio": self.hits / served if served else None,
            "byte_hit_ratio": self.bytes_from_store / self.bytes_served if self.bytes_served else None,
        }


class Windowed:
    """A Tally per minute for the last day, and one since start."""

    def __init__(self) -> None:
        self.total = Tally()
        self._buckets: deque[tuple[int, Tally]] = deque(maxlen=int(WINDOWS["day"] / BUCKET))

    def add(self, now: float, kind: Outcome, nbytes: int) -> None:
        minute = int(now // BUCKET)
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append((minute, Tally()))
        self._buckets[-1][1].add(kind, nbytes)
        self.total.add(kind, nbytes)

    def window(self, now: float, seconds: float) -> Tally:
        """The counts of the last `seconds` (whole minutes)."""
        since = int((now - seconds) // BUCKET)
        tally = Tally()
        for minute, bucket in reversed(self._buckets):
            if minute <= since:
                break
            tally.merge(bucket)
        return tally


@dataclass(frozen=True, slots=True)
class Event:
    """One miss or refusal, for the status page."""

    at: float
    channel: str
    path: str
    kind: str
    reason: str  # cold, expired, variant missing, integrity mismatch, upstream error, refused token...
    detail: str = ""


@dataclass(slots=True)
class Health:
    """What a channel's upstream last did."""

    last_ok: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0  # consecutive
    last_stale_at: float | None = None


class TopCounter:
    """The most requested keys in bounded memory (Space-Saving: Metwally et al., 2005)."""

    def __init__(self, capacity: int = TOP) -> None:
        self.capacity = capacity
        self._counts: dict[str, list[int]] = {}  # key -> [requests, bytes, overestimate]

    def add(self, key: str, nbytes: int) -> None:
        entry = self._counts.get(key)
        if entry is None:
            floor = 0
            if len(self._counts) >= self.capacity:
                # Replace the least counted key; its count becomes the newcomer's error bound.
                victim = min(self._counts, key=lambda k: self._counts[k][0])
                floor = self._counts.pop(victim)[0]
            entry = self._counts[key] = [floor, 0, floor]
        entry[0] += 1
        entry[1] += nbytes

    def top(self, n: int = 10) -> list[tuple[str, int, int]]:
        """(key, requests, bytes), most requested first."""
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
        return [(k, v[0], v[1]) for k, v in ranked]


@dataclass
class Recorder:
    """The cache's running statistics; one per application."""

    clock: Callable[[], float] = time.time
    upstream_bytes: Callable[[], float] = lambda: 0.0  # the running total of bytes from upstreams
    started: float = field(default=0.0)
    overall: Windowed = field(default_factory=Windowed)
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT))
    top: TopCounter = field(default_factory=TopCounter)

    def __post_init__(self) -> None:
        self.started = self.started or self.clock()
        self._channels: dict[str, Windowed] = {}
        self._health: LRUCache[str, Health] = LRUCache(maxsize=CHANNELS)
        self._fetch_started: LRUCache[UnitKey, float] = LRUCache(maxsize=4096)
        # (minute, upstream bytes total then): the upstream bytes of a window are a difference.
        self._marks: deque[tuple[int, float]] = deque(maxlen=int(WINDOWS["day"] / BUCKET))

    # -- fed by the HTTP layer ------------------------------------------------------------

    def response(self, key: UnitKey, xcache: str | None, status: int, nbytes: int, detail: str = "") -> None:
        """Count one response to a unit request."""
        now = self.clock()
        kind = outcome(xcache, status)
        minute = int(now // BUCKET)
        if not self._marks or self._marks[-1][0] != minute:
            self._marks.append((minute, self.upstream_bytes()))
        self.overall.add(now, kind, nbytes)
        self._channel(key.channel).add(now, kind, nbytes)
        if key.kind is Kind.PACKAGE and kind is not Outcome.ERROR:
            self.top.add(str(key), nbytes)
        health = self.health(key.channel)
        if xcache == "STALE":
            health.last_stale_at = now
        elif xcache in ("MISS", "COLLAPSED", "REVALIDATED") and (status < 400 or status == 404):
            health.last_ok = now
            health.failures = 0
        if status in (401, 403):
            self._event(key, "refused token", detail)
        elif status == 503:
            self._event(key, "busy", detail)

    def _channel(self, name: str) -> Windowed:
        windowed = self._channels.get(name)
        if windowed is None:
            if len(self._channels) >= CHANNELS - 1:  # one slot is kept for OTHER
                name = OTHER
            windowed = self._channels.setdefault(name, Windowed())
        return windowed

    def health(self, channel: str) -> Health:
        """The channel's upstream health record (created empty)."""
        found = self._health.get(channel)
        if found is None:
            found = self._health[channel] = Health()
        return found

    # -- fed by the download task ---------------------------------------------------------

    def fetch_started(self, key: UnitKey, cached: bool) -> None:
        """A download began: a cold miss, or a cached copy past its TTL."""
        now = self.clock()
        self._fetch_started[key] = now
        self._event(key, "expired" if cached else "cold")

    def fetch_failed(self, key: UnitKey, error: CondaproxyError) -> None:
        """A download failed; classify why."""
        now = self.clock()
        if isinstance(error, IntegrityError):
            reason = "integrity mismatch"
        elif isinstance(error, UpstreamNotFound):
            missing = key.kind in (Kind.REPODATA, Kind.SHARD_INDEX)
            reason = "variant missing" if missing else "not found upstream"
        elif isinstance(error, UpstreamError):
            reason = "upstream error"
        else:
            reason = "failed"
        self._event(key, reason, str(error))
        if isinstance(error, UpstreamError) and not isinstance(error, UpstreamNotFound):
            health = self.health(key.channel)
            health.last_error, health.last_error_at = str(error), now
            health.failures += 1
        elif isinstance(error, UpstreamNotFound):
            self.health(key.channel).last_ok = now

    def started_at(self, key: UnitKey) -> float | None:
        """When the download of key began, if it is still remembered."""
        return self._fetch_started.get(key)

    def _event(self, key: UnitKey, reason: str, detail: str = "") -> None:
        self.recent.append(Event(self.clock(), key.channel, key.path, key.kind.value, reason, detail[:300]))

    # -- read by the status page ----------------------------------------------------------

    def ratios(self, channel: str | None = None) -> dict[str, dict[str, float | int | None]]:
        """Counts and hit ratios for the last hour, the last day and since start."""
        source = self.overall if channel is None else self._channels.get(channel, Windowed())
        now = self.clock()
        spans = {name: source.window(now, seconds).summary() for name, seconds in WINDOWS.items()}
        spans["since_start"] = source.total.summary()
        if channel is None:  # upstream bytes are counted for the whole proxy only
            total = self.upstream_bytes()
            for name, seconds in WINDOWS.items():
                since = int((now - seconds) // BUCKET)
                first = next((v for m, v in self._marks if m > since), total)
                spans[name]["bytes_from_upstream"] = int(total - first)
            spans["since_start"]["bytes_from_upstream"] = int(total)
        return spans

    def channels(self) -> list[str]:
        """Channels with counters, in name order."""
        return sorted(self._channels)
