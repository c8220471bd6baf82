"""SMTP reply codes, classified per RFC 5321 by the command they answer.

Pure. 2yz success, 4yz transient, 5yz permanent (section 4.2.1), except:

- 421 at any point means the relay is closing the channel (section 3.8): the session is gone and
  the mail was not taken, so it goes again on a new session.
- A reply that is not a three-digit 2yz-5yz code, or a positive code where the command cannot
  have one (2yz to DATA instead of 354), is a protocol error: the session can no longer be
  trusted and is replaced.
- For AUTH, 535 (bad credentials) and its relatives are configuration errors, not something a
  retry fixes; 454 is a temporary server problem.
"""

from __future__ import annotations

import enum

CLOSING = 421
# RFC 4954: 534 mechanism too weak, 535 credentials invalid, 538 encryption required;
# 530 authentication required. None of these heal by retrying sooner.
AUTH_CONFIG_ERRORS = frozenset({530, 534, 535, 538})


class ReplyClass(enum.Enum):
    SUCCESS = "success"
    INTERMEDIATE = "intermediate"  # 354 to DATA: go ahead
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CLOSING = "closing"  # 421
    PROTOCOL_ERROR = "protocol error"


def classify(command: str, code: int) -> ReplyClass:
    """Classify ``code`` as the reply to ``command`` ("MAIL", "RCPT", "DATA", "DOT", ...)."""
    if code == CLOSING:
        return ReplyClass.CLOSING
    if command == "DATA":
        if code == 354:
            return ReplyClass.INTERMEDIATE
        if 200 <= code < 400:
            return ReplyClass.PROTOCOL_ERROR
    if 200 <= code < 300:
        return ReplyClass.SUCCESS
    if 400 <= code < 500:
        return ReplyClass.TRANSIENT
    if 500 <= code < 600:
        return ReplyClass.PERMANENT
    return ReplyClass.PROTOCOL_ERROR


def is_auth_config_error(code: int) -> bool:
    """True when an AUTH failure means the credentials or set-up are wrong."""
    return code in AUTH_CONFIG_ERRORS
