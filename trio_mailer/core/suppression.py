"""Which relay replies mean "this address is dead": the suppression classifier.

Pure. A mail that failed for good because the relay says the *mailbox or domain* does not exist
will fail the same way next time; sending to it again only burns reputation. The classifier
looks at the command the reply answered and at the reply itself:

- only RCPT replies count (a 550 to MAIL or DATA is about us or the content, not the address);
- the code must be 550, 551 or 553;
- with an enhanced status code (RFC 3463) it must be one that blames the address: 5.1.1 (bad
  mailbox), 5.1.2 (bad domain), 5.1.6 (mailbox moved), 5.1.10 (null MX, RFC 7505). Any other
  enhanced code (5.7.1 policy, 5.2.2 mailbox full, ...) does not suppress;
- without an enhanced code the text must say so plainly ("user unknown", "no such user",
  "mailbox not found", "does not exist", "domain not found", ...). A vague "rejected" does not.

The sender reports a final failure as ``"RCPT rejected: 550 5.1.1 text"``; ``parse_reply``
splits that.
"""

from __future__ import annotations

import re

import attrs

DEAD_CODES = frozenset({550, 551, 553})
DEAD_ENHANCED = frozenset({"5.1.1", "5.1.2", "5.1.6", "5.1.10"})
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPORT = re.compile(r"^(MAIL|RCPT|DATA|DOT) rejected: (\d{3})(?:[ -](.*))?$", re.DOTALL)
_DEAD_TEXT = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address|domain)"
    r"|mailbox (?:not found|unavailable|does not exist|doesn't exist)"
    r"|(?:user|recipient|address|mailbox|account) (?:does not exist|doesn't exist|not found)"
    r"|(?:domain|host) (?:not found|does not exist|doesn't exist)"
    r"|unknown (?:recipient|mailbox|address|domain)|invalid (?:recipient|mailbox)"
    r"|recipient address rejected: (?:user unknown|unknown)",
    re.IGNORECASE,
)


@attrs.frozen
class RelayReply:
    command: str  # "MAIL", "RCPT", "DATA" or "DOT"
    code: int
    text: str


def parse_reply(report: str) -> RelayReply | None:
    """``"RCPT rejected: 550 5.1.1 no such user"`` -> its parts; None for anything else."""
    match = _REPORT.match(report)
    if match is None:
        return None
    return RelayReply(match.group(1), int(match.group(2)), match.group(3) or "")


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 code that opens ``text`` ("5.1.1"), or None."""
    match = _ENHANCED.match(text)
    return None if match is None else ".".join(str(int(part)) for part in match.groups())


def is_dead_address(reply: RelayReply) -> bool:
    """True when ``reply`` says the mailbox or its domain does not exist (see module doc)."""
    if reply.command != "RCPT" or reply.code not in DEAD_CODES:
        return False
    enhanced = enhanced_status(reply.text)
    if enhanced is not None:
        return enhanced in DEAD_ENHANCED
    return _DEAD_TEXT.search(reply.text) is not None
