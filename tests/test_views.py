"""Channels as of a date: /@<when>/<channel>/... serves the revision current then, exactly.

Solve at T1; the upstream then publishes new versions and a repodata patch that changes a
dependency. A solve through /@T1/ gives exactly the T1 solution (the revision kept, patch and
all: X-Condaproxy-View: exact) while the plain channel gives the new one; a view of a time
before the proxy's first revision is today's repodata filtered by effective time.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from proxy import Proxy, check_invariants, make_config
from test_policy import DAY, solve
from timed_channel import Clock, Pkg, publish
from upstream import FakeUpstream


def rfc3339(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat()


@pytest.mark.parametrize("form", ["shards", "json"])
async def test_a_view_gives_exactly_the_solution_of_its_time(
    tmp_path: Path, upstream: FakeUpstream, form: str
) -> None:
    now = time.time()
    clock = Clock(now)
    root = tmp_path / "chan"
    before = [Pkg("alpha", "1.0", now - 30 * DAY), Pkg("app", "1.0", now - 30 * DAY, ("alpha",))]
    publish(root, before)
    upstream.mount("chan", root)
    proxy = await Proxy(make_config(tmp_path / "cache", upstream.url, repodata_ttl=0), clock=clock).start()
    try:
        first = await solve(f"{proxy.url}/chan", tmp_path / "c1", form, "app")
        assert first == {"app": "1.0", "alpha": "1.0"}
        t1 = clock.now + 1
        # The revalidation T1's requests started is over: a request now cannot join it.
        await proxy.idle()

        clock.advance(DAY)
        publish(
            root,
            [
                Pkg("alpha", "1.0", now - 30 * DAY),
                Pkg("alpha", "2.0", clock.now),
                Pkg("beta", "1.0", clock.now),
                Pkg("app", "1.0", now - 30 * DAY, ("alpha", "beta")),  # the repodata patch
            ],
        )
        plain = await solve(f"{proxy.url}/chan", tmp_path / "c2", form, "app")
        assert plain == {"app": "1.0", "alpha": "2.0", "beta": "1.0"}

        view = f"{proxy.url}/@{rfc3339(t1)}/chan"
        assert await solve(view, tmp_path / "c3", form, "app") == first
        # The form the client read at T1 is the revision kept, byte for byte.
        index = "repodata_shards.msgpack.zst" if form == "shards" else "repodata.json"
        answer = await proxy.get(f"/@{rfc3339(t1)}/chan/noarch/{index}")
        assert answer.headers["X-Condaproxy-View"] == "exact"
        if form == "json":
            assert json.loads(answer.body)["packages.conda"]["app-1.0-0.conda"]["depends"] == ["alpha"]
        await proxy.idle()
    finally:
        await proxy.close()
    check_invariants(tmp_path / "cache")


async def test_a_view_before_the_first_revision_is_filtered_by_effective_time(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    now = time.time()
    root = tmp_path / "chan"
    publish(
        root,
        [
            Pkg("alpha", "1.0", now - 30 * DAY),
            Pkg("alpha", "2.0", now - 2 * DAY),
            Pkg("beta", "1.0", now - 2 * DAY),
        ],
    )
    upstream.mount("chan", root)
    proxy = await Proxy(make_config(tmp_path / "cache", upstream.url), clock=Clock(now)).start()
    try:
        day = dt.datetime.fromtimestamp(now - 10 * DAY, dt.UTC).strftime("%Y-%m-%d")
        for when in (day, "5d", rfc3339(now - 3 * DAY)):
            answer = await proxy.get(f"/@{when}/chan/noarch/repodata.json")
            assert answer.status == 200, when
            assert answer.headers["X-Condaproxy-View"] == "filtered"
            assert set(json.loads(answer.body)["packages.conda"]) == {"alpha-1.0-0.conda"}, when
        assert (await solve(f"{proxy.url}/@5d/chan", tmp_path / "c", "shards"))["alpha"] == "1.0"
        assert (await solve(f"{proxy.url}/chan", tmp_path / "c2", "shards"))["alpha"] == "2.0"
        assert (await proxy.get("/@not-a-time/chan/noarch/repodata.json")).status == 404
    finally:
        await proxy.close()
