"""Building the RFC 5322 message, and its own safety check."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import InvalidRequest, MessageBuildError
from trio_mailer.core.message import EXPECTED_HEADERS, MailComposer, check_serialized
from trio_mailer.core.rendering import MailKind, MailTemplates

NOW = datetime(2026, 11, 27, 18, 30, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def composer() -> MailComposer:
    return MailComposer(
        templates=MailTemplates.load(shipped_templates_dir()),
        from_address="noreply@example.com",
        service_name="Acme Accounts",
    )


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def test_message_has_exactly_the_expected_headers(composer: MailComposer) -> None:
    """From with display name, To, Subject, Date, Message-ID and a UTF-8 text/plain body."""
    mail = composer.compose(MailKind.PASSWORD, "user@example.com", "739201", NOW)
    message = parse(mail.data)
    assert {name.lower() for name in message.keys()} == EXPECTED_HEADERS
    assert str(message["From"]) == "Acme Accounts <noreply@example.com>"
    assert str(message["To"]) == "user@example.com"
    assert str(message["Subject"]) == "Your Acme Accounts password code"
    assert str(message["Date"]) == "Fri, 27 Nov 2026 18:30:05 +0000"
    assert str(message["Message-ID"]) == mail.message_id
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert "\r\n    739201\r\n" in message.get_content()
    assert mail.data.count(b"\r\n") == mail.data.count(b"\n")  # CRLF line ends only


def test_envelope_and_message_id(composer: MailComposer) -> None:
    """The envelope uses the configured From and the validated To; ids are unique."""
    first = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    second = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    assert (first.envelope_from, first.envelope_to) == ("noreply@example.com", "user@example.com")
    assert first.kind is MailKind.RETRIEVE
    assert first.message_id.startswith("<") and first.message_id.endswith("@example.com>")
    assert first.message_id != second.message_id


def test_non_ascii_code_and_service_name_are_encoded(composer: MailComposer) -> None:
    """Non-ASCII text travels as RFC 2047 headers and a UTF-8 body, and parses back."""
    unicode = MailComposer(composer.templates, "noreply@example.com", 'Ünïcode "Svc"')
    mail = unicode.compose(MailKind.PASSWORD, "user@example.com", "cödé✓", NOW)
    assert mail.data.isascii()
    message = parse(mail.data)
    assert message["From"].addresses[0].display_name == 'Ünïcode "Svc"'
    assert str(message["Subject"]) == 'Your Ünïcode "Svc" password code'
    assert "\r\n    cödé✓\r\n" in message.get_content()


@pytest.mark.parametrize(
    ("to", "code", "message"),
    [
        ("a@b.com, c@d.com", "1", "to: expected one address, got a list of 2"),
        ("a@b.com", "1\r\nBcc: evil@x.com", "code: control character '\\r' is not allowed"),
        ("a@b.com", "=?utf-8?q?=0ABcc:_x@y.com?=", "code: '=?' (an RFC 2047"),
    ],
)
def test_invalid_requests_build_nothing(
    composer: MailComposer, to: str, code: str, message: str
) -> None:
    """Invalid fields raise InvalidRequest before any message is built."""
    with pytest.raises(InvalidRequest) as info:
        composer.compose(MailKind.PASSWORD, to, code, NOW)
    assert info.value.message.startswith(message)


def test_safety_check_catches_an_injected_header() -> None:
    """A serialized message with an extra header (e.g. Bcc) fails the check."""
    good = (
        b"From: a <a@example.com>\r\nTo: user@example.com\r\nSubject: s\r\n"
        b"Date: Fri, 27 Nov 2026 18:30:05 +0000\r\nMessage-ID: <1@example.com>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\nbody\r\n"
    )
    check_serialized(good, to="user@example.com", message_id="<1@example.com>")
    injected = good.replace(b"Subject: s\r\n", b"Subject: s\r\nBcc: evil@example.com\r\n")
    cases = [
        (injected, "user@example.com", "<1@example.com>", "serialized headers are"),
        (good, "other@example.com", "<1@example.com>", "serialized To does not hold exactly"),
        (good, "user@example.com", "<2@example.com>", "serialized Message-ID differs"),
    ]
    for data, to, message_id, detail in cases:
        with pytest.raises(MessageBuildError) as info:
            check_serialized(data, to=to, message_id=message_id)
        assert info.value.detail.startswith(detail)
        assert info.value.message == "internal error"  # what a client would see


@pytest.mark.parametrize(
    ("bug", "detail"),
    [
        (
            lambda data: data.replace(b"\r\nSubject:", b"\r\nBcc: evil@example.com\r\nSubject:"),
            "serialized headers are",
        ),
        (
            lambda data: data.replace(
                b"To: user@example.com", b"To: user@example.com, evil@example.com"
            ),
            "serialized To does not hold",
        ),
        (
            lambda data: data.replace(b"Message-ID: <", b"Message-ID: <x"),
            "serialized Message-ID differs",
        ),
    ],
    ids=["extra-header", "extra-recipient", "other-message-id"],
)
def test_compose_checks_what_the_serializer_wrote(
    composer: MailComposer, monkeypatch: pytest.MonkeyPatch, bug: object, detail: str
) -> None:
    """A serializer that refolds a header (CVE-2024-6923's shape) is caught inside compose."""
    real_as_bytes = email.message.EmailMessage.as_bytes

    def buggy_as_bytes(self: email.message.EmailMessage, *args: object, **kwargs: object) -> bytes:
        return bug(real_as_bytes(self, *args, **kwargs))  # type: ignore[operator,arg-type]

    monkeypatch.setattr(email.message.EmailMessage, "as_bytes", buggy_as_bytes)
    with pytest.raises(MessageBuildError) as info:
        composer.compose(MailKind.PASSWORD, "user@example.com", "123456", NOW)
    assert info.value.detail.startswith(detail)


def test_compose_builds_a_message_that_passes_its_own_check(composer: MailComposer) -> None:
    mail = composer.compose(MailKind.RETRIEVE, "user@example.com", "654321", NOW)
    check_serialized(mail.data, to="user@example.com", message_id=mail.message_id)
    assert mail.message_id.endswith("@example.com>")
    assert mail.message_id.startswith("<") and len(mail.message_id) == len("<@example.com>") + 32
    assert (mail.kind, mail.envelope_from, mail.envelope_to) == (
        MailKind.RETRIEVE,
        "noreply@example.com",
        "user@example.com",
    )
