"""GET /_status: the status snapshot as a small server-rendered HTML page (plain string
templates; every value escaped). `?part=main` returns only the <main> element, which the page's
few lines of script fetch every two seconds to stay live."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from aiohttp import web

from condaproxy.http.operations import OPERATIONS
from condaproxy.http.pages import ago, duration, esc, html_response, page, ratio, size
from condaproxy.http.services import SERVICES
from condaproxy.http.status import snapshot

_STATE_CLASS = {"ok": "ok", "failing": "failing", "serving stale": "stale", "failed over": "failed-over"}


def _table(head: list[str], rows: list[list[str]], numeric: Collection[int] = (), empty: str = "none") -> str:
    """A table from already-escaped cells; columns in numeric are right-aligned."""
    if not rows:
        return f"<p class=muted>{esc(empty)}</p>"
    th = "".join(f"<th{' class=n' if i in numeric else ''}>{h}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _traffic(data: dict[str, Any]) -> str:
    rows = []
    for span, label in (("hour", "last hour"), ("day", "last 24 h"), ("since_start", "since start")):
        t = data[span]
        rows.append(
            [
                esc(label),
                esc(t["requests"]),
                esc(ratio(t["hit_ratio"])),
                esc(ratio(t["byte_hit_ratio"])),
                esc(size(t["bytes_served"])),
                esc(size(t.get("bytes_from_upstream"))),
                esc(t["hits"]),
                esc(t["collapsed"]),
                esc(t["misses"]),
                esc(t["errors"]),
            ]
        )
    head = ["", "requests", "hit ratio", "byte hit ratio", "served", "from upstream"]
    head += ["hits", "collapsed", "misses", "errors"]
    return _table(head, rows, set(range(1, 10)))


def _channels(snap: dict[str, Any]) -> str:
    rows = []
    for c in snap["channels"]:
        state = c["state"]
        if state == "failing":
            state_html = (
                f"<span class=failing>failing</span> since {esc(ago(c['last_error_at'], snap['now']))}: "
                f"{esc(c['last_error'])}"
            )
        elif state == "failed over":
            state_html = f"<span class=failed-over>failed over</span> to <code>{esc(c['mirror'])}</code>"
        elif state == "serving stale":
            state_html = (
                f"<span class=stale>serving stale</span> ({esc(ago(c['last_stale_at'], snap['now']))})"
            )
        else:
            state_html = f"<span class={_STATE_CLASS.get(state, 'muted')}>{esc(state)}</span>"
        ups = (
            "<br>".join(f"<code>{esc(u)}</code>" for u in c["upstreams"])
            or "<span class=muted>not served</span>"
        )
        since = c["traffic"]["since_start"]
        rows.append(
            [
                f"<code>{esc(c['name'])}</code>",
                ups,
                state_html,
                esc(c["units"]),
                esc(size(c["bytes"])),
                esc(since["requests"]),
                esc(ratio(since["hit_ratio"])),
            ]
        )
    return _table(
        ["channel", "upstream", "state", "units", "stored", "requests", "hit ratio"], rows, {3, 4, 5, 6}
    )


def _metadata(snap: dict[str, Any]) -> str:
    rows = []
    for group in snap["metadata"]:
        for f in group["files"]:
            due = f["revalidate_in"]
            rows.append(
                [
                    f"<code>{esc(group['channel'])}/{esc(group['subdir'] or '.')}</code>",
                    f"<code>{esc(f['file'])}</code>",
                    esc(duration(f["age"])),
                    esc(duration(f["validated_age"])),
                    "due now" if due <= 0 else f"in {esc(duration(due))}",
                    f"<code>{esc(f['etag'] or '-')}</code>",
                    esc(size(f["size"])),
                ]
            )
    head = ["channel/subdir", "file", "age", "validated", "revalidated", "ETag", "size"]
    return _table(head, rows, {6}, "no repodata cached yet")


def _inflight(snap: dict[str, Any]) -> str:
    rows = []
    for d in snap["inflight"]:
        total = d["total"]
        bar = f"<progress max={int(total)} value={int(min(d['done'], total))}></progress> " if total else ""
        rows.append(
            [
                f"<code>{esc(d['path'])}</code>",
                esc(d["state"]),
                bar + esc(f"{size(d['done'])} of {size(total)}" if total else size(d["done"])),
                esc(f"{size(d['rate'])}/s" if d["rate"] else "-"),
                esc(d["clients"]),
                esc(duration(d["elapsed"])),
            ]
        )
    return _table(
        ["file", "state", "progress", "rate", "clients", "running"], rows, {3, 4, 5}, "no downloads in flight"
    )


def _store(snap: dict[str, Any]) -> str:
    st = snap["store"]
    limit = size(st["max_size"]) if st["max_size"] else "unlimited"
    used = f" ({100 * st['size'] / st['max_size']:.0f}%)" if st["max_size"] else ""
    pins = st["pins"]
    pin_text = (
        f"{len(pins['config'])} in [cache] pin, {pins['lockfile_files']} from pin_lockfile, "
        f"{len(pins['runtime'])} set at run time"
    )
    p = snap["persist"]
    return (
        "<table><tbody>"
        f"<tr><th>size</th><td>{esc(size(st['size']))} of {esc(limit)}{esc(used)} <span class=muted>"
        f"(files {esc(size(st['blobs']))}, catalog {esc(size(st['catalog']))})</span></td></tr>"
        f"<tr><th>units</th><td>{esc(st['units'])}</td></tr>"
        f"<tr><th>evicted since start</th><td>{esc(st['evicted_units'])} units, "
        f"{esc(size(st['evicted_bytes']))}</td></tr>"
        f"<tr><th>pins</th><td>{esc(pin_text)}</td></tr>"
        f"<tr><th>persist queue</th><td>{esc(p['queued'])} waiting, {esc(p['active'])} being stored "
        f"({esc(p['workers'])} workers)</td></tr>"
        "</tbody></table>"
    )


def _top(snap: dict[str, Any]) -> str:
    rows = [
        [f"<code>{esc(t['package'])}</code>", esc(t["requests"]), esc(size(t["bytes"]))] for t in snap["top"]
    ]
    return _table(["package", "requests", "served"], rows, {1, 2}, "no package requests yet")


def _recent(snap: dict[str, Any]) -> str:
    rows = [
        [
            esc(ago(e["at"], snap["now"])),
            f"<code>{esc(e['channel'])}/{esc(e['path'])}</code>",
            esc(e["reason"]),
            f"<span class=muted>{esc(e['detail'])}</span>",
        ]
        for e in snap["recent"]
    ]
    return _table(["when", "file", "reason", "detail"], rows, set(), "no misses yet")


def _prefetch(snap: dict[str, Any]) -> str:
    rows = []
    for j in snap["prefetch"]:
        failed = "; ".join(f"{f['file']}: {f['reason']}" for f in j["failed"][:5])
        rows.append(
            [
                esc(j["id"]),
                esc(j["source"]),
                esc(j["state"]),
                esc(f"{j['done']} of {j['total']}"),
                esc(j["fetched"]),
                esc(j["cached"]),
                esc(j["failed_count"]),
                esc(size(j["bytes"])),
                f"<span class=muted>{esc(failed)}</span>",
            ]
        )
    head = ["job", "lock file", "state", "progress", "fetched", "cached", "failed", "bytes", "failures"]
    return _table(head, rows, {4, 5, 6, 7}, "no prefetch jobs")


def render_main(snap: dict[str, Any]) -> str:
    """The <main> element: every section of the page."""
    return (
        "<main>"
        f"<p>condaproxy {esc(snap['version'])}, up {esc(duration(snap['uptime']))}.</p>"
        f"<h2>Traffic</h2>{_traffic(snap['traffic'])}"
        f"<h2>Downloads in flight</h2>{_inflight(snap)}"
        f"<h2>Channels and upstreams</h2>{_channels(snap)}"
        f"<h2>Repodata and shard indexes</h2>{_metadata(snap)}"
        f"<h2>Store</h2>{_store(snap)}"
        f"<h2>Prefetch</h2>{_prefetch(snap)}"
        f"<h2>Top packages</h2>{_top(snap)}"
        f"<h2>Recent misses and refusals</h2>{_recent(snap)}"
        "</main>"
    )


async def status_page(request: web.Request) -> web.Response:
    """GET /_status (and ?part=main for the live refresh)."""
    snap = await snapshot(request.app[SERVICES], request.app[OPERATIONS])
    main = render_main(snap)
    if request.query.get("part") == "main":
        return html_response(main)
    body = (
        "<h1>condaproxy status</h1>"
        "<p class=muted><label><input type=checkbox id=live checked> live</label> "
        '&middot; <a href="/_status.json">JSON</a> &middot; <a href="/metrics">metrics</a></p>'
        f"{main}"
    )
    return html_response(page("condaproxy status", body, script=True))
