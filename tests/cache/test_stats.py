"""The cache's statistics with an injected clock: windows, bounds, reasons and upstream health."""

from __future__ import annotations

from condaproxy.cache.stats import CHANNELS, OTHER, Recorder, TopCounter
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.errors import IntegrityError, UpstreamNotFound, UpstreamUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def pkg(name: str = "x-1-0.conda", channel: str = "c") -> UnitKey:
    return UnitKey(channel, "noarch", name, Kind.PACKAGE)


def test_windows_roll_and_ratios() -> None:
    clock = Clock()
    upstream = [0.0]
    rec = Recorder(clock=clock, upstream_bytes=lambda: upstream[0])
    rec.response(pkg(), "MISS", 200, 100)
    upstream[0] = 100.0
    clock.now += 2 * 3600  # two hours later
    rec.response(pkg(), "HIT", 200, 100)
    rec.response(pkg(), "COLLAPSED", 200, 100)
    rec.response(pkg(), "HIT", 304, 0)
    rec.response(pkg(), "MISS", 502, 0)
    ratios = rec.ratios()
    assert ratios["hour"]["hits"] == 2 and ratios["hour"]["misses"] == 0 and ratios["hour"]["errors"] == 1
    assert ratios["hour"]["hit_ratio"] == 2 / 3 and ratios["hour"]["byte_hit_ratio"] == 0.5
    assert ratios["day"]["misses"] == 1 and ratios["since_start"]["requests"] == 5
    assert ratios["since_start"]["bytes_from_upstream"] == 100 and ratios["hour"]["bytes_from_upstream"] == 0
    clock.now += 2 * 86400
    assert rec.ratios()["day"]["requests"] == 0 and rec.ratios()["since_start"]["requests"] == 5


def test_reasons_and_health() -> None:
    clock = Clock()
    rec = Recorder(clock=clock)
    repodata = UnitKey("c", "noarch", "repodata.json.bz2", Kind.REPODATA)
    rec.fetch_started(pkg(), cached=False)
    rec.fetch_started(repodata, cached=True)
    rec.fetch_failed(repodata, UpstreamNotFound("not found upstream (404)"))
    rec.fetch_failed(pkg(), IntegrityError("sha256 mismatch"))
    clock.now += 1
    rec.fetch_failed(pkg(), UpstreamUnavailable("upstream answered 503"))
    rec.response(pkg(), "MISS", 403, 0, "token refused")
    assert [e.reason for e in rec.recent] == [
        "cold",
        "expired",
        "variant missing",
        "integrity mismatch",
        "upstream error",
        "refused token",
    ]
    health = rec.health("c")
    assert health.failures == 1 and health.last_error == "upstream answered 503"
    assert (
        health.last_error_at is not None
        and health.last_ok is not None
        and health.last_error_at > health.last_ok
    )
    clock.now += 1
    rec.response(pkg(), "MISS", 200, 10)
    assert rec.health("c").failures == 0 and rec.health("c").last_ok == clock.now
    assert rec.started_at(pkg()) is not None


def test_memory_is_bounded() -> None:
    rec = Recorder(clock=Clock())
    for i in range(CHANNELS + 50):
        rec.response(pkg(channel=f"ch{i}"), "HIT", 200, 1)
    assert len(rec.channels()) == CHANNELS and OTHER in rec.channels()
    for i in range(1000):
        rec.fetch_started(pkg(f"p{i}-1-0.conda"), cached=False)
    assert len(rec.recent) == rec.recent.maxlen
    top = TopCounter(capacity=3)
    for key in ["a"] * 5 + ["b"] * 3 + ["c", "d", "e"]:
        top.add(key, 10)
    assert len(top._counts) == 3
    assert [k for k, _, _ in top.top(2)] == ["a", "b"]
