"""Logging setup for every command: human-readable lines, or one JSON object per line.

The worker's own logs, Faust's and aiokafka's (the Faust worker is told not to install its own
handlers), librdkafka's (routed through Python logging where a client is given a ``logger``),
Python warnings and uncaught exceptions all go through the one root handler configured here, so
with ``log_json`` on, every line on stderr is a JSON object that log shippers (Loki, Fluent Bit,
Vector, CloudWatch) can parse without a multi-line rule.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is emitted too.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (UTC, ISO-8601, ms), ``level``, ``logger``,
    ``message``, then ``exc_type``/``exc`` for exceptions, ``stack`` for stack info, and any
    ``extra=`` fields (values that JSON cannot hold are written with ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRS and not name.startswith("_") and name not in out:
                out[name] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def make_formatter(json_logs: bool) -> logging.Formatter:
    return JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str | int = "info", json_logs: bool = False, stream: IO[str] | None = None) -> None:
    """Replaces the root handlers with one stream handler (stderr by default); idempotent."""
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(json_logs))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of logger "py.warnings"
    if json_logs:
        _route_uncaught_exceptions()


def _route_uncaught_exceptions() -> None:
    """Uncaught exceptions are logged as records instead of printed as bare tracebacks."""
    crash = logging.getLogger("stream_detector.crash")

    def excepthook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("uncaught exception: %s", exc, exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        crash.critical("uncaught exception in thread %s: %s", getattr(args.thread, "name", "?"), args.exc_value,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


class RateLimitedLog:
    """At most one line per reason every ``interval_s`` seconds, saying how many were left out.

    A producer that sends nothing but bad messages would otherwise write one WARNING line per
    message: at thousands a second the log itself becomes the outage. The first occurrence of a
    reason is logged at once; later ones within the interval are counted, and the next line logged
    for that reason says how many were suppressed since the previous one. (The metrics count every
    occurrence.)
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING,
                 clock: Any = None):
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self.clock = clock or time.monotonic
        self._next: dict[str, float] = {}  # reason -> when its next line may be logged
        self._suppressed: dict[str, int] = {}

    def log(self, reason: str, message: str, *args: Any) -> bool:
        """Logs ``message % args`` unless ``reason`` was logged less than ``interval_s`` ago; True if logged."""
        now = self.clock()
        if now < self._next.get(reason, float("-inf")):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        self._next[reason] = now + self.interval_s
        suppressed = self._suppressed.pop(reason, 0)
        if suppressed:
            self.logger.log(self.level, message + " (and %d more with reason %s since the last such line)",
                            *args, suppressed, reason)
        else:
            self.logger.log(self.level, message, *args)
        return True
