"""Effective times (CEP-47 indexed_timestamp, first sightings, ms timestamps, none) and @<when>."""

from __future__ import annotations

import datetime as dt

import pytest

from condaproxy.conda.effective import MAX_SECONDS, effective_time, normalise
from condaproxy.conda.paths import Request, parse_path
from condaproxy.conda.when import parse_duration, parse_when

SINCE = 1_700_000_000.0


def test_indexed_timestamp_wins_over_everything() -> None:
    record = {"indexed_timestamp": 1_600_000_000_000, "timestamp": 1_500_000_000}
    assert effective_time(record, SINCE + 10, SINCE) == 1_600_000_000.0


def test_first_sighting_after_the_ledger_began_beats_the_records_own_timestamp() -> None:
    # A back-dated build that appeared after the ledger began is as young as its sighting.
    assert effective_time({"timestamp": 1_000_000_000}, SINCE + 10, SINCE) == SINCE + 10


def test_records_present_when_the_ledger_began_keep_their_timestamp() -> None:
    assert effective_time({"timestamp": 1_500_000_000}, SINCE, SINCE) == 1_500_000_000.0
    assert effective_time({"timestamp": 1_500_000_000}, SINCE + 5, None) == 1_500_000_000.0


def test_millisecond_timestamps_are_normalised() -> None:
    assert normalise(1_500_000_000_000) == 1_500_000_000.0
    assert normalise(MAX_SECONDS) == float(MAX_SECONDS)
    assert normalise(MAX_SECONDS + 1) == (MAX_SECONDS + 1) / 1000
    assert effective_time({"timestamp": 1_500_000_000_123}, None, None) == pytest.approx(1_500_000_000.123)


@pytest.mark.parametrize("value", [None, "1500000000", True, 0, -5, float("nan")])
def test_missing_or_nonsense_times_are_unknown(value: object) -> None:
    assert normalise(value) is None
    assert effective_time({"timestamp": value}, None, None) is None
    assert effective_time({}, SINCE, SINCE) is None  # seen at the start, no time: unknown


def test_when_a_date_is_the_end_of_that_utc_day() -> None:
    when = parse_when("2026-06-01")
    assert when is not None
    end = dt.datetime(2026, 6, 2, tzinfo=dt.UTC).timestamp()
    assert end - 1 < when.resolve(0) < end


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-06-01T12:00:00Z", dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)),
        ("2026-06-01T14:00:00+02:00", dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)),
        ("2026-06-01T12:00:00.250Z", dt.datetime(2026, 6, 1, 12, 0, 0, 250000, tzinfo=dt.UTC)),
    ],
)
def test_when_an_rfc3339_time(text: str, expected: dt.datetime) -> None:
    when = parse_when(text)
    assert when is not None and when.resolve(0) == expected.timestamp()


def test_when_an_age_is_rounded_down_to_the_hour() -> None:
    now = dt.datetime(2026, 6, 8, 12, 34, 56, tzinfo=dt.UTC).timestamp()
    seven = parse_when("7d")
    assert seven is not None
    assert seven.resolve(now) == dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC).timestamp()
    twelve = parse_when("12h")
    assert twelve is not None and twelve.resolve(now) == dt.datetime(2026, 6, 8, 0, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    "text", ["2026-13-01", "2026-06-01T12:00:00", "yesterday", "7w", "-7d", "", "2026-06-01T25:00:00Z"]
)
def test_when_refuses_what_names_no_moment(text: str) -> None:
    assert parse_when(text) is None


def test_durations() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12h") == 43200
    assert parse_duration("90") == 90
    with pytest.raises(ValueError):
        parse_duration("7 days")


@pytest.mark.parametrize(
    "path",
    [
        "/@2026-06-01/conda-forge/noarch/repodata.json",
        "/@2026-06-01/t/tok/conda-forge/noarch/repodata.json",
        "/t/tok/@2026-06-01/conda-forge/noarch/repodata.json",
    ],
)
def test_paths_carry_the_view(path: str) -> None:
    parsed = parse_path(path)
    assert isinstance(parsed, Request)
    assert parsed.when is not None and parsed.when.text == "2026-06-01"
    assert str(parsed.key) == "conda-forge/noarch/repodata.json"


@pytest.mark.parametrize("path", ["/@nope/c/noarch/repodata.json", "/@7d/@7d/c/noarch/repodata.json"])
def test_paths_refuse_bad_views(path: str) -> None:
    assert not isinstance(parse_path(path), Request)
