"""ranges: pure Range and conditional-request decisions (RFC 9110 sections 13 and 14)."""

from __future__ import annotations

import time

import pytest

from condaproxy.http.ranges import Plan, byte_window, none_match, not_modified, plan

SIZE = 1000
ETAG = '"abc123"'
WEAK = 'W/"abc123"'
LM = "Sun, 06 Nov 1994 08:49:37 GMT"
OLDER = "Sat, 05 Nov 1994 08:49:37 GMT"
NEWER = "Mon, 07 Nov 1994 08:49:37 GMT"


def get(
    headers: dict[str, str], size: int | None = SIZE, etag: str | None = ETAG, lm: str | None = LM
) -> Plan:
    return plan("GET", headers, size, etag, lm)


# -- byte ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "offset", "count", "content_range"),
    [
        ("bytes=0-0", 0, 1, "bytes 0-0/1000"),
        ("bytes=0-99", 0, 100, "bytes 0-99/1000"),
        ("bytes=100-199", 100, 100, "bytes 100-199/1000"),
        ("bytes=999-999", 999, 1, "bytes 999-999/1000"),
        ("bytes=500-", 500, 500, "bytes 500-999/1000"),
        ("bytes=0-", 0, 1000, "bytes 0-999/1000"),
        ("bytes=999-", 999, 1, "bytes 999-999/1000"),
        ("bytes=-1", 999, 1, "bytes 999-999/1000"),
        ("bytes=-100", 900, 100, "bytes 900-999/1000"),
        ("bytes=-1000", 0, 1000, "bytes 0-999/1000"),
        ("bytes=-5000", 0, 1000, "bytes 0-999/1000"),  # suffix longer than the file: all of it
        ("bytes=900-5000", 900, 100, "bytes 900-999/1000"),  # last-pos past the end clamps
        ("bytes=0-999999999999999999999", 0, 1000, "bytes 0-999/1000"),
        (" bytes=10-19 ", 10, 10, "bytes 10-19/1000"),
    ],
)
def test_single_range_is_206(header: str, offset: int, count: int, content_range: str) -> None:
    p = get({"Range": header})
    assert p == Plan(206, offset, count, {"Content-Range": content_range})
    assert p.has_body


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-1005", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_is_416(header: str) -> None:
    p = get({"Range": header})
    assert p.status == 416
    assert p.headers == {"Content-Range": "bytes */1000"}
    assert not p.has_body


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",  # multiple ranges: a 200 with the whole body is valid (RFC 9110 14.2)
        "bytes=0-1, 5-6",
        "bytes=-",
        "bytes=",
        "bytes=5-3",  # last < first: invalid, ignored
        "bytes=a-b",
        "bytes=1.5-2",
        "bytes=-1-2",
        "bytes 0-1",
        "items=0-1",
        "Bytes=0-1x",
        "bytes=0x10-",
        "",
        "garbage",
    ],
)
def test_multi_or_malformed_range_is_ignored(header: str) -> None:
    assert get({"Range": header}) == Plan(200)


def test_range_with_unknown_size_is_200() -> None:
    assert get({"Range": "bytes=0-10"}, size=None) == Plan(200)


def test_range_on_head_is_planned_like_get() -> None:
    assert plan("HEAD", {"Range": "bytes=0-9"}, SIZE, ETAG, LM).status == 206


def test_range_on_other_methods_is_ignored() -> None:
    assert plan("POST", {"Range": "bytes=0-9"}, SIZE, ETAG, LM) == Plan(200)


def test_no_headers_is_200_whole_body() -> None:
    p = get({})
    assert p == Plan(200)
    assert p.offset == 0 and p.count is None and p.has_body


def test_thousand_ranges_is_200_and_fast() -> None:
    header = "bytes=" + ",".join(f"{i * 2}-{i * 2}" for i in range(1000))
    t0 = time.perf_counter()
    for _ in range(100):
        assert get({"Range": header}) == Plan(200)
    assert time.perf_counter() - t0 < 1.0


def test_pathological_range_header_is_fast() -> None:
    # Backtracking regexes can blow up on long near-misses; this one must stay linear.
    header = "bytes=" + "1" * 4000 + "-" + "1" * 4000 + "x"
    t0 = time.perf_counter()
    assert get({"Range": header}) == Plan(200)
    assert time.perf_counter() - t0 < 0.5


def test_huge_range_number_does_not_raise() -> None:
    assert get({"Range": "bytes=0-" + "9" * 5000}).status in (200, 206)
    assert get({"Range": "bytes=" + "9" * 5000 + "-"}).status in (200, 416)


def test_suffix_range_on_empty_representation() -> None:
    p = get({"Range": "bytes=-5"}, size=0)
    assert p.status in (200, 416)
    assert p.headers.get("Content-Range") in (None, "bytes */0")


def test_empty_representation_int_range_is_416() -> None:
    assert get({"Range": "bytes=0-"}, size=0) == Plan(416, headers={"Content-Range": "bytes */0"})


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 10)),
        ("bytes=-10", 100, (90, 10)),
        ("bytes=-0", 100, False),
        ("bytes=100-", 100, False),
        ("bytes=0-1,2-3", 100, None),
        ("bytes=-", 100, None),
        ("bytes=9-1", 100, None),
    ],
)
def test_byte_window(header: str, size: int, expected: tuple[int, int] | bool | None) -> None:
    assert byte_window(header, size) == expected


# -- If-None-Match / If-Modified-Since -------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "etag", "matches"),
    [
        ('"abc123"', ETAG, True),
        ('W/"abc123"', ETAG, True),  # weak comparison (RFC 9110 13.1.2)
        ('"abc123"', WEAK, True),
        ('W/"abc123"', WEAK, True),
        ("*", ETAG, True),
        ('"other"', ETAG, False),
        ('"other", "abc123"', ETAG, True),
        ('"other",W/"abc123"', ETAG, True),
        ('"x", "y" ,  "z"', '"z"', True),
        ('"x", "y"', '"z"', False),
        ('"abc123', ETAG, False),  # malformed: no match
        ("abc123", ETAG, False),
        ('"abc123"', None, False),
        ("", ETAG, False),
        ('""', '""', True),
    ],
)
def test_none_match(header: str, etag: str | None, matches: bool) -> None:
    assert none_match(header, etag) is matches


def test_if_none_match_strong_is_304() -> None:
    assert get({"If-None-Match": ETAG}) == Plan(304)
    assert not Plan(304).has_body


def test_if_none_match_weak_is_304() -> None:
    assert get({"If-None-Match": WEAK}).status == 304
    assert get({"If-None-Match": ETAG}, etag=WEAK).status == 304


def test_if_none_match_star_is_304() -> None:
    assert get({"If-None-Match": "*"}).status == 304


def test_if_none_match_star_without_etag_is_304() -> None:
    assert get({"If-None-Match": "*"}, etag=None).status == 304


def test_if_none_match_list() -> None:
    assert get({"If-None-Match": '"a", "b", "abc123"'}).status == 304
    assert get({"If-None-Match": '"a", "b"'}).status == 200


def test_if_none_match_mismatch_serves_range() -> None:
    p = get({"If-None-Match": '"old"', "Range": "bytes=0-9"})
    assert p.status == 206 and p.count == 10


def test_not_modified_beats_range() -> None:
    assert get({"If-None-Match": ETAG, "Range": "bytes=0-9"}) == Plan(304)


@pytest.mark.parametrize(
    ("ims", "expected"),
    [
        (LM, 304),  # equal: not modified since
        (NEWER, 304),  # client's copy is newer than our Last-Modified
        (OLDER, 200),  # modified since the client's date
        ("Sun, 06 Nov 1994 09:49:37 +0100", 304),  # same instant, other zone
        ("Sun, 06 Nov 1994 08:49:36 GMT", 200),
        ("garbage", 200),
        ("", 200),
        ("Sun, 32 Nov 1994 08:49:37 GMT", 200),
    ],
)
def test_if_modified_since(ims: str, expected: int) -> None:
    assert get({"If-Modified-Since": ims}).status == expected


def test_if_modified_since_without_last_modified_is_200() -> None:
    assert get({"If-Modified-Since": LM}, lm=None).status == 200


def test_if_modified_since_with_garbage_last_modified_is_200() -> None:
    assert get({"If-Modified-Since": LM}, lm="yesterday").status == 200


@pytest.mark.parametrize("ims", ["Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_if_modified_since_obsolete_date_forms(ims: str) -> None:
    assert get({"If-Modified-Since": ims}).status == 304


def test_if_modified_since_rfc850_form() -> None:
    assert get({"If-Modified-Since": "Sunday, 06-Nov-94 08:49:37 GMT"}).status == 304


def test_if_none_match_takes_precedence_over_ims() -> None:
    # RFC 9110 13.1.3: IMS is ignored when If-None-Match is present.
    assert get({"If-None-Match": '"other"', "If-Modified-Since": NEWER}).status == 200
    assert get({"If-None-Match": ETAG, "If-Modified-Since": OLDER}).status == 304
    # Even a malformed If-None-Match disables IMS.
    assert get({"If-None-Match": "garbage", "If-Modified-Since": NEWER}).status == 200


def test_not_modified_direct() -> None:
    assert not_modified({"If-None-Match": ETAG}, ETAG, None)
    assert not not_modified({}, ETAG, LM)
    assert not_modified({"If-Modified-Since": LM}, None, LM)
    assert not not_modified({"If-Modified-Since": OLDER}, None, LM)


# -- If-Range --------------------------------------------------------------------------------


def test_if_range_matching_strong_etag_is_206() -> None:
    p = get({"Range": "bytes=-10", "If-Range": ETAG})
    assert p.status == 206 and (p.offset, p.count) == (990, 10)


def test_if_range_other_etag_is_200() -> None:
    assert get({"Range": "bytes=-10", "If-Range": '"other"'}) == Plan(200)


def test_if_range_weak_etag_is_200() -> None:
    # If-Range requires the strong comparison (RFC 9110 13.1.5): weak never matches.
    assert get({"Range": "bytes=0-9", "If-Range": WEAK}, etag=WEAK) == Plan(200)
    assert get({"Range": "bytes=0-9", "If-Range": WEAK}) == Plan(200)
    assert get({"Range": "bytes=0-9", "If-Range": ETAG}, etag=WEAK) == Plan(200)


def test_if_range_etag_without_our_etag_is_200() -> None:
    assert get({"Range": "bytes=0-9", "If-Range": ETAG}, etag=None) == Plan(200)


def test_if_range_date_equal_is_206() -> None:
    assert get({"Range": "bytes=0-9", "If-Range": LM}).status == 206


@pytest.mark.parametrize("date", [OLDER, NEWER, "garbage"])
def test_if_range_date_different_is_200(date: str) -> None:
    assert get({"Range": "bytes=0-9", "If-Range": date}) == Plan(200)


def test_if_range_date_without_last_modified_is_200() -> None:
    assert get({"Range": "bytes=0-9", "If-Range": LM}, lm=None) == Plan(200)


def test_if_range_failing_makes_unsatisfiable_range_200() -> None:
    # The range is ignored entirely, so even a range past the end gets the full body.
    assert get({"Range": "bytes=5000-", "If-Range": '"other"'}) == Plan(200)


def test_if_range_without_range_is_200() -> None:
    assert get({"If-Range": ETAG}) == Plan(200)
