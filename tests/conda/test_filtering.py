"""Record filtering of repodata (streaming, unknown keys and CEP-48 v3 kept) and of shards."""

from __future__ import annotations

import io
import json

from condaproxy.conda.filtering import Judge, filter_repodata, filter_shard
from condaproxy.conda.policy import Policy, Verdict
from condaproxy.conda.rules import parse_rule

NOW = 2_000_000_000.0
DOC = {
    "info": {"subdir": "noarch"},
    "packages": {"a-1-0.tar.bz2": {"name": "a", "version": "1", "build": "0", "timestamp": 1_000_000_000}},
    "packages.conda": {
        "a-2-0.conda": {"name": "a", "version": "2", "build": "0", "timestamp": int((NOW - 60) * 1000)},
        "b-1-0.conda": {"name": "b", "version": "1", "build": "0"},
        "x-1-nightly.conda": {"name": "x-nightly", "version": "1", "build": "0", "timestamp": 1},
    },
    "removed": ["z-1-0.conda"],
    "repodata_version": 2,
    "v3": {"whl": {"c-1-py.whl": {"name": "c", "version": "1", "build": "py", "timestamp": 5}}},
    "future_key": {"nested": [1, 2.5, None, True, "s"]},
}


def run(judge: Judge) -> dict[str, object]:
    out = io.BytesIO()
    filter_repodata(io.BytesIO(json.dumps(DOC).encode()), out, judge)
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def test_young_and_hidden_records_go_everything_else_stays() -> None:
    policy = Policy("ch", min_age=3600, rules=(parse_rule("nightlies", "hide", "*-nightly"),))
    judge = Judge(policy, NOW)
    served = run(judge)
    assert set(served["packages.conda"]) == {"b-1-0.conda"}  # type: ignore[arg-type]
    assert {k: v for k, v in served.items() if k != "packages.conda"} == {
        k: v for k, v in DOC.items() if k != "packages.conda"
    }
    assert judge.counts == {"hold": 1, "hide": 1}
    assert judge.next_release == NOW - 60 + 3600
    assert {h.verdict for h in judge.held} == {Verdict.HOLD, Verdict.HIDE}


def test_a_view_drops_what_appeared_later_and_keeps_the_unknown() -> None:
    served = run(Judge(None, NOW, cutoff=1_500_000_000))
    assert set(served["packages.conda"]) == {"b-1-0.conda", "x-1-nightly.conda"}  # type: ignore[arg-type]
    assert set(served["packages"]) == {"a-1-0.tar.bz2"}  # type: ignore[arg-type]


def test_stamping_writes_the_effective_time() -> None:
    served = run(Judge(Policy("ch", stamp=True), NOW))
    record = served["packages.conda"]["a-2-0.conda"]  # type: ignore[index]
    assert record["indexed_timestamp"] == record["timestamp"]
    assert "indexed_timestamp" not in served["packages.conda"]["b-1-0.conda"]  # type: ignore[index]


def test_shards_keep_raw_sha256_and_drop_what_the_judge_says() -> None:
    shard = {
        "packages": {},
        "packages.conda": {
            "a-1-0.conda": {
                "name": "a",
                "version": "1",
                "build": "0",
                "sha256": b"\x01" * 32,
                "timestamp": 1,
            },
            "a-2-0.conda": {"name": "a", "version": "2", "build": "0", "sha256": b"\x02" * 32},
        },
        "removed": [],
    }
    filtered, dropped = filter_shard(shard, Judge(Policy("ch", rules=(parse_rule("r", "hide", "a 2"),)), NOW))
    assert dropped == 1 and list(filtered["packages.conda"]) == ["a-1-0.conda"]
    assert filtered["packages.conda"]["a-1-0.conda"]["sha256"] == b"\x01" * 32
