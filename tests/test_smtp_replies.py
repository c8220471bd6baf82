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


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (199, ReplyClass.PROTOCOL_ERROR),
        (200, ReplyClass.SUCCESS),
        (299, ReplyClass.SUCCESS),
        (300, ReplyClass.PROTOCOL_ERROR),
        (354, ReplyClass.PROTOCOL_ERROR),
        (399, ReplyClass.PROTOCOL_ERROR),
        (400, ReplyClass.TRANSIENT),
        (420, ReplyClass.TRANSIENT),
        (421, ReplyClass.CLOSING),
        (422, ReplyClass.TRANSIENT),
        (499, ReplyClass.TRANSIENT),
        (500, ReplyClass.PERMANENT),
        (599, ReplyClass.PERMANENT),
        (600, ReplyClass.PROTOCOL_ERROR),
        (0, ReplyClass.PROTOCOL_ERROR),
    ],
)
def test_reply_code_boundaries(code: int, expected: ReplyClass) -> None:
    """Each class's first and last code, and the codes just outside (to MAIL and to RCPT)."""
    assert classify("MAIL", code) is expected
    assert classify("RCPT", code) is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (199, ReplyClass.PROTOCOL_ERROR),
        (200, ReplyClass.PROTOCOL_ERROR),
        (299, ReplyClass.PROTOCOL_ERROR),
        (300, ReplyClass.PROTOCOL_ERROR),
        (353, ReplyClass.PROTOCOL_ERROR),
        (354, ReplyClass.INTERMEDIATE),
        (355, ReplyClass.PROTOCOL_ERROR),
        (399, ReplyClass.PROTOCOL_ERROR),
        (400, ReplyClass.TRANSIENT),
        (499, ReplyClass.TRANSIENT),
        (500, ReplyClass.PERMANENT),
        (599, ReplyClass.PERMANENT),
        (600, ReplyClass.PROTOCOL_ERROR),
    ],
)
def test_reply_code_boundaries_to_data(code: int, expected: ReplyClass) -> None:
    """To DATA only 354 goes ahead: any other 2yz or 3yz is a protocol error."""
    assert classify("DATA", code) is expected


def test_354_is_only_intermediate_to_data() -> None:
    assert classify("DOT", 354) is ReplyClass.PROTOCOL_ERROR
    assert classify("data", 354) is ReplyClass.PROTOCOL_ERROR  # commands are upper-case


def test_reply_class_values_are_stable() -> None:
    """The values appear in logs and metrics labels."""
    assert {c.name: c.value for c in ReplyClass} == {
        "SUCCESS": "success",
        "INTERMEDIATE": "intermediate",
        "TRANSIENT": "transient",
        "PERMANENT": "permanent",
        "CLOSING": "closing",
        "PROTOCOL_ERROR": "protocol error",
    }


@pytest.mark.parametrize("code", [529, 531, 533, 536, 537, 539, 250, 235, 0])
def test_other_codes_are_not_auth_config_errors(code: int) -> None:
    assert is_auth_config_error(code) is False
