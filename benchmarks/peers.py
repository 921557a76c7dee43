"""The throttled origin, and the proxies compared, each configured as a careful admin would.

* origin: nginx serving the channels as static files, `limit_rate` per connection and a
  per-request delay (the echo module's non-blocking `echo_sleep`); one listening port per
  peer, so its access log ($request_time) tells whose fetch took how long.
* nginx: `proxy_cache` with `proxy_cache_lock` (lock timeouts raised for GB files), packages
  and shards cached for a year, repodata for 60 s and revalidated.
* squid: accelerator mode (`cache_peer ... originserver`), `collapsed_forwarding on`, aufs
  cache_dir, refresh patterns for immutable packages/shards and 60 s repodata.
* condaproxy: `condaproxy serve` with its own cache directory.
* cp+nginx: condaproxy behind nginx `proxy_cache`, which caches what condaproxy marks `public`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.procs import RssSampler, Server, SetupError, free_port, rss_of

REPO = Path(__file__).resolve().parent.parent
PEERS = ("condaproxy", "nginx", "squid", "cp+nginx")
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
NGINX_AGENT = "nginx-bench"
SQUID_AGENT = "squid-bench"
PROBE = "/benchchan/noarch/repodata.json"


@dataclass(frozen=True)
class Tools:
    nginx: str
    squid: str | None
    wrk: str
    pyspy: str | None


@dataclass
class Origin:
    """The throttled origin: one port per peer kind plus one for direct (uncontended) downloads."""

    server: Server
    ports: dict[str, int]
    access: Path
    rate_mib: float
    delay_ms: float
    delay_note: str

    def url(self, who: str) -> str:
        return f"http://127.0.0.1:{self.ports[who]}"


def _nginx_common(prefix: Path, workers: int, modules: str = "") -> str:
    # As root, workers would drop to "nobody", which cannot read the channel cache in ~/.cache.
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""{modules}
{user}
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
"""


def _http_common(prefix: Path) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{temp}
"""


def start_origin(nginx: str, work: Path, root: Path, rate_mib: float, delay_ms: float) -> Origin:
    prefix = work / "origin"
    prefix.mkdir()
    ports = {who: free_port() for who in ("direct", *PEERS)}
    access = prefix / "access.log"
    access.touch()
    modules, delay_note = "", "none"
    location = "        limit_rate {rate};\n"
    if delay_ms > 0 and ECHO_MODULE.exists():
        modules = f"load_module {ECHO_MODULE};"
        delay_note = f"{delay_ms:g} ms per request (echo_sleep)"
        location = f"        echo_sleep {delay_ms / 1000:.3f};\n        echo_exec @file;\n"
    elif delay_ms > 0:
        delay_note = f"none: {ECHO_MODULE} missing (apt-get install libnginx-mod-http-echo)"
    rate = f"{int(rate_mib)}m" if rate_mib > 0 else "0"
    listens = "\n".join(f"        listen 127.0.0.1:{p};" for p in ports.values())
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, 2, modules)
        + "http {"
        + _http_common(prefix)
        + f"""
    log_format origin '$server_port $request_method $request_uri $status $body_bytes_sent $request_time';
    access_log {access} origin;
    server {{
{listens}
        root {root};
        location / {{
{location.format(rate=rate)}        }}
        location @file {{
            limit_rate {rate};
        }}
    }}
}}
"""
    )
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    server = Server("origin", argv, ports["direct"], prefix / "stderr.log")
    server.wait_ready(PROBE)
    return Origin(server, ports, access, rate_mib, delay_ms, delay_note)


@dataclass
class Running:
    """A started peer: its URL, the processes whose memory counts, and how to stop it."""

    kind: str
    url: str
    servers: list[Server]
    probe: str
    cache_dir: Path | None = None  # condaproxy's cache directory
    prefix: Path | None = None  # configs, logs and caches: removed by stop() when `remove`
    remove: bool = False
    ready_s: float = 0.0

    @property
    def pid(self) -> int | None:
        """The condaproxy process (for profiling)."""
        for s in self.servers:
            if s.name == "condaproxy":
                return s.proc.pid
        return None

    def processes(self) -> list[psutil.Process]:
        return [p for s in self.servers for p in s.processes()]

    def rss(self) -> int:
        return rss_of(self.processes())

    def sampler(self) -> RssSampler:
        return RssSampler(self.servers)

    def alive(self) -> bool:
        return all(s.proc.poll() is None for s in self.servers)

    def tail(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.tail()}" for s in self.servers)

    def stop(self) -> None:
        try:
            for s in self.servers:
                s.stop()
        finally:
            if self.remove and self.prefix is not None:
                shutil.rmtree(self.prefix, ignore_errors=True)


def _proxy_locations(cache_valid: bool) -> str:
    """Locations of a caching nginx: repodata-like files briefly, the rest for a year."""
    common = f"""            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header User-Agent "{NGINX_AGENT}";
            proxy_cache bench;
            proxy_cache_key $uri;
            proxy_cache_lock on;
            # The 5 s defaults would send waiting clients to the origin for any large file.
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            proxy_cache_revalidate on;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_cache_background_update on;
            proxy_hide_header X-Cache;
            add_header X-Cache $upstream_cache_status always;
"""
    if not cache_valid:  # in front of condaproxy: its Cache-Control says what and how long
        return f"        location / {{\n{common}        }}\n"
    mutable = r"~ (repodata\.json(\.zst|\.bz2)?|current_repodata\.json.*|repodata_shards\.msgpack\.zst|channeldata\.json)$"
    return f"""        location {mutable} {{
{common}            proxy_cache_valid 200 60s;
        }}
        location / {{
{common}            proxy_cache_valid 200 206 365d;
        }}
"""


def _start_nginx_proxy(
    nginx: str, prefix: Path, upstream_port: int, workers: int, cache_valid: bool, name: str
) -> Server:
    prefix.mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers)
        + "http {"
        + _http_common(prefix)
        + f"""
    access_log off;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=bench:64m max_size=100g inactive=365d
                     use_temp_path=off;
    upstream upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{_proxy_locations(cache_valid)}    }}
}}
"""
    )
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return Server(name, argv, port, prefix / "stderr.log")


def _squid_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("proxy", "squid", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _start_squid(squid: str, prefix: Path, upstream_port: int) -> Server:
    prefix.mkdir(parents=True)
    port = free_port()
    user = _squid_user()
    conf = prefix / "squid.conf"
    immutable = "override-expire override-lastmod ignore-reload ignore-no-store ignore-private"
    conf.write_text(
        f"""workers 1
{f"cache_effective_user {user.pw_name}" if user else ""}
visible_hostname bench
http_port 127.0.0.1:{port} accel defaultsite=127.0.0.1 no-vhost
cache_peer 127.0.0.1 parent {upstream_port} 0 no-query no-digest originserver name=origin
cache_peer_access origin allow all
never_direct allow all
http_access allow localhost
http_access deny all
collapsed_forwarding on
cache_mem 256 MB
maximum_object_size_in_memory 512 KB
maximum_object_size 4 GB
cache_dir aufs {prefix}/cache 20000 16 256
cache_replacement_policy heap LFUDA
memory_replacement_policy heap GDSF
# Finish a fetch others may want even when its client goes away.
quick_abort_min -1 KB
read_ahead_gap 1 MB
refresh_pattern -i \\.(conda|tar\\.bz2)$ 525600 100% 525600 {immutable}
refresh_pattern -i /shards/[0-9a-f]+\\.msgpack\\.zst$ 525600 100% 525600 {immutable}
refresh_pattern -i (repodata\\.json(\\.zst|\\.bz2)?|current_repodata\\.json.*|repodata_shards\\.msgpack\\.zst|channeldata\\.json)$ 1 0% 1
refresh_pattern . 0 20% 4320
request_header_access User-Agent deny all
request_header_replace User-Agent {SQUID_AGENT}
via off
forwarded_for delete
httpd_suppress_version_string on
client_persistent_connections on
server_persistent_connections on
pid_filename {prefix}/squid.pid
cache_log {prefix}/cache.log
access_log none
cache_store_log none
coredump_dir {prefix}
logfile_rotate 0
pinger_enable off
icp_port 0
htcp_port 0
shutdown_lifetime 0 seconds
"""
    )
    if user is not None:
        for path in (prefix, *prefix.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
    init = subprocess.run([squid, "-N", "-z", "-f", str(conf)], capture_output=True, text=True, timeout=60)
    if init.returncode != 0:
        raise SetupError(f"squid -z failed ({init.returncode}):\n{init.stdout}{init.stderr}")
    # Killed when done: its graceful shutdown takes seconds, and its cache is thrown away.
    return Server("squid", [squid, "-N", "-f", str(conf)], port, prefix / "stderr.log", graceful=False)


def _start_condaproxy(
    prefix: Path, upstream: str, workers: int, cache: dict[str, str] | None, cache_dir: Path | None
) -> tuple[Server, Path]:
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    directory = cache_dir or prefix / "cache"
    extra = "".join(f"{k} = {v}\n" for k, v in (cache or {}).items())
    lazy_workers = f"workers = {workers}\n" if workers > 1 else ""
    ini = prefix / "condaproxy.ini"
    ini.write_text(
        f"""[lazy]
streamer_port = {port}
streamer_interface = 127.0.0.1
# Every load generator shares 127.0.0.1, as a CI fleet shares one NAT address: no per-client bound.
max_cold_per_client = 0
{lazy_workers}
[cache]
directory = {directory}
{extra}
derivations_per_client = 64

[upstream]
default = {upstream}
read_timeout = 120
"""
    )
    # --log-level warning: no access log, as for nginx (access_log off) and squid (access_log none).
    argv = [sys.executable, "-m", "condaproxy", "--log-level", "warning", "serve", "--config", str(ini)]
    return Server("condaproxy", argv, port, prefix / "stderr.log", cwd=REPO), directory


def start_peer(
    kind: str,
    tools: Tools,
    origin: Origin,
    prefix: Path,
    *,
    nginx_workers: int = 1,
    condaproxy_workers: int = 1,
    condaproxy_cache: dict[str, str] | None = None,
    cache_dir: Path | None = None,
) -> Running:
    """Start one peer (not yet waited for: call ready())."""
    peer = _start_peer(
        kind, tools, origin, prefix, nginx_workers, condaproxy_workers, condaproxy_cache, cache_dir
    )
    peer.prefix = prefix
    return peer


def _start_peer(
    kind: str,
    tools: Tools,
    origin: Origin,
    prefix: Path,
    nginx_workers: int,
    condaproxy_workers: int,
    condaproxy_cache: dict[str, str] | None,
    cache_dir: Path | None,
) -> Running:
    up_port = origin.ports[kind]
    if prefix.exists():
        shutil.rmtree(prefix)
    if kind == "condaproxy":
        server, directory = _start_condaproxy(
            prefix, origin.url(kind), condaproxy_workers, condaproxy_cache, cache_dir
        )
        return Running(kind, server.url, [server], "/healthz", cache_dir=directory)
    if kind == "nginx":
        server = _start_nginx_proxy(tools.nginx, prefix, up_port, nginx_workers, True, "nginx")
        return Running(kind, server.url, [server], PROBE)
    if kind == "squid":
        if tools.squid is None:
            raise SetupError("squid is not installed")
        server = _start_squid(tools.squid, prefix, up_port)
        return Running(kind, server.url, [server], PROBE)
    if kind == "cp+nginx":
        cp, directory = _start_condaproxy(
            prefix / "condaproxy", origin.url(kind), condaproxy_workers, condaproxy_cache, cache_dir
        )
        front = _start_nginx_proxy(
            tools.nginx, prefix / "nginx", cp.port, nginx_workers, False, "nginx front"
        )
        return Running(kind, front.url, [front, cp], PROBE, cache_dir=directory)
    raise ValueError(f"unknown peer {kind!r}")


def ready(peer: Running) -> Running:
    """Wait until every server of the peer answers; records the slowest start-up."""
    try:
        for s in reversed(peer.servers):  # the back end first
            peer.ready_s = max(peer.ready_s, s.wait_ready(peer.probe if s is peer.servers[0] else "/healthz"))
    except BaseException:
        peer.stop()
        raise
    return peer
