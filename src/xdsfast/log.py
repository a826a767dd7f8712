"""Logging with Istio's scopes (``xdsproxy``, ``dns``), as text or JSON lines.

Text lines look like Istio's: ``<RFC 3339 time>\t<level>\t<scope>\t<message>``
followed by ``key=value`` fields; JSON lines carry the same keys.  Payloads and
tokens are never passed to a logger.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "none": logging.CRITICAL + 10,
}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn"}
_ROOT = "xdsfast"


def _stamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs * 1000):06d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, "fields", {})
    return fields


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        scope = record.name.rpartition(".")[2]
        level = _NAMES.get(record.levelno, "error")
        extra = "".join(f"\t{k}={v}" for k, v in _fields(record).items())
        line = f"{_stamp(record)}\t{level}\t{scope}\t{record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        import orjson  # here: only JSON logs need it, and it costs idle memory

        self._dumps = orjson.dumps

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _stamp(record),
            "level": _NAMES.get(record.levelno, "error"),
            "scope": record.name.rpartition(".")[2],
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return self._dumps(entry, default=str).decode()


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send every scope's lines to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger(_ROOT)
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False


def scope(name: str) -> logging.Logger:
    """The logger of one of Istio's scopes, e.g. ``scope("xdsproxy")``."""
    return logging.getLogger(f"{_ROOT}.{name}")


def fields(**values: Any) -> dict[str, Any]:
    """Structured fields for a log call: ``log.info("msg", extra=fields(id=3))``."""
    return {"fields": values}
