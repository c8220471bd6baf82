"""SMTP reply classification per RFC 5321, by the command each reply answers."""

from __future__ import annotations

import pytest

from trio_mailer.core.smtp_replies import ReplyClass, classify, is_auth_config_error


@pytest.mark.parametrize(
    ("command", "code", "expected"),
    [
        ("MAIL", 250, ReplyClass.SUCCESS),
        ("RCPT", 251, ReplyClass.SUCCESS),
        ("DOT", 250, ReplyClass.SUCCESS),
        ("DATA", 354, ReplyClass.INTERMEDIATE),
        ("DATA", 250, ReplyClass.PROTOCOL_ERROR),
        ("MAIL", 354, ReplyClass.PROTOCOL_ERROR),
        ("RCPT", 450, ReplyClass.TRANSIENT),
        ("RCPT", 451, ReplyClass.TRANSIENT),
        ("RCPT", 452, ReplyClass.TRANSIENT),
        ("MAIL", 454, ReplyClass.TRANSIENT),
        ("DATA", 451, ReplyClass.TRANSIENT),
        ("DOT", 451, ReplyClass.TRANSIENT),
        ("RCPT", 550, ReplyClass.PERMANENT),
        ("DATA", 554, ReplyClass.PERMANENT),
        ("DOT", 552, ReplyClass.PERMANENT),
        ("MAIL", 421, ReplyClass.CLOSING),
        ("DATA", 421, ReplyClass.CLOSING),
        ("DOT", 421, ReplyClass.CLOSING),
        ("NOOP", 421, ReplyClass.CLOSING),
        ("MAIL", -1, ReplyClass.PROTOCOL_ERROR),  # smtplib's code for an unparsable reply
        ("DOT", 199, ReplyClass.PROTOCOL_ERROR),
        ("DOT", 600, ReplyClass.PROTOCOL_ERROR),
    ],
)
def test_classify(command: str, code: int, expected: ReplyClass) -> None:
    """2xx success, 4xx transient, 5xx permanent; 421 closing; the rest protocol errors."""
    assert classify(command, code) is expected


@pytest.mark.parametrize(
    ("code", "config"),
    [(535, True), (534, True), (530, True), (538, True), (454, False), (432, False), (421, False)],
)
def test_auth_config_errors(code: int, config: bool) -> None:
    """Bad credentials are configuration errors; 454 is a temporary problem."""
    assert is_auth_config_error(code) is config
