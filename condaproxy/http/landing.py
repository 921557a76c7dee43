"""GET / (what this is, the channels served) and GET /_setup (ready-to-paste client configuration
for this proxy's public URL), with GET /_setup/condarc serving the .condarc alone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from condaproxy import __version__
from condaproxy.config.model import Config
from condaproxy.http.forwarded import public_base
from condaproxy.http.pages import esc, html_response, page
from condaproxy.http.services import SERVICES


def public_url(request: web.Request) -> str:
    """The URL clients reach this proxy at: [lazy] public_url, a trusted front's, or the Host's."""
    config = request.app[SERVICES].config
    if config.lazy.public_url:
        return config.lazy.public_url
    found = public_base(
        request.scheme, request.host, request.remote, request.headers, config.lazy.trusted_proxies
    )
    return found or f"http://127.0.0.1:{config.lazy.streamer_port}"


@dataclass(frozen=True)
class Snippets:
    """Client configuration for one public URL."""

    condarc: str
    pixi: str
    rattler: str


def _q(value: str) -> str:
    # A JSON string is a valid YAML and TOML basic string for these (ASCII, no control characters).
    return json.dumps(value)


def _mirrored(config: Config) -> list[str]:
    names = sorted(config.channels)
    if config.upstream.allow_unlisted and "conda-forge" not in names:
        names.insert(0, "conda-forge")
    return names


def snippets(config: Config, url: str) -> Snippets:
    """The .condarc, pixi [mirrors] and rattler channel URL that point clients at url."""
    url = url.rstrip("/")
    lines = [f"# condaproxy at {url}", f"channel_alias: {_q(url)}"]
    pkgs = sorted(n for n in config.channels if n.startswith("pkgs/"))
    if pkgs:
        lines.append("default_channels:")
        lines += [f"  - {_q(f'{url}/{n}')}" for n in pkgs]
    mirrored = _mirrored(config)
    if mirrored:
        # libmamba resolves mirrored_channels before channel_alias: without them, mamba 2 goes
        # straight to the channel's own host.
        lines.append("mirrored_channels:")
        for name in mirrored:
            lines += [f"  {_q(name)}:", f"    - {_q(f'{url}/{name}')}"]
    condarc = "\n".join(lines) + "\n"

    pixi = ["# ~/.config/pixi/config.toml (or a workspace's .pixi/config.toml)", "[mirrors]"]
    for channel in sorted(config.channels.values(), key=lambda c: c.name):
        pixi.append(f"{_q(channel.url)} = [{_q(f'{url}/{channel.name}')}]")
    if config.upstream.allow_unlisted:
        pixi.append(f"{_q(config.upstream.default)} = [{_q(url)}]")
    example = mirrored[0] if mirrored else "CHANNEL"
    return Snippets(condarc, "\n".join(pixi) + "\n", f"{url}/{example}")


def _channels_served(config: Config) -> str:
    rows = "".join(
        f"<li><code>{esc(c.name)}</code> from <code>{esc(c.url)}</code></li>"
        for c in config.channels.values()
    )
    if config.upstream.allow_unlisted:
        default = esc(config.upstream.default)
        rows += f"<li>any other channel <code>NAME</code> from <code>{default}/NAME</code></li>"
    return f"<ul>{rows}</ul>" if rows else "<p>no channels are configured</p>"


async def landing(request: web.Request) -> web.Response:
    """GET /"""
    config = request.app[SERVICES].config
    url = public_url(request)
    body = (
        f"<h1>condaproxy {esc(__version__)}</h1>"
        "<p>A caching proxy for conda channels: each package is fetched from upstream once, "
        "verified against the channel's own sha256, kept, and streamed to every client that asks. "
        "Point conda, mamba, pixi or rattler at it and installs come from here.</p>"
        f"<h2>Channels served</h2>{_channels_served(config)}"
        f"<p>For example, <code>{esc(url)}/conda-forge/noarch/repodata.json</code>.</p>"
        '<h2>Next</h2><ul><li><a href="/_setup">Client set-up</a>: a ready-to-paste .condarc, '
        'pixi mirrors and channel URLs</li><li><a href="/_status">Status</a>: what the cache is doing</li>'
        '<li><a href="/metrics">/metrics</a> (Prometheus), <a href="/healthz">/healthz</a>, '
        '<a href="/readyz">/readyz</a></li></ul>'
    )
    return html_response(page("condaproxy", body))


async def setup_page(request: web.Request) -> web.Response:
    """GET /_setup"""
    config = request.app[SERVICES].config
    url = public_url(request)
    s = snippets(config, url)
    body = (
        "<h1>Client set-up</h1>"
        f"<p>This proxy's URL: <code>{esc(url)}</code>.</p>"
        "<h2>conda and mamba</h2>"
        "<p>Put this in <code>~/.condarc</code> (mamba also reads <code>~/.mambarc</code>), or fetch it: "
        f"<code>curl -o ~/.condarc {esc(url)}/_setup/condarc</code>.</p>"
        f"<pre id=condarc>{esc(s.condarc)}</pre>"
        "<h2>pixi</h2><p>Lock files keep the original URLs; pixi fetches them through these mirrors.</p>"
        f"<pre id=pixi>{esc(s.pixi)}</pre>"
        "<h2>rattler and py-rattler</h2>"
        f"<p>Use the channel's URL on the proxy, e.g. <code id=rattler>{esc(s.rattler)}</code>:</p>"
        f"<pre>rattler.solve(sources=[{esc(_q(s.rattler))}], specs=[...])</pre>"
    )
    return html_response(page("condaproxy client set-up", body))


async def setup_condarc(request: web.Request) -> web.Response:
    """GET /_setup/condarc"""
    text = snippets(request.app[SERVICES].config, public_url(request)).condarc
    return web.Response(
        text=text, content_type="text/yaml", headers={"Cache-Control": "no-store", "X-Cache": "MISS"}
    )


async def setup_pixi(request: web.Request) -> web.Response:
    """GET /_setup/pixi"""
    text = snippets(request.app[SERVICES].config, public_url(request)).pixi
    return web.Response(
        text=text, content_type="application/toml", headers={"Cache-Control": "no-store", "X-Cache": "MISS"}
    )
