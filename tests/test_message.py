"""Building the RFC 5322 message, and its own safety check."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trio_mailer.core import message as message_module
from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import InvalidRequest, MessageBuildError
from trio_mailer.core.message import (
    EXPECTED_HEADERS,
    EXPECTED_MULTIPART_HEADERS,
    MailComposer,
    build_message,
    check_serialized,
)
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderedMail

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
    with pytest.raises(InvalidRequest) as info:
        composer.compose_template("password", "a@b.com, c@d.com", {"code": "1"}, NOW)
    assert info.value.field == "to"


def test_envelope_and_message_id(composer: MailComposer) -> None:
    """The envelope uses the configured From and the validated To; ids are unique."""
    first = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    second = composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    assert (first.envelope_from, first.envelope_to) == ("noreply@example.com", "user@example.com")
    assert first.kind == "retrieve"
    assert first.message_id.startswith("<") and first.message_id.endswith("@example.com>")
    assert first.message_id != second.message_id


def test_the_body_names_the_real_recipient_not_the_sample(composer: MailComposer) -> None:
    """``{{ to }}`` in a template is the recipient (the start-up check uses a sample one)."""
    mail = composer.compose(MailKind.PASSWORD, "zed@example.org", "739201", NOW)
    text = text_part(parse(mail.data))
    assert "zed@example.org" in text and "user@example.com" not in text


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


# --- Serializing directly (issue 16): the shapes, the encodings, and the scan that checks them.

GOOD_HEAD = (
    b"From: a <a@example.com>\r\nTo: user@example.com\r\nSubject: s\r\n"
    b"Date: Fri, 27 Nov 2026 18:30:05 +0000\r\nMessage-ID: <1@example.com>\r\n"
    b"Auto-Submitted: auto-generated\r\nContent-Language: en\r\nMIME-Version: 1.0\r\n"
)
GOOD_TEXT = GOOD_HEAD + (
    b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n\r\nbody\r\n'
)
MULTI_HEAD = GOOD_HEAD + b'Content-Type: multipart/alternative;\r\n boundary="b"\r\n\r\n'
TEXT_PART = b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n\r\nt\r\n"
HTML_PART = b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: 7bit\r\n\r\nh\r\n"
END = b"--b--\r\n"
GOOD_MULTI = MULTI_HEAD + TEXT_PART + HTML_PART + END
IDS = {"to": "user@example.com", "message_id": "<1@example.com>"}


def check(data: bytes, *, multipart: bool = False, locale: str | None = "en") -> None:
    check_serialized(data, locale=locale, multipart=multipart, **IDS)


def refusal(data: bytes, *, multipart: bool = False, locale: str | None = "en") -> str:
    with pytest.raises(MessageBuildError) as info:
        check(data, multipart=multipart, locale=locale)
    assert info.value.message == "internal error"
    return info.value.detail


def test_the_scan_accepts_well_formed_mails_of_both_shapes() -> None:
    """The shapes the scan takes: folded fields, either quoting of the charset, any case of
    the transfer encoding, a 998-octet line, no locale to compare."""
    check(GOOD_TEXT)
    check(GOOD_MULTI, multipart=True)
    check(GOOD_TEXT, locale=None)
    check(GOOD_TEXT.replace(b"Content-Language: en", b"Content-Language: xx"), locale=None)
    folded = GOOD_TEXT.replace(b"To: user", b"To:\r\n user").replace(b"ID: <1", b"ID:\r\n\t<1")
    check(folded)
    check(GOOD_TEXT.replace(b'charset="utf-8"', b"charset=utf-8"))
    check(GOOD_TEXT.replace(b"7bit", b"BASE64"))
    check(GOOD_TEXT.replace(b"\r\nbody\r\n", b"\r\n" + b"x" * 998 + b"\r\n"))
    check(
        GOOD_MULTI.replace(b'"b"', b'"' + b"b" * 70 + b'"').replace(b"--b", b"--" + b"b" * 70),
        multipart=True,
    )


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (GOOD_TEXT.replace(b"body", "bödy".encode()), "serialized message is not 7-bit text"),
        (GOOD_TEXT.replace(b"body", b"bo\x00dy"), "serialized message is not 7-bit text"),
        (GOOD_TEXT.replace(b"body", b"bo\rdy"), "serialized message has a bare CR or LF"),
        (GOOD_TEXT.replace(b"body", b"bo\ndy"), "serialized message has a bare CR or LF"),
        (GOOD_TEXT.removesuffix(b"\r\n"), "serialized message has a bare CR or LF"),
        (
            GOOD_TEXT.replace(b"\r\nbody\r\n", b"\r\n" + b"x" * 999 + b"\r\n"),
            "serialized message has a line over 998 octets",
        ),
        (GOOD_TEXT.replace(b"Subject: s", b"Subject s"), "serialized header block has a line"),
        (GOOD_TEXT.replace(b"Subject: s", b"Sub ject: s"), "serialized header block has a line"),
        (GOOD_TEXT.replace(b"Subject: s", b": s"), "serialized header block has a line"),
        (b" x\r\n" + GOOD_TEXT, "serialized header block has a line"),
        (b"\r\n" + GOOD_TEXT, "serialized header block has a line"),
        (
            GOOD_TEXT.replace(b"Subject: s\r\n", b"Subject: s\r\nsubject: t\r\n"),
            "serialized headers are ['from', 'to', 'subject', 'subject', 'date',",
        ),
        (
            GOOD_TEXT.replace(b"Subject: s\r\n", b""),
            "serialized headers are ['from', 'to', 'date',",
        ),
        (GOOD_TEXT.replace(b"To: user@example.com", b"To: user@example.com,"), "serialized To"),
        (
            GOOD_TEXT.replace(b"Content-Language: en", b"Content-Language: ru"),
            "serialized Content-L",
        ),
        (GOOD_TEXT.replace(b"text/plain", b"text/html"), "serialized type is text/html"),
        (GOOD_TEXT.replace(b"text/plain", b"Text/Plain;x=y"), "serialized Content-Type is 'Text/"),
        (GOOD_TEXT.replace(b'"utf-8"', b'"koi8-r"'), "serialized Content-Type is"),
        (GOOD_TEXT.replace(b"7bit", b"8bit"), "serialized Content-Transfer-Encoding is '8bit'"),
    ],
)
def test_the_scan_refuses_a_crafted_text_mail(data: bytes, detail: str) -> None:
    """Every property the scan proves, broken one at a time in a text/plain mail."""
    assert refusal(data).startswith(detail)


def test_the_scan_wants_one_plain_address_in_to() -> None:
    """A To that equals the recipient given is not enough: it must be one plain address."""
    listed = GOOD_TEXT.replace(b"To: user@example.com", b"To: a@b.com, c@d.com")
    with pytest.raises(MessageBuildError) as info:
        check_serialized(listed, to="a@b.com, c@d.com", message_id="<1@example.com>")
    assert info.value.detail == "serialized To does not hold exactly the recipient"


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (
            GOOD_MULTI.replace(b"multipart/alternative", b"multipart/mixed"),
            "serialized type is multipart/mixed",
        ),
        (GOOD_MULTI.replace(b'"b"', b"b"), "serialized boundary is unusable"),
        (GOOD_MULTI.replace(b'"b"', b'""'), "serialized boundary is unusable"),
        (
            GOOD_MULTI.replace(b'"b"', b'"=?us-ascii?q?b?="'),  # the parser would read "b"
            "serialized boundary is unusable",
        ),
        (
            GOOD_MULTI.replace(b'"b"', b'"' + b"b" * 71 + b'"').replace(b"--b", b"--" + b"b" * 71),
            "serialized boundary is unusable",
        ),
        (MULTI_HEAD + TEXT_PART + END, "serialized body is not two parts"),
        (MULTI_HEAD + TEXT_PART + HTML_PART + HTML_PART + END, "serialized body is not two parts"),
        (
            MULTI_HEAD + TEXT_PART + HTML_PART.replace(b"h\r\n", b"x--b\r\n") + END,
            "serialized body",
        ),
        (MULTI_HEAD + b"preamble\r\n" + TEXT_PART + HTML_PART + END, "serialized body"),
        (MULTI_HEAD + TEXT_PART + HTML_PART + END + b"epilogue\r\n", "serialized body"),
        (MULTI_HEAD + TEXT_PART + b"x" + HTML_PART + END, "serialized parts are ['text/plain']"),
        (
            MULTI_HEAD + TEXT_PART.replace(b"\r\n\r\nt", b"\r\nt") + HTML_PART + END,
            "serialized part has no blank line after its headers",
        ),
        (
            MULTI_HEAD + TEXT_PART.replace(b"Content-Type: text/plain\r\n", b"") + HTML_PART + END,
            "serialized parts are ['', 'text/html']",
        ),
        (
            MULTI_HEAD + TEXT_PART.replace(b"plain", b"plain; format=flowed") + HTML_PART + END,
            "serialized Content-Type is 'text/plain; format=flowed'",
        ),
        (
            MULTI_HEAD + TEXT_PART + HTML_PART.replace(b"7bit", b"binary") + END,
            "serialized Content-Transfer-Encoding is 'binary'",
        ),
        (
            MULTI_HEAD + TEXT_PART + HTML_PART.replace(b"html\r\n", b"html\r\nX: 1\r\n") + END,
            "serialized part headers are ['content-type', 'x', 'content-transfer-encoding']",
        ),
        (
            MULTI_HEAD + TEXT_PART + HTML_PART.replace(b"html\r\n", b"html\r\nbad\r\n") + END,
            "serialized header block has a line that is not a field",
        ),
    ],
)
def test_the_scan_refuses_a_crafted_multipart_mail(data: bytes, detail: str) -> None:
    """The MIME structure: two parts between exactly three boundary lines, each part with its
    two headers, text/plain then text/html, nothing before or after."""
    assert refusal(data, multipart=True).startswith(detail)


def test_compose_hands_every_message_to_the_scan(
    composer: MailComposer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compose checks what it built (the very bytes it returns), and a refusal stops it."""
    seen: list[tuple[bytes, dict[str, object]]] = []

    def spy(data: bytes, **kwargs: object) -> None:
        seen.append((data, kwargs))

    monkeypatch.setattr(message_module, "check_serialized", spy)
    mail = composer.compose(MailKind.PASSWORD, "user@example.com", "1", NOW, locale="ru")
    expected = {"to": "user@example.com", "message_id": mail.message_id, "locale": "ru"}
    assert seen == [(mail.data, {**expected, "multipart": True})]

    def refuse(data: bytes, **kwargs: object) -> None:
        raise MessageBuildError("refused")

    monkeypatch.setattr(message_module, "check_serialized", refuse)
    with pytest.raises(MessageBuildError):
        composer.compose(MailKind.PASSWORD, "user@example.com", "1", NOW)


def rendered(
    text: str = "t\n", html: str | None = None, subject: str = "s", locale: str = "en"
) -> RenderedMail:
    return RenderedMail(subject=subject, text=text, html=html, locale=locale)


def build(mail: RenderedMail, service_name: str = "Acme") -> bytes:
    return build_message(
        mail,
        from_address="noreply@example.com",
        service_name=service_name,
        to="user@example.com",
        message_id="<1@example.com>",
        now=NOW,
    )


@pytest.mark.parametrize(
    ("text", "encoding", "encoded"),
    [
        ("a\nb", "7bit", b"\r\n\r\na\r\nb\r\n"),
        ("a\r\nb\rc\n", "7bit", b"\r\n\r\na\r\nb\r\nc\r\n"),
        ("", "7bit", b"\r\n\r\n\r\n"),
        ("x" * 78 + "\n.dot\n", "7bit", b"\r\n\r\n" + b"x" * 78 + b"\r\n.dot\r\n"),
        ("x" * 79 + "\nshort\n", "quoted-printable", b"=\r\nxxxx\r\nshort\r\n"),
        ("a\x00b\n", "quoted-printable", b"\r\n\r\na=00b\r\n"),
        ("trailing \nline\n", "7bit", b"\r\n\r\ntrailing \r\nline\r\n"),
        ("é\n", "base64", b"\r\n\r\nw6kNCg==\r\n"),
    ],
)
def test_each_part_is_encoded_by_the_rules(text: str, encoding: str, encoded: bytes) -> None:
    """7bit: ASCII, no NUL, lines within 78; quoted-printable: other ASCII, line structure kept;
    base64: the rest; CR, LF and CRLF all become CRLF first."""
    data = build(rendered(text=text))
    assert f"Content-Transfer-Encoding: {encoding}\r\n".encode() in data
    assert data.endswith(encoded)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n").split("\n")
    assert parse(data).get_content() == "\r\n".join(lines) + "\r\n"


def test_quoted_printable_and_base64_lines_stay_within_76() -> None:
    """RFC 2045 6.7 and 6.8: encoded lines of at most 76 characters."""
    for text in ("y" * 500 + "\n", "ж" * 500 + "\n"):
        data = build(rendered(text=text))
        body = data.partition(b"\r\n\r\n")[2]
        assert max(map(len, body.split(b"\r\n"))) == 76
        assert parse(data).get_content() == text.replace("\n", "\r\n")


def test_the_boundary_is_fresh_random_and_never_in_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """=_ and 32 hex digits, new for every mail; one that a 7bit part holds is drawn again."""
    first, second = build(rendered(html="<p>h</p>\n")), build(rendered(html="<p>h</p>\n"))
    boundaries = [re.search(rb'boundary="(=_[0-9a-f]{32})"', data) for data in (first, second)]
    assert boundaries[0] is not None and boundaries[1] is not None
    assert boundaries[0][1] != boundaries[1][1]
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(message_module, "_boundary_token", lambda: next(tokens))
    data = build(rendered(text="--=_" + "a" * 32 + "\n", html="<p>h</p>\n"))
    assert b'boundary="=_' + b"b" * 32 + b'"' in data
    assert [part.get_content_type() for part in parse(data).iter_parts()] == [
        "text/plain",
        "text/html",
    ]


def subject_lines(data: bytes) -> list[bytes]:
    head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.startswith(b"Subject:"))
    end = next(i for i in range(start + 1, len(head)) if not head[i].startswith(b" "))
    return head[start:end]


@pytest.mark.parametrize(
    ("subject", "lines"),
    [
        ("x" * 69, [b"Subject: " + b"x" * 69]),
        ("a " + "x" * 65 + " b", [b"Subject: a " + b"x" * 65 + b" b"]),
        ("a " + "x" * 66 + " b", [b"Subject: a " + b"x" * 66, b" b"]),
        ("a " + "x" * 77, [b"Subject: a", b" " + b"x" * 77]),
        (
            "a " + "y" * 70 + "  b" + " c" * 40,
            [b"Subject: a", b" " + b"y" * 70 + b"  b c c", b" c" * 38],
        ),
    ],
)
def test_an_ascii_subject_is_folded_at_spaces(subject: str, lines: list[bytes]) -> None:
    """Folded before a space when the line would pass 78; never a line of spaces only."""
    data = build(rendered(subject=subject))
    assert subject_lines(data) == lines
    assert str(parse(data)["Subject"]) == subject


def encoded_words(data: bytes) -> list[bytes]:
    """The octets each encoded word of the Subject carries, each decoded on its own."""
    words = []
    for line in subject_lines(data):
        assert len(line) <= 76  # RFC 2047 2
        match = re.fullmatch(rb"(?:Subject:)? =\?utf-8\?b\?([A-Za-z0-9+/=]+)\?=", line)
        assert match is not None, line
        words.append(base64.b64decode(match[1]))
    return words


@pytest.mark.parametrize(
    ("subject", "sizes"),
    [
        ("x" * 70, [39, 31]),  # ASCII, but the first word too long for the first line
        ("x" * 78, [39, 39]),
        ("a " + "x" * 78, [39, 39, 2]),  # a later word too long for a line of its own
        ("tab\there", [8]),  # not printable
        ("a =? b", [6]),  # would read as an encoded word
        ("é" * 30, [38, 22]),
        ("a" + "é" * 30, [39, 22]),
        ("✓" * 20, [39, 21]),
        ("a" + "✓" * 20, [37, 24]),
        ("ab" + "✓" * 20, [38, 24]),
        ("😀" * 12, [36, 12]),
        ("abc" + "😀" * 12, [39, 12]),
    ],
)
def test_a_subject_that_cannot_be_plain_is_encoded_words_of_whole_characters(
    subject: str, sizes: list[int]
) -> None:
    """RFC 2047 base64 words of at most 39 octets, never splitting a UTF-8 character, one per
    line; the parser joins them back into the subject."""
    data = build(rendered(subject=subject))
    words = encoded_words(data)
    assert [len(word) for word in words] == sizes
    assert "".join(word.decode() for word in words) == subject  # each decodes on its own
    assert str(parse(data)["Subject"]) == subject


def test_a_lone_surrogate_is_a_build_error_not_a_crash() -> None:
    """What UTF-8 cannot encode (only reachable from Python, not over gRPC) is refused."""
    for mail in (rendered(text="\ud800"), rendered(html="\udfff"), rendered(subject="s\ud800")):
        with pytest.raises(MessageBuildError) as info:
            build(mail)
        assert info.value.detail.startswith("not encodable as UTF-8")


def test_the_from_field_is_encoded_once_and_must_read_back() -> None:
    """A display name the email package would write so that it reads back otherwise is refused
    (the configuration refuses it too); a good one reads back exactly."""
    with pytest.raises(MessageBuildError) as info:
        build(rendered(), service_name="=?utf-8?q?x?=")
    assert info.value.detail.startswith("the From field does not read back")
    message = parse(build(rendered(), service_name='Ünïcode, "Svc" (x)'))
    assert message["From"].addresses[0].display_name == 'Ünïcode, "Svc" (x)'
    assert message["From"].addresses[0].addr_spec == "noreply@example.com"


def test_every_header_line_of_a_built_mail_stays_within_78(composer: MailComposer) -> None:
    """RFC 5322 2.1.1's recommended limit, for both locales, with the shipped templates."""
    for locale in ("en", "ru"):
        mail = composer.compose(MailKind.PASSWORD, "user@example.com", "739201", NOW, locale=locale)
        head = mail.data.partition(b"\r\n\r\n")[0]
        assert max(map(len, head.split(b"\r\n"))) <= 78
        assert max(map(len, mail.data.split(b"\r\n"))) <= 78


def test_a_template_subject_unsafe_for_a_header_is_refused(tmp_path: Path) -> None:
    """Even a template's own text may not put '=?' (or a control character) in the Subject."""
    (tmp_path / "mail").mkdir()
    for name in ("password", "retrieve"):
        (tmp_path / "mail" / f"{name}.msg").write_text(
            "{# requires: code #}{% block subject %}S =?utf-8?q?x?= {% endblock %}"
            "{% block text %}code {{ code }}{% endblock %}"
        )
    composer = MailComposer(MailTemplates.load(tmp_path), "noreply@example.com", "Acme")
    with pytest.raises(InvalidRequest) as info:
        composer.compose(MailKind.RETRIEVE, "user@example.com", "1", NOW)
    assert info.value.field == "subject"


def test_the_recipient_is_checked_before_the_code(composer: MailComposer) -> None:
    """Both wrong: the error names the first field, to."""
    with pytest.raises(InvalidRequest) as info:
        composer.compose(MailKind.PASSWORD, "a@b.com, c@d.com", "1\r\n", NOW)
    assert info.value.field == "to"
