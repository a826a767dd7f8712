"""Logging with Istio's scopes (``xdsproxy``, ``dns``), as text or JSON lines.

Text lines look like Istio's: ``<RFC 3339 time>\t<level>\t<scope>\t<message>``
followed by ``key=value`` fields; JSON lines carry the same keys.  Payloads and
tokens are never passed to a logger.
"""

from __future__ import annotations

import asyncio
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


class _Held:
    """One throttled line's state: when it was last written, and the last one held back."""

    __slots__ = ("args", "count", "fields", "level", "timer", "written")

    def __init__(self) -> None:
        self.written = -1e18  # monotonic time the line was last written
        self.count = 0  # lines held back since then
        self.level = logging.INFO
        self.args: tuple[Any, ...] = ()
        self.fields: dict[str, Any] = {}
        self.timer: asyncio.TimerHandle | None = None


class Throttle:
    """Writes a line that repeats (same logger, same message template) at most once per
    ``interval``: a peer that makes the agent log per stream or per packet costs a line per
    interval, not a line per attempt.

    The first line is written at once; those that follow within the interval are held back
    and counted, and when the interval ends the last of them is written with
    ``repeats=N`` (N lines, itself included, since the previous one written)."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._held: dict[str, _Held] = {}  # per message template: a few, fixed in the code

    def log(self, level: int, msg: str, *args: Any, **values: Any) -> None:
        """``logger.log(level, msg, *args, extra=fields(**values))``, throttled."""
        if not self.logger.isEnabledFor(level):
            return
        held = self._held.get(msg)
        if held is None:
            held = self._held[msg] = _Held()
        now = time.monotonic()
        if held.timer is None and now - held.written >= self.interval:
            count, held.count = held.count, 0  # held back without a loop to flush them
            held.written = now
            extra = fields(**values) if not count else fields(**values, repeats=count + 1)
            self.logger.log(level, msg, *args, extra=extra)
            return
        held.count += 1
        # Kept as text: an exception argument would keep its traceback's frames alive.
        held.level, held.fields = level, values
        held.args = tuple(a if isinstance(a, (str, int, float)) else str(a) for a in args)
        if held.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: the count goes out with the next line written
                return
            wait = max(held.written + self.interval - now, 0.0)
            held.timer = loop.call_later(wait, self._flush, msg)

    def _flush(self, msg: str) -> None:
        """The interval ended: the last line held back, with how many it stands for."""
        held = self._held[msg]
        held.timer = None
        if held.count:
            count, held.count = held.count, 0
            held.written = time.monotonic()
            args, extra = held.args, fields(**held.fields, repeats=count)
            held.args, held.fields = (), {}
            self.logger.log(held.level, msg, *args, extra=extra)

    def info(self, msg: str, *args: Any, **values: Any) -> None:
        self.log(logging.INFO, msg, *args, **values)

    def warning(self, msg: str, *args: Any, **values: Any) -> None:
        self.log(logging.WARNING, msg, *args, **values)

    def error(self, msg: str, *args: Any, **values: Any) -> None:
        self.log(logging.ERROR, msg, *args, **values)

    def close(self) -> None:
        """Write what is held back now (shutting down), and cancel the timers."""
        for msg, held in list(self._held.items()):
            if held.timer is not None:
                held.timer.cancel()
            self._flush(msg)
