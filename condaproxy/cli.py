"""The condaproxy command: serve, check-config, verify."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from condaproxy import __version__
from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.load import default_config, load_config
from condaproxy.config.model import Config
from condaproxy.errors import ConfigError

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
    except ConfigError as exc:
        # A configuration mistake is the operator's to fix: one line, no traceback.
        print(f"condaproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condaproxy",
        description="A streaming, collapsing, persisting caching proxy for conda channels.",
    )
    parser.add_argument("--version", action="version", version=f"condaproxy {__version__}")
    _add_log_level(parser, "info")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)

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

    for sub in (serve, check, verify):
        # Also accepted after the command; SUPPRESS keeps the subparser from resetting it.
        _add_log_level(sub, argparse.SUPPRESS)
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", default=default, choices=_LOG_LEVELS, help="logging threshold (default: info)"
    )


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    # Imported here so that check-config works without the server's modules.
    from condaproxy.app import run

    run(config)
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
