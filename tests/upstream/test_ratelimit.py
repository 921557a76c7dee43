"""Token buckets for token checks: bursts, refill, Retry-After, per client and overall (a fake clock)."""

from __future__ import annotations

import pytest

from condaproxy.upstream.ratelimit import MAX_CLIENTS, ProbeLimiter, TokenBucket, client_key


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(3, 60.0, 0.0)  # 3 per minute: one every 20 s
    for _ in range(3):
        assert bucket.wait(0.0) == 0
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(20.0)
    assert bucket.wait(15.0) == pytest.approx(5.0)
    assert bucket.wait(20.0) == 0
    bucket.take(20.0)
    assert bucket.wait(1000.0) == 0  # never more than the burst, however long it rested
    for _ in range(3):
        bucket.take(1000.0)
    with pytest.raises(RuntimeError, match="no token"):
        bucket.take(1000.0)


def test_each_client_has_its_own_budget_and_all_share_one() -> None:
    clock = Clock()
    limiter = ProbeLimiter(2, 5, clock=clock)
    assert [limiter.acquire("192.0.2.1") for _ in range(3)] == [0, 0, 30]  # Retry-After: 30 s
    assert [limiter.acquire("192.0.2.2") for _ in range(2)] == [0, 0]
    assert limiter.acquire("192.0.2.3") == 0
    # Five checks made: the overall budget (5 a minute, one per 12 s) is spent for everybody.
    assert limiter.acquire("192.0.2.4") == 12
    clock.now += 12
    assert limiter.acquire("192.0.2.4") == 0
    assert limiter.acquire("192.0.2.1") == 18  # the longer of the two waits: its own
    clock.now += 60
    assert [limiter.acquire("192.0.2.1") for _ in range(3)] == [0, 0, 30]


def test_a_refused_client_is_not_charged() -> None:
    clock = Clock()
    limiter = ProbeLimiter(1, 100, clock=clock)
    assert limiter.acquire("192.0.2.1") == 0
    for _ in range(50):
        assert limiter.acquire("192.0.2.1") == 60
    clock.now += 60
    assert limiter.acquire("192.0.2.1") == 0


def test_an_ipv6_client_counts_by_its_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(None) == ""
    limiter = ProbeLimiter(1, 100, clock=Clock())
    assert limiter.acquire("2001:db8:1:2::1") == 0
    assert limiter.acquire("2001:db8:1:2::ffff") > 0  # another address of the same host


def test_forgetting_a_client_changes_nothing() -> None:
    """A bucket is forgotten a period after its last check, when it would be full anyway."""
    clock = Clock()
    limiter = ProbeLimiter(2, 10 * MAX_CLIENTS, clock=clock)
    assert [limiter.acquire("192.0.2.1") for _ in range(3)] == [0, 0, 30]
    clock.now += 59.9  # still remembered, and nearly full again
    assert [limiter.acquire("192.0.2.1") for _ in range(2)] == [0, 1]
    clock.now += 60  # forgotten: a new bucket, as full as the old one would be
    assert [limiter.acquire("192.0.2.1") for _ in range(3)] == [0, 0, 30]
