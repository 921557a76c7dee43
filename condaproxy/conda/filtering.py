"""Record filtering of repodata documents and CEP-16 shards, by policy and by time (pure).

A repodata document is rewritten as a stream of JSON events (ijson): everything outside the
record groups is copied token by token, unknown keys and CEP-48 `v3` groups included, and each
record is built alone, judged, and written back or left out. conda-forge's linux-64
repodata.json (~300 MB, ~500,000 records) is thus filtered holding one record at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import ijson
import msgpack
import zstandard

from condaproxy.conda.decoding import MAX_DEPTH, Bounded
from condaproxy.conda.digests import MAX_TOKEN_BYTES
from condaproxy.conda.effective import effective_time, normalise
from condaproxy.conda.paths import package_parts
from condaproxy.conda.policy import Policy, Verdict
from condaproxy.conda.shards import RECORD_KEYS
from condaproxy.errors import RefusedDocument

# A record judged: the record to write (perhaps amended), or None to leave it out.
Judgement = Callable[[str, dict[str, Any]], dict[str, Any] | None]
HELD_LISTED = 1000  # held records named in a document's summary (the rest are only counted)


def is_record_group(prefix: str) -> bool:
    """Whether the map at this ijson prefix holds records keyed by file name."""
    if prefix in RECORD_KEYS:
        return True
    # CEP-48: record groups one level below "v3" ("v3.conda", "v3.whl", ...).
    return prefix.startswith("v3.") and prefix.count(".") == 1


@dataclass
class Held:
    """A record kept from clients, and why."""

    filename: str
    name: str
    version: str
    verdict: Verdict
    rule: str | None
    release: float | None


@dataclass
class Judge:
    """Judges records by a channel's policy, and by a view's instant; counts what it kept out."""

    policy: Policy | None
    now: float
    cutoff: float | None = None  # a view: records that appeared later are left out
    since: float | None = None  # when the ledger for the subdir began
    first_seen: Mapping[str, float] = field(default_factory=dict)  # filename -> first sighting
    subdir: str = "noarch"
    held: list[Held] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    next_release: float | None = None  # the earliest time a held record comes of age

    def __call__(self, filename: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as served, or None when it is left out."""
        appeared = effective_time(record, self.first_seen.get(filename), self.since)
        if self.cutoff is not None and appeared is not None and appeared > self.cutoff:
            self._count("view")
            return None
        name, version, build = _identity(filename, record)
        if self.policy is not None:
            number = record.get("build_number")
            decision = self.policy.decide(
                name,
                version,
                build,
                appeared,
                self.now,
                build_number=number if isinstance(number, int) else 0,
                subdir=str(record.get("subdir") or self.subdir),
            )
            if not decision.verdict.in_index:
                self._count(decision.verdict.value)
                if len(self.held) < HELD_LISTED:
                    self.held.append(
                        Held(filename, name, version, decision.verdict, decision.rule, decision.release)
                    )
                if decision.release is not None:
                    self.next_release = min(self.next_release or decision.release, decision.release)
                return None
            if self.policy.stamp and appeared is not None and "indexed_timestamp" not in record:
                # CEP-47, in milliseconds like conda's `timestamp`: clients' exclude-newer reads it.
                record = {**record, "indexed_timestamp": int(appeared * 1000)}
        return record

    def _count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


def _identity(filename: str, record: Mapping[str, Any]) -> tuple[str, str, str]:
    name, version, build = package_parts(filename)
    return (
        str(record.get("name") or name),
        str(record.get("version") or version),
        str(record.get("build") or build),
    )


# -- repodata.json ---------------------------------------------------------------------------------


class _Out:
    """Writes JSON tokens with the commas between them; buffered, for a stream writer."""

    def __init__(self, writer: IO[bytes]) -> None:
        self._writer = writer
        self._parts: list[str] = []
        self._size = 0
        self._counts: list[int] = []  # items so far in each open container
        self._after_key = False

    def _item(self) -> None:
        if self._after_key:
            self._after_key = False
        elif self._counts:
            if self._counts[-1]:
                self._put(",")
            self._counts[-1] += 1

    def _put(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size >= 1 << 20:
            self.flush()

    def open(self, char: str) -> None:
        self._item()
        self._put(char)
        self._counts.append(0)

    def close(self, char: str) -> None:
        self._counts.pop()
        self._put(char)

    def key(self, key: str) -> None:
        self._item()
        self._put(json.dumps(key))
        self._put(":")
        self._after_key = True

    def value(self, value: Any) -> None:
        self._item()
        self._put(json.dumps(value, separators=(",", ":")))

    def flush(self) -> None:
        self._writer.write("".join(self._parts).encode())
        self._parts.clear()
        self._size = 0


def json_events(stream: IO[bytes], max_events: int | None = None) -> Iterator[tuple[str, str, Any]]:
    """ijson.parse's (prefix, event, value) events, within the bounds digest learning keeps.

    The prefixes are built here from ijson's basic events, never by ijson.parse: its C backend
    builds a prefix string as long as the nesting for every event of a whole input chunk before
    yielding any, so an 85-byte .zst nesting 60,000 deep would cost gigabytes before a check
    here could refuse it. Bounded at MAX_DEPTH, a prefix stays short; max_events bounds the work.
    """
    guard = Bounded(stream, MAX_TOKEN_BYTES, "a single JSON token runs", reason="token")
    limit = max_events if max_events is not None else float("inf")
    path: list[str] = []
    for count, (event, value) in enumerate(ijson.basic_parse(guard, use_float=True), 1):
        guard.count = 0  # the budget is per token, not per file
        if count > limit:
            raise RefusedDocument("work", f"repodata past {max_events} parser events: refused")
        if event == "map_key":
            prefix = ".".join(path[:-1])
            path[-1] = value
        elif event in ("start_map", "start_array"):
            if len(path) >= MAX_DEPTH:
                raise RefusedDocument("depth", f"repodata nests deeper than {MAX_DEPTH} levels: refused")
            prefix = ".".join(path)
            path.append("" if event == "start_map" else "item")
        elif event in ("end_map", "end_array"):
            path.pop()
            prefix = ".".join(path)
        else:
            prefix = ".".join(path)
        yield prefix, event, value


def build_value(events: Iterator[tuple[str, str, Any]]) -> Any:
    """The next value of the event stream, built whole (one record: small)."""
    builder = ijson.ObjectBuilder()
    depth = 0
    for _, event, value in events:
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
        if depth == 0:
            break
    return builder.value


def iter_records(reader: IO[bytes], max_events: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(filename, record) for every record of a repodata document, one in memory at a time.

    RefusedDocument past the nesting, token or work (max_events) bounds.
    """
    events = json_events(reader, max_events)
    for prefix, event, value in events:
        if event == "map_key" and is_record_group(prefix):
            record = build_value(events)
            if isinstance(record, dict):
                yield value, record


def filter_repodata(
    reader: IO[bytes],
    writer: IO[bytes],
    judge: Judgement,
    info: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """Copy a repodata document from reader to writer, each record as judge says; returns kept count.

    info, if given, makes the top-level `info` object written from the one read.
    """
    out = _Out(writer)
    kept = 0

    def other(prefix: str, event: str, value: Any) -> None:
        if event in ("start_map", "start_array"):
            out.open("{" if event == "start_map" else "[")
        elif event in ("end_map", "end_array"):
            out.close("}" if event == "end_map" else "]")
        elif event == "map_key":
            out.key(value)
        else:
            out.value(value)

    def record(filename: str, value: dict[str, Any]) -> None:
        nonlocal kept
        served = judge(filename, value)
        if served is not None:
            out.key(filename)
            out.value(served)
            kept += 1

    events = json_events(reader)
    for prefix, event, value in events:
        if event == "map_key" and is_record_group(prefix):
            built = build_value(events)
            if isinstance(built, dict):
                record(value, built)
            else:  # not a record after all: copied as it is
                out.key(value)
                out.value(built)
        elif info is not None and event == "map_key" and prefix == "" and value == "info":
            built = build_value(events)
            out.key(value)
            out.value(info(built) if isinstance(built, dict) else built)
        else:
            other(prefix, event, value)
    out.flush()
    return kept


@dataclass(frozen=True, slots=True)
class RecordTimes:
    """What the ledger keeps of a record at its first sighting."""

    filename: str
    name: str
    timestamp: float | None
    indexed_timestamp: float | None


def record_times(filename: str, record: Mapping[str, Any]) -> RecordTimes:
    """What the ledger keeps of one record."""
    return RecordTimes(
        filename,
        str(record.get("name") or package_parts(filename)[0]),
        normalise(record.get("timestamp")),
        normalise(record.get("indexed_timestamp")),
    )


# -- CEP-16 shards ---------------------------------------------------------------------------------


def filter_shard(shard: Mapping[str, Any], judge: Judgement) -> tuple[dict[str, Any], int]:
    """A shard with each record as judge says (sha256 stays raw bytes); and how many were left out."""
    out = dict(shard)
    dropped = 0
    for key in RECORD_KEYS:
        group = shard.get(key)
        if not isinstance(group, dict):
            continue
        kept = {}
        for filename, record in group.items():
            served = judge(filename, record) if isinstance(record, dict) else record
            if served is None:
                dropped += 1
            else:
                kept[filename] = served
        out[key] = kept
    return out, dropped


def pack_shard(shard: Mapping[str, Any]) -> bytes:
    """A shard's bytes as served: msgpack, zstd-compressed (CEP-16)."""
    return zstandard.ZstdCompressor(level=10).compress(msgpack.packb(shard, use_bin_type=True))


def shard_records(shard: Mapping[str, Any]) -> int:
    """How many records a shard holds."""
    return sum(len(g) for k in RECORD_KEYS if isinstance(g := shard.get(k), dict))
