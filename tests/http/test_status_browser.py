"""The status page in a real headless browser (Debian's chromium, driven by playwright-python)
while a download is in flight: what it renders, that its own script keeps it live, that its
content security policy is never violated; a screenshot is saved in the test's temp dir."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, make_config
from upstream import FakeUpstream

IN_CI = os.environ.get("CI") == "true"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and Path(candidate).exists():
            return candidate
    if IN_CI:
        pytest.fail("chromium is not installed (CI=true: .ci/run installs it)")
    pytest.skip("chromium is not installed")


@pytest.fixture
async def patient_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Proxy]:
    """A proxy whose upstream may stall as long as the browser takes (a loaded machine is slow)."""
    config = make_config(tmp_path / "cache", upstream.url)
    config = replace(config, upstream=replace(config.upstream, read_timeout=120.0))
    proxy = await Proxy(config).start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_status_page_in_a_browser_during_a_download(
    patient_proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    proxy = patient_proxy
    executable = chromium()
    if IN_CI:
        from playwright import async_api  # a failure, not a skip, under CI
    else:
        async_api = pytest.importorskip("playwright.async_api")
    big = channel.by_name("cp-big")
    path = f"/testchan/{big.url_path}"
    await proxy.get("/testchan/noarch/repodata.json")  # something for the other sections
    hold = upstream.hold(path, at=0.4)
    download = asyncio.ensure_future(proxy.get(path))
    await asyncio.wait_for(hold.reached.wait(), 20)

    problems: list[str] = []
    async with async_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=ARGS
        )
        try:
            page = await context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            response = await page.goto(f"{proxy.url}/_status", wait_until="load")
            assert response is not None and response.status == 200
            text = await page.inner_text("main")
            assert "Downloads in flight" in text and big.filename in text
            inflight = f"h2:has-text('Downloads in flight') + table tr:has-text('{big.filename}')"
            row = await page.inner_text(inflight)
            assert "streaming" in row and "of 6.0 MiB" in row  # bytes done of the whole
            cells = await page.locator(f"{inflight} td").all_inner_texts()
            assert cells[4] == "1"  # one client attached
            assert "testchan" in await page.inner_text("h2:has-text('Channels') + table")
            assert "repodata.json" in await page.inner_text("h2:has-text('Repodata') + table")
            assert "cold" in await page.inner_text("h2:has-text('Recent misses') + table")
            assert await page.locator("progress").count() == 1
            await page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            assert (tmp_path / "status.png").stat().st_size > 10_000

            # The page stays live by itself: once the download ends, it says so.
            hold.release()
            result = await download
            assert result.status == 200 and result.body == big.read_bytes()
            # (A locator wait, not wait_for_function: the page's CSP forbids evaluating strings.)
            await page.get_by_text("no downloads in flight").wait_for(timeout=15_000)
            assert big.filename in await page.inner_text("h2:has-text('Top packages') + table")
            await page.screenshot(path=str(tmp_path / "status-after.png"), full_page=True)
        finally:
            await context.close()
    assert not problems, problems  # no script errors, no content-security-policy violations
