"""Logging set-up, and escaping for text that comes from outside (SMTP replies, requests).

Text from a relay or a caller can hold CR/LF and forge log lines; ``printable`` (a plain
function) escapes every control character before it reaches a log record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

MAX_LOGGED_CHARS = 300


def printable(text: str | bytes, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text`` with control characters escaped and cut to ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():  # the common case (every relay reply, per mail), in one C call
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, message_id when the record
    carries one (``extra={"message_id": ...}``), and trace_id and span_id when a span is current
    (traces on: ``trio_mailer.tracing``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        message_id = getattr(record, "message_id", None)
        if message_id is not None:
            # Anything but a string (a caller's bug) is named by its type, never its value (a
            # whole mail, say): the line is written, not lost to a formatter that raised.
            entry["message_id"] = (
                message_id if isinstance(message_id, str) else f"<{type(message_id).__name__}>"
            )
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """One line per event on standard error: human-readable text, or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_secret_bearing_loggers()


def quiet_secret_bearing_loggers() -> None:
    """The HTTP/2 libraries log every header at DEBUG, bearer tokens included: never below
    WARNING, whatever the root level."""
    for name in ("hpack", "h2"):
        logging.getLogger(name).setLevel(logging.WARNING)
