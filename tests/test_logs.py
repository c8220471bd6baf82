"""``printable``: text from outside reaches a log line with every control character escaped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.logs import MAX_LOGGED_CHARS, printable


def _escaped_one_by_one(text: str) -> str:
    if len(text) > MAX_LOGGED_CHARS:
        text = text[:MAX_LOGGED_CHARS] + "..."
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@given(st.text(max_size=400))
def test_printable_escapes_exactly_the_unprintable_characters(text: str) -> None:
    """The fast path for printable text gives what escaping each character gives."""
    assert printable(text) == _escaped_one_by_one(text)


def test_printable_escapes_a_forged_log_line() -> None:
    """CR/LF and other controls never reach the log as themselves; bytes are decoded first."""
    assert printable("250 ok\r\nINFO forged") == "250 ok\\r\\nINFO forged"
    assert printable(b"550 \x1b[31mred") == "550 \\x1b[31mred"
    assert printable("250 2.0.0 queued as 1A2B") == "250 2.0.0 queued as 1A2B"
