"""The few static files the HTML pages use, served by the proxy itself (no CDN, no build step)."""

from __future__ import annotations

import hashlib

from aiohttp import web

from condaproxy.http.problem import error

CSS = """
:root { color-scheme: light dark; --muted: #777; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 75rem; padding: 1rem 1.5rem; }
h1 { font-size: 1.5rem; margin: .2rem 0 1rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .4rem; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0; }
th, td { text-align: left; padding: .2rem .5rem; border-bottom: 1px solid #8884; vertical-align: top; }
th { font-weight: 600; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: #8881; padding: .6rem .8rem; overflow-x: auto; border-radius: 4px; }
.muted { color: var(--muted); } .ok { color: var(--ok); } .failing { color: var(--bad); font-weight: 600; }
.stale, .failed-over { color: var(--warn); font-weight: 600; }
progress { width: 8rem; vertical-align: middle; }
nav a { margin-right: 1rem; }
"""

JS = """
// Live refresh: fetch the page's <main> every few seconds and swap it in (no framework).
(function () {
  var box = document.getElementById("live");
  if (!box) { return; }
  function tick() {
    if (!box.checked) { return; }
    fetch(location.pathname + "?part=main", {cache: "no-store"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        var main = document.querySelector("main");
        if (fresh && main) { main.replaceWith(fresh); }
      })
      .catch(function () {});
  }
  setInterval(tick, 2000);
})();
"""

ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<circle cx="8" cy="8" r="7" fill="#2f81f7"/>'
    '<path d="M4 8h8M8 4v8" stroke="#fff" stroke-width="2"/></svg>'
)

_FILES = {
    "condaproxy.css": (CSS, "text/css"),
    "status.js": (JS, "text/javascript"),
    "icon.svg": (ICON, "image/svg+xml"),
}
_ETAGS = {
    name: '"' + hashlib.sha256(body.encode()).hexdigest()[:16] + '"' for name, (body, _) in _FILES.items()
}


async def static(request: web.Request) -> web.Response:
    """GET /_static/<name>"""
    name = request.match_info["name"]
    if name not in _FILES:
        return error(request, 404, f"no such file: {name}")
    body, ctype = _FILES[name]
    headers = {"ETag": _ETAGS[name], "Cache-Control": "public, max-age=300", "X-Cache": "MISS"}
    if request.headers.get("If-None-Match") == _ETAGS[name]:
        return web.Response(status=304, headers=headers)
    return web.Response(text=body, content_type=ctype, headers=headers)
