"""The HTML pages' shared frame and formatting helpers; every value is HTML-escaped here or by
the caller with html.escape, never interpolated raw."""

from __future__ import annotations

import html
import time

from aiohttp import web

# Only our own stylesheet and script; no inline code, no other origin, no framing.
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def esc(value: object) -> str:
    """HTML-escaped text of value ('' for None)."""
    return "" if value is None else html.escape(str(value), quote=True)


def page(title: str, body: str, *, script: bool = False) -> str:
    """A whole HTML document around body (already escaped HTML)."""
    js = '<script src="/_static/status.js" defer></script>' if script else ""
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title>"
        '<link rel=stylesheet href="/_static/condaproxy.css"><link rel=icon href="/_static/icon.svg">'
        f"{js}</head><body>"
        '<nav><a href="/">condaproxy</a><a href="/_status">status</a>'
        '<a href="/_setup">client set-up</a></nav>'
        f"{body}</body></html>\n"
    )


def html_response(text: str, status: int = 200) -> web.Response:
    """An HTML answer that no cache keeps and that loads nothing from elsewhere."""
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "X-Cache": "MISS",
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def size(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """75 -> '1m 15s'; negative -> 'now'."""
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "now"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def ago(at: float | None, now: float | None = None) -> str:
    """When, as '3m 2s ago'."""
    if at is None:
        return "never"
    return duration((now or time.time()) - at) + " ago"


def ratio(value: float | int | None) -> str:
    """0.734 -> '73.4%'."""
    return "-" if value is None else f"{100 * float(value):.1f}%"
