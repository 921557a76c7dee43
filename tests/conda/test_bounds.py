"""Hostile documents against the readers: every bound refuses cheaply, and memory stays bounded.

The costly cases run in a child process whose address space is capped (RLIMIT_AS), so that a
regression fails the test instead of taking the machine; the child reports its peak RSS.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard

from condaproxy.cache import learning
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.unit import Unit
from condaproxy.conda import digests, packed, shards
from condaproxy.conda.baseurl import Sniffer, Verdict
from condaproxy.conda.decoding import MAX_DEPTH
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.errors import RefusedDocument

SHA = "ab" * 32
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "catalog.db"
    catalog = await Catalog.open(path)
    # Digests are learned only for a subdir with metadata cached: the one used here has one.
    key = UnitKey("c", "noarch", "repodata.json", Kind.REPODATA)
    await catalog.complete(Unit(key, f"https://up/{key}", "0" * 64, "0" * 64, 2, {}, None, None, 0.0, 0.0))
    await catalog.close()
    yield path


def learned(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return int(conn.execute("SELECT count(*) FROM digests").fetchone()[0])
    finally:
        conn.close()


def zst(path: Path, *parts: bytes) -> Path:
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=19).stream_writer(f) as w:
        for part in parts:
            w.write(part)
    return path


def nesting_bomb(path: Path, depth: int) -> Path:
    """The reported attack: a record's sha256 is `[` nested depth deep (85 bytes for 60,000)."""
    head = b'{"packages": {"a-1-0.conda": {"sha256": '
    return zst(path, head, b"[" * depth, b"]" * depth, b"}}}")


def child(script: str, *args: str, headroom: int = 256) -> dict[str, Any]:
    """Run script in a child with `headroom` MiB of address space beyond its start; its JSON report."""
    prologue = textwrap.dedent(
        f"""
        import json, resource, sys
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        import condaproxy.conda.shards, condaproxy.conda.digests  # their cost is not the documents'
        resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + ({headroom} << 20), resource.RLIM_INFINITY))
        def peak():  # VmHWM, not ru_maxrss: that one keeps the parent's peak across exec
            return status("VmHWM")
        report = {{"start": peak()}}
        """
    )
    epilogue = "\nreport['peak'] = peak()\nprint(json.dumps(report))\n"
    proc = subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(script) + epilogue, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.splitlines()[-1]))


# -- repodata JSON ---------------------------------------------------------------------------


def test_the_reported_nesting_bomb_is_85_bytes(tmp_path: Path) -> None:
    bomb = nesting_bomb(tmp_path / "repodata.json.zst", 60_000)
    assert bomb.stat().st_size < 100
    assert len(zstandard.ZstdDecompressor().decompressobj().decompress(bomb.read_bytes())) > 120_000


def test_a_nesting_bomb_is_refused_at_the_depth_bound(db: Path, tmp_path: Path) -> None:
    bomb = nesting_bomb(tmp_path / "repodata.json.zst", 60_000)
    with pytest.raises(RefusedDocument, match="nests deeper than 64") as refused:
        learning.learn(db, "c", "noarch", "repodata.json.zst", bomb)
    assert refused.value.reason == "depth"
    assert learned(db) == 0


def test_nesting_up_to_the_bound_is_read(db: Path, tmp_path: Path) -> None:
    # Document, "packages" and the record are three levels: a field may nest the rest.
    deep: Any = 1
    for _ in range(MAX_DEPTH - 3):
        deep = [deep]
    doc = {"packages": {"a-1-0.conda": {"deep": deep, "sha256": SHA, "size": 5}}}
    path = tmp_path / "repodata.json"
    path.write_text(json.dumps(doc))
    assert learning.learn(db, "c", "noarch", "repodata.json", path) == 1
    doc["packages"]["a-1-0.conda"]["deep"] = [deep]  # type: ignore[index]
    path.write_text(json.dumps(doc))
    with pytest.raises(RefusedDocument, match="deeper"):
        learning.learn(db, "c", "noarch", "repodata.json", path)


def test_the_work_bound_is_tied_to_the_stored_size(db: Path, tmp_path: Path) -> None:
    # Two million tokens: a few KiB compressed (refused), 4 MB of plain JSON (read).
    count = 2 * digests.MIN_EVENTS
    body = b"0," * (count - 1) + b"0"
    doc = (b'{"packages": {"a-1-0.conda": {"sha256": "' + SHA.encode() + b'"}}, "removed": [', body, b"]}")
    small = zst(tmp_path / "repodata.json.zst", *doc)
    assert digests.work_budget(small.stat().st_size) == digests.MIN_EVENTS < count
    with pytest.raises(RefusedDocument, match="parser events") as refused:
        learning.learn(db, "c", "noarch", "repodata.json.zst", small)
    assert refused.value.reason == "work"
    plain = tmp_path / "repodata.json"
    plain.write_bytes(b"".join(doc))
    assert learning.learn(db, "c", "noarch", "repodata.json", plain) == 1


def test_a_token_of_megabytes_is_refused(db: Path, tmp_path: Path) -> None:
    # The bound is checked per read of the parser (64 KiB): a token just past it may get through.
    long = b"a" * (digests.MAX_TOKEN_BYTES + (1 << 17))
    path = zst(tmp_path / "repodata.json.zst", b'{"packages": {"a-1-0.conda": {"sha256": "', long, b'"}}}')
    with pytest.raises(RefusedDocument) as refused:
        learning.learn(db, "c", "noarch", "repodata.json.zst", path)
    assert refused.value.reason == "token"


def test_the_base_url_sniffer_gives_up_on_a_deep_head() -> None:
    sniffer = Sniffer("repodata.json", "https://host/c/noarch/repodata.json")
    assert sniffer.feed(b'{"info": ' + b"[" * 200_000) is Verdict.UNKNOWN


@LINUX
def test_the_nesting_bomb_costs_little_memory(tmp_path: Path) -> None:
    # 80,000 deep took 15.6 GiB and 37 s through ijson.parse; here the child has 256 MiB to spare.
    bomb = nesting_bomb(tmp_path / "repodata.json.zst", 80_000)
    report = child(
        """
        from pathlib import Path
        from condaproxy.conda import digests
        from condaproxy.errors import RefusedDocument
        try:
            list(digests.digests_in(Path(sys.argv[1]), "repodata.json.zst"))
        except RefusedDocument as exc:
            report["refused"] = exc.reason
        """,
        str(bomb),
    )
    assert report["refused"] == "depth"
    assert report["peak"] - report["start"] < 32 << 20, report


# -- msgpack: shard indexes and shards ---------------------------------------------------------


def packed_bomb(path: Path, head: bytes, mib: int, fill: bytes = b"\x80") -> Path:
    """head, then an array of mib arrays of 1 Mi one-byte objects (fixmap 0: an empty map each)."""
    arrays = (b"\xdd" + (1 << 20).to_bytes(4, "big") + fill * (1 << 20) for _ in range(mib))
    return zst(path, head + b"\xdc" + mib.to_bytes(2, "big"), *arrays)


def packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _long_str(n: int) -> bytes:
    return b"\xdb" + n.to_bytes(4, "big") + b"a" * n


INFO = {"subdir": "noarch", "shards_base_url": "https://cdn.example/noarch/shards/", "base_url": ""}


def index_bomb(path: Path, mib: int) -> Path:
    """An index whose unknown key holds mib MiB of empty maps: ~3 KB for 90 MiB."""
    head = (
        b"\x83" + packb("info") + packb(INFO) + packb("shards") + packb({"numpy": bytes(32)}) + packb("junk")
    )
    return packed_bomb(path, head, mib)


def test_the_reported_object_bomb_is_a_few_kilobytes(tmp_path: Path) -> None:
    assert index_bomb(tmp_path / "index.msgpack.zst", 90).stat().st_size < 8 * 1024


def test_an_index_inflating_past_its_cap_is_refused(tmp_path: Path) -> None:
    bomb = index_bomb(tmp_path / "index.msgpack.zst", 8)
    with pytest.raises(RefusedDocument) as refused:
        shards.read_shard_index(bomb, limit=4 << 20)
    assert refused.value.reason == "inflated"
    with pytest.raises(RefusedDocument):
        shards.rewrite_index(bomb, tmp_path / "out", "https://host/c/noarch/x", limit=4 << 20)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # A map header announcing 2**31 entries: refused before any of them is read.
        (b"\x81" + packb("packages") + b"\xdf" + (1 << 31).to_bytes(4, "big"), "objects"),
        # A bin larger than the unpacker's buffer, skipped.
        (b"\x81" + packb("junk") + packb(b"x" * (3 << 20)), "objects"),
        # A file name longer than MAX_STR.
        (b"\x81" + packb("packages") + b"\x81" + _long_str(packed.MAX_STR + 1) + packb({}), "objects"),
        # Nested deeper than the unpacker's own stack.
        (b"\x81" + packb("junk") + b"\x91" * 5000 + b"\x00", "depth"),
        # One record of more than MAX_ENTRY bytes.
        (b"\x81" + packb("packages") + b"\x81" + packb("a-1-0.conda") + packb(["x" * 1000] * 300), "objects"),
    ],
    ids=["map-header", "huge-bin", "long-string", "deep", "big-record"],
)
def test_a_shard_past_an_object_bound_is_refused(tmp_path: Path, data: bytes, reason: str) -> None:
    path = zst(tmp_path / "shard.msgpack.zst", data)
    with pytest.raises(RefusedDocument) as refused:
        list(shards.iter_shard_digests(path))
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    "data",
    [
        packb([1, 2, 3]),  # not a map
        packb({"packages": {}}) + b"\x00",  # something after the document
        packb({"packages": {"a-1-0.conda": {"sha256": SHA}}})[:-10],  # cut short
    ],
    ids=["not-a-map", "extra-data", "truncated"],
)
def test_a_malformed_shard_is_an_error_not_a_refusal(tmp_path: Path, data: bytes) -> None:
    path = zst(tmp_path / "shard.msgpack.zst", data)
    with pytest.raises(ValueError) as error:
        list(shards.iter_shard_digests(path))
    assert not isinstance(error.value, RefusedDocument)


def test_a_zstd_frame_asking_for_a_huge_window_is_refused(tmp_path: Path) -> None:
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27, enable_ldm=True)
    path = tmp_path / "shard.msgpack.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
        w.write(packb({"packages": {}}))  # streamed: the size is unknown, the window stays
    frame = zstandard.get_frame_parameters(path.read_bytes())
    if frame.window_size <= packed.MAX_WINDOW:
        pytest.skip("zstd chose a smaller window for so small an input")
    with pytest.raises(zstandard.ZstdError):
        list(shards.iter_shard_digests(path))


def test_rewrite_index_changes_info_only_and_states_its_size(tmp_path: Path) -> None:
    index = {
        "version": 1,
        "info": INFO,
        "shards": {"numpy": bytes.fromhex(SHA), "python": bytes(32)},
        "unknown": [{"kept": True}, 1.5, b"\x00raw"],
    }
    src = zst(tmp_path / "index.msgpack.zst", packb(index))
    dst = tmp_path / "rewritten.msgpack.zst"
    base, package = shards.rewrite_index(src, dst, "https://host/c/noarch/repodata_shards.msgpack.zst")
    assert (base, package) == ("https://cdn.example/noarch/shards/", None)
    data = dst.read_bytes()
    inflated = zstandard.ZstdDecompressor().decompress(data)  # one-shot: needs the size in the header
    assert zstandard.frame_content_size(data) == len(inflated)
    assert msgpack.unpackb(inflated, raw=False) == {**index, "info": {**INFO, "shards_base_url": "./shards/"}}


def test_read_shard_index_keeps_only_the_names_asked_for(tmp_path: Path) -> None:
    index = {"info": {}, "shards": {f"p{i}": bytes(32) for i in range(1000)} | {"numpy": bytes.fromhex(SHA)}}
    path = zst(tmp_path / "index.msgpack.zst", packb(index))
    assert shards.read_shard_index(path, {"numpy", "absent"}) == ("./shards/", {"numpy": SHA})


def test_the_cursor_skips_without_reading_ahead_of_what_it_keeps() -> None:
    # An entry right after 3 MiB that the unpacker skipped must still be readable whole.
    doc = packb({"junk": [b"x" * 1000] * 3000, "packages": {"a-1-0.conda": {"sha256": bytes.fromhex(SHA)}}})
    cursor = packed.Cursor(io.BytesIO(doc), "test")
    assert cursor.map_len() == 2
    assert cursor.key() == "junk"
    cursor.skip()
    assert cursor.key() == "packages"
    assert cursor.map_len() == 1
    assert cursor.key() == "a-1-0.conda"
    assert cursor.entry() == {"sha256": bytes.fromhex(SHA)}
    cursor.finish()


@LINUX
def test_the_object_bomb_costs_little_memory_and_no_objects(tmp_path: Path) -> None:
    # 3 KB inflating to 100 MB of one-byte maps took 6.87 GiB through msgpack.unpackb.
    index = index_bomb(tmp_path / "index.msgpack.zst", 90)
    head = b"\x81" + packb("packages") + b"\x81" + packb("a-1-0.conda")
    shard = packed_bomb(tmp_path / "shard.msgpack.zst", head, 60)
    report = child(
        """
        from pathlib import Path
        from condaproxy.conda import shards
        from condaproxy.errors import RefusedDocument
        index, shard, out = (Path(a) for a in sys.argv[1:4])
        report["index"] = shards.read_shard_index(index)
        url = "https://host/c/noarch/repodata_shards.msgpack.zst"
        report["rewrite"] = shards.rewrite_index(index, out, url)
        try:
            list(shards.iter_shard_digests(shard))
        except RefusedDocument as exc:
            report["shard"] = exc.reason
        """,
        str(index),
        str(shard),
        str(tmp_path / "out.msgpack.zst"),
    )
    assert report["index"] == [INFO["shards_base_url"], {"numpy": "00" * 32}]
    assert report["rewrite"] == [INFO["shards_base_url"], None]
    assert report["shard"] == "objects"  # one record of 60 MiB
    # What remains is zstd's own state (the decoder's window, the rewrite's encoder).
    assert report["peak"] - report["start"] < 96 << 20, report
