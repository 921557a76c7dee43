"""The condaproxy command: serve, check-config, verify, stats, gc, invalidate, prefetch."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from condaproxy import __version__
from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.load import default_config, load_config
from condaproxy.config.model import Config
from condaproxy.errors import ConfigError
from condaproxy.ops.client import CommandError

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the condaproxy command line and return its exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits for --help, --version and usage errors; callers get a status instead.
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status: int = args.run(args)
    except (ConfigError, CommandError) as exc:
        # A configuration mistake is the operator's to fix: one line, no traceback.
        print(f"condaproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and status 2), like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        """Print `condaproxy ...: message` alone and exit 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="condaproxy",
        description="A streaming, collapsing, persisting caching proxy for conda channels.",
    )
    parser.add_argument("--version", action="version", version=f"condaproxy {__version__}")
    _add_log_level(parser, "info")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the proxy until interrupted")
    serve.add_argument("--config", metavar="FILE", help="INI configuration (default: built-in defaults)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--online",
        action="store_true",
        help="also check that the S3 bucket is reachable and writable with the credentials found",
    )
    check.set_defaults(run=_check_config)

    verify = commands.add_parser(
        "verify",
        help="re-hash every cached file; purge damaged ones so the next request fetches them again",
    )
    verify.add_argument("--config", metavar="FILE", help="INI configuration (default: built-in defaults)")
    verify.set_defaults(run=_verify)

    extra = _operator_commands(commands)
    for sub in (serve, check, verify, *extra):
        # Also accepted after the command; SUPPRESS keeps the subparser from resetting it.
        _add_log_level(sub, argparse.SUPPRESS)
    return parser


def _operator_commands(
    commands: argparse._SubParsersAction[_Parser],
) -> list[_Parser]:
    """stats, gc, invalidate and prefetch: the shell's side of the admin API."""
    config_help = "INI configuration (default: built-in defaults)"
    token_help = "admin token file (default: [admin] token_file)"
    stats = commands.add_parser("stats", help="units, bytes and hit ratios per channel")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=_run_stats)

    gc = commands.add_parser("gc", help="evict down to [cache] max_size now")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be evicted")
    gc.set_defaults(run=_run_gc)

    inval = commands.add_parser(
        "invalidate",
        help="mark a channel's or subdir's repodata stale now, or drop one cached file",
        description="TARGET is CHANNEL, CHANNEL/SUBDIR or CHANNEL/SUBDIR/FILE (conda-forge/linux-64).",
    )
    inval.add_argument("target", metavar="CHANNEL[/SUBDIR[/FILE]]")
    inval.set_defaults(run=_run_invalidate)

    pre = commands.add_parser(
        "prefetch",
        help="warm the cache through the running proxy from lock files",
        description=(
            "Fetch every package named by a pixi.lock, conda-lock.yml, @EXPLICIT file or environment.yml "
            "(solved with py-rattler: pip install 'condaproxy[solve]') through the proxy."
        ),
    )
    pre.add_argument("files", metavar="FILE", nargs="+", type=Path)
    pre.add_argument("--jobs", type=int, default=4, metavar="N", help="downloads at once (default 4)")
    pre.add_argument("--pin", action="store_true", help="pin what it fetched (needs the admin API)")
    pre.add_argument(
        "--platform", action="append", default=[], metavar="SUBDIR", help="environment.yml: solve for it"
    )
    pre.set_defaults(run=_run_prefetch)

    for sub in (stats, gc, inval, pre):
        sub.add_argument("--config", metavar="FILE", help=config_help)
        sub.add_argument("--proxy", metavar="URL", help="the running proxy (default: its listen address)")
    for sub in (gc, inval, pre):
        sub.add_argument("--token-file", metavar="FILE", help=token_help)
    return [stats, gc, inval, pre]


def _operator_config(args: argparse.Namespace) -> tuple[Config, str]:
    from condaproxy.ops.client import proxy_url

    config = load_config(args.config) if args.config else default_config()
    return config, proxy_url(config, args.proxy)


def _run_stats(args: argparse.Namespace) -> int:
    from condaproxy.ops.commands import stats

    config, url = _operator_config(args)
    return asyncio.run(stats(config, url, as_json=args.json))


def _run_gc(args: argparse.Namespace) -> int:
    from condaproxy.ops.commands import gc

    config, url = _operator_config(args)
    return asyncio.run(gc(config, url, dry_run=args.dry_run, token_file=args.token_file))


def _run_invalidate(args: argparse.Namespace) -> int:
    from condaproxy.ops.commands import invalidate

    config, url = _operator_config(args)
    return asyncio.run(invalidate(config, url, args.target, token_file=args.token_file))


def _run_prefetch(args: argparse.Namespace) -> int:
    from condaproxy.ops.prefetch import prefetch

    if args.jobs < 1:
        raise CommandError(f"--jobs: expected a positive number, got {args.jobs}")
    config, url = _operator_config(args)
    return asyncio.run(
        prefetch(
            config,
            url,
            args.files,
            jobs=args.jobs,
            pin=args.pin,
            token_file=args.token_file,
            platforms=args.platform,
        )
    )


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", default=default, choices=_LOG_LEVELS, help="logging threshold (default: info)"
    )


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    # Imported here so that check-config works without the server's modules.
    from condaproxy.app import run
    from condaproxy.ops.logs import configure

    log_files = configure(args.log_level, config.log)
    try:
        run(config, log_files)
    finally:
        log_files.close()
    return 0


def _verify(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    if config.store.s3:
        # S3 checked every object's sha256 when it was stored; a node holds no blobs of its own.
        print("verify checks the filesystem store; with [store] backend = s3 there is nothing local to check")
        return 0
    from condaproxy.cache.verify import verify

    report = verify(config.cache.directory)
    # 1 tells scripts that something was damaged (and is now gone), 0 that all was intact.
    return 1 if report.purged_units else 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    # Resolve interfaces too: an unknown one would otherwise only surface at serve time.
    addresses = bind_addresses(config.lazy.streamer_interface, source=args.file)
    print(f"{args.file}: ok")
    for line in _summary(config, addresses):
        print(f"  {line}")
    if args.online and config.store.s3:
        problem = asyncio.run(_check_bucket(config))
        if problem is not None:
            print(f"condaproxy: {args.file}: [store] {problem}", file=sys.stderr)
            return 1
        print(f"  store: bucket {config.store.bucket} reachable and writable")
    return 0


async def _check_bucket(config: Config) -> str | None:
    from condaproxy.app import s3_settings
    from condaproxy.store.s3 import S3Store

    store = await S3Store(s3_settings(config)).open()
    try:
        return await store.check()
    finally:
        await store.close()


def _summary(config: Config, addresses: Sequence[str]) -> list[str]:
    lazy, cache, up = config.lazy, config.cache, config.upstream
    port = lazy.streamer_port
    listen = ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)
    lines = [
        f"listen: {listen} ({', '.join(lazy.streamer_interface)})",
        (
            f"cache: {cache.directory} (repodata ttl {cache.repodata_ttl}s,"
            f" {cache.persist_workers} persist workers)"
        ),
        f"upstream: {up.default} (unlisted channels {'allowed' if up.allow_unlisted else 'refused'})",
    ]
    st = config.store
    if st.s3:
        where = st.endpoint_url or f"AWS {st.region or 'us-east-1'}"
        extras = [
            f"redirect ({st.presign_ttl}s)" if st.redirect else "",
            f"local cache {st.local_cache} bytes" if st.local_cache else "",
        ]
        lines.append(
            f"store: s3://{st.bucket}/{st.prefix} at {where}" + "".join(f", {e}" for e in extras if e)
        )
    else:
        lines.append(f"store: filesystem, {cache.directory / 'blobs'}")
    lines += [f"channel {c.name}: {c.url}" for c in config.channels.values()]
    return lines
