"""Logging set-up, and escaping for text that comes from outside (SMTP replies, requests).

Pure. Text from a relay or a caller can hold CR/LF and forge log lines; ``printable`` escapes
every control character before it reaches a log record.
"""

from __future__ import annotations

import logging
import sys

MAX_LOGGED_CHARS = 300


def printable(text: str | bytes, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text`` with control characters escaped and cut to ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def configure_logging(level: int = logging.INFO) -> None:
    """One line per event on standard error, with time, level and logger name."""
    handler = logging.StreamHandler(sys.stderr)
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
