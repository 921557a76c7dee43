"""Upstream connection pools: waiting for a pooled connection is queueing, not a timeout, and
metadata never queues behind package downloads."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

from channel import Channel
from proxy import Proxy, check_invariants, make_config
from upstream import FakeUpstream

CH = "/testchan"
CONNECT_TIMEOUT = 0.5
PER_HOST = 32  # the package pool's connections per upstream host


async def test_package_downloads_filling_the_pool_time_out_nobody(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """32 downloads in progress once made another client's cold request a 504 after connect_timeout."""
    config = make_config(tmp_path / "cache", upstream.url)
    config = replace(config, upstream=replace(config.upstream, connect_timeout=CONNECT_TIMEOUT))
    proxy = await Proxy(config).start()
    try:
        # The package digests' lookups read this index: cached first, so the pool holds only packages.
        assert (await proxy.get(f"{CH}/linux-64/repodata_shards.msgpack.zst")).status == 200
        await proxy.idle()
        rng = random.Random(7)
        ghosts = {f"{CH}/linux-64/busy{i}-1.0-h0_0.conda": rng.randbytes(128 << 10) for i in range(PER_HOST)}
        holds = []
        for path, data in ghosts.items():
            upstream.replace(path, data, "application/octet-stream")
            holds.append(upstream.hold(path, 1024))
        busy = [asyncio.ensure_future(proxy.get(p)) for p in ghosts]
        for hold in holds:
            await asyncio.wait_for(hold.reached.wait(), 10)  # every pooled connection is in use

        # Metadata has a pool of its own: answered now, however long the downloads take.
        repodata = await asyncio.wait_for(proxy.get(f"{CH}/noarch/repodata.json"), 10 * CONNECT_TIMEOUT)
        assert (
            repodata.status == 200 and repodata.body == (channel.path / "noarch/repodata.json").read_bytes()
        )

        # Another package waits for a connection, well past connect_timeout, and is not refused.
        pkg = channel.by_name("cp-data")
        queued = asyncio.ensure_future(proxy.get(f"{CH}/{pkg.url_path}"))
        await asyncio.sleep(4 * CONNECT_TIMEOUT)
        assert not queued.done(), queued.result()
        assert upstream.count(f"{CH}/{pkg.url_path}") == 0  # still queued: never reached upstream
        for hold in holds:
            hold.release()
        got = await asyncio.wait_for(queued, 20)
        assert got.status == 200 and got.body == pkg.read_bytes()
        for (path, data), done in zip(ghosts.items(), await asyncio.gather(*busy), strict=True):
            assert done.status == 200 and done.body == data, path
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)
    finally:
        await proxy.close()
