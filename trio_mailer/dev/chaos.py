"""Relay faults on demand for ``trio-mailer dev`` (``PUT /api/chaos``), without I/O.

Theory of operation
-------------------
A ``Chaos`` says: answer the next ``count`` mails at ``stage`` with ``reply``. The capture relay
asks ``take(command)`` before each reply it is about to send; at the chaos's stage the answer is
the chaos reply and a ``Chaos`` with one less to go (``OFF`` after the last). The relay's own
rule then applies (``smtp_server``'s module docstring): a replaced reply never invents state,
so a 4xx/5xx at RCPT refuses the recipient and at the end of data loses the mail.

=========  ==============================================================================
stage      the reply replaced
=========  ==============================================================================
connect    the greeting of a new connection (one connection counts as one)
mail       the reply to MAIL FROM
rcpt       the reply to RCPT TO
data       the reply after the final "." (the mail's content was sent, then refused)
=========  ==============================================================================

``parse_chaos`` reads the JSON body of ``PUT /api/chaos`` and names the field at fault.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

__all__ = ["MAX_COUNT", "MAX_REPLY_CHARS", "OFF", "STAGES", "Chaos", "ChaosError", "parse_chaos"]

STAGES = {"connect": "GREETING", "mail": "MAIL", "rcpt": "RCPT", "data": "DOT"}
"""Each stage, and the relay reply it replaces (a name of ``smtp_server.REPLY_COMMANDS``)."""
MAX_COUNT = 1000
MAX_REPLY_CHARS = 512  # RFC 5321 section 4.5.3.1.5: a reply line, CRLF included
_EXAMPLE_REPLY = "451 4.3.0 try again later"
_FIELDS = ("stage", "reply", "count")
_REFUSAL = re.compile(r"[45][0-5][0-9] \S.*")  # a 4xx/5xx code, a space, some text


class ChaosError(ValueError):
    """A ``PUT /api/chaos`` body that cannot be used; ``str()`` names the field first."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@attrs.frozen
class Chaos:
    stage: str | None = None
    reply: str | None = None
    count: int = 0

    def take(self, command: str) -> tuple[str | None, Chaos]:
        """The reply to send instead of the normal one before ``command`` (None: the normal
        one), and the chaos left after it."""
        if self.count == 0 or self.stage is None or STAGES[self.stage] != command:
            return None, self
        rest = OFF if self.count == 1 else attrs.evolve(self, count=self.count - 1)
        return self.reply, rest

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "reply": self.reply, "count": self.count}


OFF = Chaos()


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _stage(value: object) -> str:
    if value not in STAGES:
        raise ChaosError("stage", f"expected one of {', '.join(STAGES)}, got {_shown(value)}")
    assert isinstance(value, str)
    return value


def _reply(value: object) -> str:
    if not isinstance(value, str):
        raise ChaosError(
            "reply", f"expected a string such as {_shown(_EXAMPLE_REPLY)}, got {_shown(value)}"
        )
    if not value.isascii():
        raise ChaosError("reply", "expected one line of printable ASCII, got a non-ASCII character")
    if not value.isprintable():
        raise ChaosError("reply", "expected one line of printable ASCII, got a control character")
    if len(value) > MAX_REPLY_CHARS:
        raise ChaosError(
            "reply", f"expected at most {MAX_REPLY_CHARS} characters, got {len(value)}"
        )
    if _REFUSAL.fullmatch(value) is None:
        raise ChaosError(
            "reply",
            f"expected a 4xx or 5xx reply such as {_shown(_EXAMPLE_REPLY)}, got {_shown(value)}",
        )
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ChaosError(
            "count", f"expected a whole number from 0 to {MAX_COUNT}, got {_shown(value)}"
        )
    return value


def parse_chaos(body: bytes) -> Chaos:
    """The chaos a ``PUT /api/chaos`` body asks for: ``{"stage", "reply", "count"}``.

    ``count`` defaults to 1; 0 turns chaos off (``stage`` and ``reply`` may then be left out).

    Raises:
        ChaosError: the body is not a JSON object, a field is unknown, missing or invalid.
    """
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ChaosError("body", "expected a JSON object, got invalid JSON") from None
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else _shown(value)
        raise ChaosError("body", f"expected a JSON object, got {kind}")
    for name in value:
        if name not in _FIELDS:
            raise ChaosError(name[:60], f"unknown field (known: {', '.join(_FIELDS)})")
    count = _count(value.get("count", 1))
    stage = _stage(value["stage"]) if "stage" in value else None
    reply = _reply(value["reply"]) if "reply" in value else None
    if count == 0:
        return OFF
    if stage is None:
        raise ChaosError("stage", f"required when count is above 0 (one of {', '.join(STAGES)})")
    if reply is None:
        raise ChaosError("reply", f"required when count is above 0, e.g. {_shown(_EXAMPLE_REPLY)}")
    return Chaos(stage, reply, count)
