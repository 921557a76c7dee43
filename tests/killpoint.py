"""Run the condaproxy command under a Python audit hook (PEP 578), for crash and access tests.

    python killpoint.py kill EVENT N NEEDLE... -- serve --config FILE
        kill -9 the process at the N-th audit event EVENT whose arguments contain every NEEDLE
    python killpoint.py record LOGFILE -- serve --config FILE
        append the path of every file opened or listed to LOGFILE, one per line
    python killpoint.py threads EVENT LOGFILE -- serve --config FILE
        append "THREAD<tab>ARGS" for every audit event EVENT to LOGFILE: which thread did it

Audit events name the steps of a persist without any hook in the proxy's own code: "open" (the
temp file reopened to fsync it, the blob directory opened to fsync it), "os.link" (the blob
appears), "os.remove" (a replaced blob goes), "sqlite3.connect" (digest learning, after the
catalog commit). The hook runs in whichever thread raises the event, so the kill lands exactly
there, before the operation itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


def _kill_hook(event: str, count: int, needles: list[str]) -> None:
    seen = 0

    def hook(name: str, args: tuple[Any, ...]) -> None:
        nonlocal seen
        if name != event:
            return
        text = repr(args)
        if all(n in text for n in needles):
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _record_hook(logfile: str) -> None:
    # Unbuffered and opened before the hook exists, so writing never re-enters it.
    out = open(logfile, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if name in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
            path = args[0]
            if isinstance(path, int):
                return  # an already-open descriptor
            out.write(f"{os.fsdecode(path)}\n")

    sys.addaudithook(hook)


def _threads_hook(event: str, logfile: str) -> None:
    out = open(logfile, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if name == event:
            out.write(f"{threading.current_thread().name}\t{args!r}\n")

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    """Install the hook argv asks for, then run the condaproxy command after '--'."""
    split = argv.index("--")
    mode, *spec = argv[:split]
    if mode == "kill":
        event, count, *needles = spec
        _kill_hook(event, int(count), needles)
    elif mode == "record":
        _record_hook(spec[0])
    elif mode == "threads":
        _threads_hook(spec[0], spec[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from condaproxy.cli import main as cli

    return cli(argv[split + 1 :])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
