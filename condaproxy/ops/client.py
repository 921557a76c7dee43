"""Talking to a running proxy from a shell: where it listens, its admin API, its status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.model import Config


class CommandError(Exception):
    """A command cannot do what was asked: one line for the user, exit status 2."""


def proxy_url(config: Config, given: str | None = None) -> str:
    """The URL to reach the proxy of config at: --proxy, else its listen address (loopback first)."""
    if given:
        if not given.startswith(("http://", "https://")):
            raise CommandError(f"--proxy: expected an http(s) URL, got {given!r}")
        return given.rstrip("/")
    try:
        hosts = bind_addresses(config.lazy.streamer_interface, source=config.source)
    except Exception:  # an interface that does not exist here: fall back to loopback
        hosts = ["127.0.0.1"]
    loopback = [h for h in hosts if h in ("127.0.0.1", "::1")]
    host = (loopback or hosts or ["127.0.0.1"])[0]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{config.lazy.streamer_port}"


def admin_token(config: Config, token_file: str | None = None) -> str:
    """The admin token from --token-file or [admin] token_file."""
    path = Path(token_file) if token_file else config.admin.token_file
    if path is None:
        raise CommandError(
            "the running proxy's admin API is needed: set [admin] token_file (or give --token-file)"
        )
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the admin token: {exc.strerror}") from None
    if not token:
        raise CommandError(f"{path}: the admin token file is empty")
    return token


async def admin_post(url: str, token: str, endpoint: str, body: bytes | dict[str, Any]) -> dict[str, Any]:
    """POST to the admin API; its JSON answer, or CommandError with the problem's detail."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{url}/_admin/{endpoint}", data=data, headers=headers) as resp,
        ):
            raw = await resp.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {"detail": raw[:200].decode("utf-8", "replace").strip()}
            if resp.status >= 400:
                detail = answer.get("detail") if isinstance(answer, dict) else None
                raise CommandError(f"{url}/_admin/{endpoint}: {resp.status} {detail or resp.reason}")
            return dict(answer)
    except aiohttp.ClientError as exc:
        raise CommandError(f"cannot reach the proxy at {url}: {exc}") from None


async def fetch_status(url: str) -> dict[str, Any] | None:
    """The running proxy's /_status.json, or None when it does not answer."""
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=3)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url}/_status.json") as resp,
        ):
            if resp.status != 200:
                return None
            return dict(await resp.json())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
