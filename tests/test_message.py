"""Building the RFC 5322 message, and its own safety check."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import InvalidRequest, MessageBuildError
from trio_mailer.core.message import (
    EXPECTED_HEADERS,
    EXPECTED_MULTIPART_HEADERS,
    MailComposer,
    check_serialized,
)
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


def text_part(message: email.message.EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


def test_message_has_exactly_the_expected_headers(composer: MailComposer) -> None:
    """From with display name, To, Subject, Date, Message-ID, Auto-Submitted, Content-Language,
    and multipart/alternative: a UTF-8 text part first, then the html part."""
    mail = composer.compose(MailKind.PASSWORD, "user@example.com", "739201", NOW)
    message = parse(mail.data)
    assert sorted(name.lower() for name in message.keys()) == sorted(EXPECTED_MULTIPART_HEADERS)
    assert str(message["From"]) == "Acme Accounts <noreply@example.com>"
    assert str(message["To"]) == "user@example.com"
    assert str(message["Subject"]) == "Your Acme Accounts password code"
    assert str(message["Date"]) == "Fri, 27 Nov 2026 18:30:05 +0000"
    assert str(message["Message-ID"]) == mail.message_id
    assert str(message["Auto-Submitted"]) == "auto-generated"
    assert str(message["Content-Language"]) == "en"
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "utf-8"
    assert html.get_content_type() == "text/html"
    assert html.get_content_charset() == "utf-8"
    assert "\r\n    739201\r\n" in text_part(message)
    assert mail.data.count(b"\r\n") == mail.data.count(b"\n")  # CRLF line ends only
    assert mail.data.isascii()  # no 8BITMIME needed


def test_russian_mail_is_encoded_for_seven_bit(composer: MailComposer) -> None:
    """A ru mail: Content-Language ru, each part UTF-8 in base64 or quoted-printable."""
    mail = composer.compose(MailKind.PASSWORD, "user@example.com", "739201", NOW, locale="ru")
    assert mail.data.isascii()
    message = parse(mail.data)
    assert str(message["Content-Language"]) == "ru"
    for part in message.iter_parts():
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] in ("base64", "quoted-printable")
    assert "Ваш код для входа в Acme Accounts" in text_part(message)


def test_a_text_only_template_makes_a_text_plain_mail(tmp_path: Path) -> None:
    """No html block: a single text/plain part with its own Content-Transfer-Encoding."""
    (tmp_path / "mail").mkdir()
    for name in ("password", "retrieve"):
        (tmp_path / "mail" / f"{name}.msg").write_text(
            "{# requires: code #}{% block subject %}S{% endblock %}"
            "{% block text %}code {{ code }}{% endblock %}"
        )
    composer = MailComposer(MailTemplates.load(tmp_path), "noreply@example.com", "Acme")
    message = parse(composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW).data)
    assert sorted(name.lower() for name in message.keys()) == sorted(EXPECTED_HEADERS)
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "code 1\r\n"


def test_compose_template_checks_the_variables(composer: MailComposer) -> None:
    """The generic path names the template and the variable."""
    with pytest.raises(InvalidRequest) as info:
        composer.compose_template("password", "user@example.com", {"cod": "1"}, NOW)
    assert info.value.field == "vars.cod"
    with pytest.raises(InvalidRequest) as info:
        composer.compose_template("password", "user@example.com", {"code": "1"}, NOW, locale="r\nu")
    assert info.value.field == "locale"


def test_envelope_and_message_id(composer: MailComposer) -> None:
    """The envelope uses the configured From and the validated To; ids are unique."""
    first = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    second = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    assert (first.envelope_from, first.envelope_to) == ("noreply@example.com", "user@example.com")
    assert first.kind == "retrieve"
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
    assert "\r\n    cödé✓\r\n" in text_part(message)


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
        b"Auto-Submitted: auto-generated\r\nContent-Language: en\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\nbody\r\n"
    )
    check_serialized(good, to="user@example.com", message_id="<1@example.com>")
    injected = good.replace(b"Subject: s\r\n", b"Subject: s\r\nBcc: evil@example.com\r\n")
    cases = [
        (injected, "user@example.com", "<1@example.com>", "serialized headers are"),
        (good, "other@example.com", "<1@example.com>", "serialized To does not hold exactly"),
        (good, "user@example.com", "<2@example.com>", "serialized Message-ID differs"),
        (
            good.replace(b"auto-generated", b"no"),
            "user@example.com",
            "<1@example.com>",
            "serialized Auto-Submitted differs",
        ),
    ]
    for data, to, message_id, detail in cases:
        with pytest.raises(MessageBuildError) as info:
            check_serialized(data, to=to, message_id=message_id)
        assert info.value.detail.startswith(detail)
        assert info.value.message == "internal error"  # what a client would see


def test_safety_check_of_a_multipart_mail() -> None:
    """In a multipart mail the parts must be text then html, each with only its two headers."""
    head = (
        b"From: a <a@example.com>\r\nTo: user@example.com\r\nSubject: s\r\n"
        b"Date: Fri, 27 Nov 2026 18:30:05 +0000\r\nMessage-ID: <1@example.com>\r\n"
        b"Auto-Submitted: auto-generated\r\nContent-Language: ru\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    )
    text = b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n\r\nt\r\n"
    html = b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: 7bit\r\n\r\nh\r\n"
    end = b"--b--\r\n"
    kwargs = {"to": "user@example.com", "message_id": "<1@example.com>", "multipart": True}
    check_serialized(head + text + html + end, locale="ru", **kwargs)  # type: ignore[arg-type]
    cases = [
        (head + html + text + end, "ru", "serialized parts are ['text/html', 'text/plain']"),
        (
            head + text + html.replace(b"\r\n\r\nh", b"\r\nBcc: x@y.z\r\n\r\nh") + end,
            "ru",
            "serialized part headers are",
        ),
        (head + text + html + end, "en", "serialized Content-Language differs"),
    ]
    for data, locale, detail in cases:
        with pytest.raises(MessageBuildError) as info:
            check_serialized(data, locale=locale, **kwargs)  # type: ignore[arg-type]
        assert info.value.detail.startswith(detail)
