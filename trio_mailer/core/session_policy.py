"""What a sender does with its SMTP session: probe it, recycle it, or replace it after a reply.

Pure: the session keeper (``delivery/session_keeper.py``) asks these functions and does what
they answer.

Theory of operation
-------------------
A session is reused for many mails. Before a mail:

- ``should_probe``: a session that already carried a mail and then sat idle for ``noop_idle_s``
  or more gets a NOOP first (relays drop idle sessions); a busy one does not (a broken session is
  caught by the send itself, and the mail goes again on a new one).
- ``should_recycle``: a session that carried ``max_messages`` *attempts* (delivered or not: a
  relay's per-session cap counts every transaction) or lived ``max_age_s`` is closed with QUIT,
  and the next mail opens a new one.

After a 4xx/5xx reply to MAIL, RCPT, DATA or the final "." (``after_rejection``), the reply is
classified by ``smtp_replies.classify`` and then it is decided whether the *session* is to blame:

- 5xx: the mail failed for good (``PERMANENT``); the session is reset with RSET and reused.
- A 4xx the relay ties to the session: enhanced status 4.5.3 ("too many messages sent",
  OpenSMTPD after its per-session cap of 100 by default), or a reply to MAIL, on a session that
  already carried a mail, whose text says a per-session limit was reached ("too many
  messages/mails/transactions", "per session/connection"). The mail is not at fault: the
  session is replaced (QUIT) and the mail goes again at once (``SESSION_LOST``), without
  counting as relay trouble. A 4xx about capacity in general (4.3.1 out of storage) is not
  tied to the session, and waits like any other.
- Any other 4xx is about this mail (greylisting, a full mailbox): ``TRANSIENT``, retried after
  the retry backoff; the session is reset and reused.

421 never reaches here: it ends the session at any point (``SessionLost``).
"""

from __future__ import annotations

import enum
import re

import attrs

from trio_mailer.core.retry_policy import AttemptResult
from trio_mailer.core.smtp_replies import ReplyClass, classify

# RFC 3463 enhanced status codes that say the session (not the mail) hit a limit.
SESSION_LIMIT_STATUSES = frozenset({"4.5.3"})
_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")
_SESSION_LIMIT_TEXT = re.compile(
    r"too many (messages|mails|transactions)|per[- ](session|connection)", re.IGNORECASE
)


class SessionAction(enum.Enum):
    KEEP = "keep"  # RSET and reuse
    REPLACE = "replace"  # close it; the next attempt opens a new session


@attrs.frozen
class RejectionDecision:
    result: AttemptResult
    session: SessionAction


def should_probe(*, used: bool, idle_s: float, noop_idle_s: float) -> bool:
    """NOOP before the next mail: only after the session carried a mail and then sat idle."""
    return used and idle_s >= noop_idle_s


def should_recycle(*, attempts: int, age_s: float, max_messages: int, max_age_s: float) -> bool:
    """QUIT the session now: it carried ``max_messages`` attempts or lived ``max_age_s``."""
    return attempts >= max_messages or age_s >= max_age_s


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply's text ("4.5.3"), if any."""
    match = _ENHANCED.match(text)
    return match.group(1) if match else None


def after_rejection(
    command: str, code: int, text: str, *, session_attempts_before: int
) -> RejectionDecision:
    """What follows a 4xx/5xx reply to ``command`` ("MAIL", "RCPT", "DATA", "DOT").

    Args:
        session_attempts_before: transactions this session carried before this one.
    """
    kind = classify(command, code)
    if kind is ReplyClass.PERMANENT:
        return RejectionDecision(AttemptResult.PERMANENT, SessionAction.KEEP)
    if kind is not ReplyClass.TRANSIENT:
        # Not a rejection at all (a protocol error or 421): the session cannot be trusted.
        return RejectionDecision(AttemptResult.SESSION_LOST, SessionAction.REPLACE)
    session_tied = enhanced_status(text) in SESSION_LIMIT_STATUSES or (
        command == "MAIL"
        and session_attempts_before > 0
        and _SESSION_LIMIT_TEXT.search(text) is not None
    )
    if session_tied:
        return RejectionDecision(AttemptResult.SESSION_LOST, SessionAction.REPLACE)
    return RejectionDecision(AttemptResult.TRANSIENT, SessionAction.KEEP)
