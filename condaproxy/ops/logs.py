"""Logging as [log] says: text or JSON lines, access lines to stderr or to a file written by a
background thread (never by the event loop), and the file reopened on SIGHUP (logrotate)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import queue
import sys
from typing import Any

from condaproxy.config.model import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS = "condaproxy.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access records carry their fields (see http/accesslog.py)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        when = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        data: dict[str, Any] = {"time": when.replace("+00:00", "Z"), "level": record.levelname}
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            data.update(access)
        else:
            data["logger"] = record.name
            data["message"] = record.getMessage()
            if record.exc_info:
                data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class LogFiles:
    """Log files this process writes, each through a queue drained by one listener thread."""

    def __init__(self) -> None:
        self._files: list[logging.FileHandler] = []
        self._listeners: list[logging.handlers.QueueListener] = []

    def add(self, logger: logging.Logger, handler: logging.FileHandler) -> None:
        """Send logger's records to handler, off the calling thread."""
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
        listener.start()
        logger.addHandler(logging.handlers.QueueHandler(records))
        self._files.append(handler)
        self._listeners.append(listener)

    def reopen(self) -> None:
        """Open every file anew (after logrotate moved it); blocking: call it off the loop."""
        for handler in self._files:
            stream = open(handler.baseFilename, "a", encoding=handler.encoding or "utf-8")  # noqa: SIM115
            handler.acquire()
            try:
                old = handler.setStream(stream)
            finally:
                handler.release()
            if old is not None:
                old.close()

    def close(self) -> None:
        """Flush and stop the writer threads; safe to call twice."""
        for listener in self._listeners:
            listener.stop()
        for handler in self._files:
            handler.close()
        self._listeners.clear()
        self._files.clear()


def configure(level: str, config: LogConfig) -> LogFiles:
    """Set up the root logger (stderr) and the access log as config says."""
    formatter: logging.Formatter = (
        JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(level.upper())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    files = LogFiles()
    if config.access_log is not None:
        access = logging.getLogger(ACCESS)
        handler = logging.FileHandler(config.access_log, encoding="utf-8")
        handler.setFormatter(
            formatter if config.format == "json" else logging.Formatter("%(asctime)s %(message)s")
        )
        files.add(access, handler)
        access.propagate = False
        access.setLevel(logging.INFO)  # an access file is wanted whatever the console's level
    return files
