"""Property tests: whatever a caller sends, the service refuses it or builds a safe message.

For any ``to`` and ``code``: either ``InvalidRequest`` (INVALID_ARGUMENT), or the serialized
message has exactly the expected header names, one recipient, and parses back to the same To
and body. Includes the CVE-2024-6923 shape (an encoded word that refolds into a new header line)
and the CVE-2023-27043 shapes (quoted local parts, lists).
"""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.message import (
    EXPECTED_MULTIPART_HEADERS,
    EXPECTED_PART_HEADERS,
    build_message,
)
from trio_mailer.core.rendering import MailKind, RenderedMail

from .helpers import COMPOSER, NOW, TEMPLATES
from .strategies import ADDRESS, ATOM, CODE, PLAIN_ADDRESS


@settings(max_examples=400, deadline=None)
@given(to=ADDRESS, code=CODE, kind=st.sampled_from(MailKind))
@example(
    to="user@example.com", code="=?utf-8?q?x?=\r\nBcc: evil@example.com", kind=MailKind.PASSWORD
)  # CVE-2024-6923
@example(
    to="user@example.com",
    code="=?utf-8?b?" + "QQ==" * 30 + "?= \n Bcc: evil@example.com",
    kind=MailKind.PASSWORD,
)
@example(to='"a@b.c"@evil.com', code="1", kind=MailKind.PASSWORD)  # CVE-2023-27043
@example(to="a@b.c, c@d.e", code="1", kind=MailKind.PASSWORD)
@example(to="alice@example.com\r\nBcc: eve@example.com", code="1", kind=MailKind.PASSWORD)
@example(to="user@example.com", code="ok-" + "é" * 60, kind=MailKind.PASSWORD)
@example(to="a" * 64 + "@" + "b" * 63 + ".example.com", code="1", kind=MailKind.PASSWORD)
def test_refused_or_exactly_one_safe_message(to: str, code: str, kind: MailKind) -> None:
    """INVALID_ARGUMENT, or the expected headers, one recipient, same To and body."""
    try:
        mail = COMPOSER.compose(kind, to, code, NOW)
    except InvalidRequest as exc:
        assert exc.field in ("to", "code")
        assert exc.message.startswith(f"{exc.field}: ")
        return
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert sorted(name.lower() for name in parsed.keys()) == sorted(EXPECTED_MULTIPART_HEADERS)
    for part in parsed.iter_parts():
        assert sorted(name.lower() for name in part.keys()) == sorted(EXPECTED_PART_HEADERS)
    assert [a.addr_spec for a in parsed["To"].addresses] == [to]
    assert mail.envelope_to == to
    # Unfolded (a long address may be folded onto a continuation line), To is the address.
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n")
    assert f"To: {to}".encode() in unfolded
    rendered = TEMPLATES.render(kind, {"code": code}, builtins={"to": to, "service_name": "Acme"})
    text, html = (part.get_content().replace("\r\n", "\n") for part in parsed.iter_parts())
    assert text == rendered.text
    assert html == rendered.html
    # No bare CR or LF anywhere: every line ends in CRLF.
    assert mail.data.replace(b"\r\n", b"").count(b"\n") == 0
    assert mail.data.replace(b"\r\n", b"").count(b"\r") == 0


@pytest.mark.parametrize(
    "code", ["=?utf-8?q?x?=\r\nBcc: evil@example.com", "\r\nBcc: evil@example.com", "a\nb"]
)
def test_refolding_and_injection_shapes_are_refused(code: str) -> None:
    """The CVE-2024-6923 and plain injection shapes never get as far as a message."""
    with pytest.raises(InvalidRequest) as info:
        COMPOSER.compose(MailKind.PASSWORD, "user@example.com", code, NOW)
    assert info.value.field == "code"


# --- Issue 16: the message is serialized directly; whatever goes in, the email parser reads
# back exactly that (subject, recipient, locale, both parts), and every line keeps its limits.

# Subjects as rendering leaves them: one line, stripped, no control characters or "=?" (the
# composer refuses those), but any other text at all: unicode, long words, many spaces.
SUBJECT_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=200
)
SUBJECT = (
    st.one_of(
        SUBJECT_TEXT,
        st.lists(st.one_of(ATOM, st.just(""), st.text(max_size=90)), min_size=1, max_size=30).map(
            " ".join
        ),
    )
    .map(lambda s: s.strip())
    .filter(lambda s: bool(s) and "=?" not in s and all(c.isprintable() or c == " " for c in s))
)
# Part bodies as templates render them: anything but lone surrogates, with the shapes that
# matter to encodings: long lines, dots and "From " at line starts, every kind of line end.
BODY_PIECE = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(["\r\n", "\n", "\r", "\r\r\n", ".", "\n.\n", "From ", " \n", "\t\n", "="]),
    st.sampled_from(["--=_", "=?utf-8?q?x?=", "\x00", "é", "ж", "😀", "\u2028", "\x0b"]),
    st.sampled_from([77, 78, 79, 80, 200, 1100]).map(lambda n: "x" * n),
)
BODY = st.lists(BODY_PIECE, max_size=12).map("".join)
LOCALE = st.from_regex(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,2}", fullmatch=True)


def _as_read(part: str) -> str:
    """A part as a reader gets it back: CR, LF and CRLF all one line end, a final one added."""
    lines = part.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return "".join(f"{line}\n" for line in lines)


@settings(max_examples=200, deadline=None)
@given(
    subject=SUBJECT,
    to=PLAIN_ADDRESS,
    text=BODY,
    html=st.one_of(st.none(), BODY),
    locale=LOCALE,
)
@example(subject="é" * 200, to="user@example.com", text="." * 5000, html="\r" * 9, locale="ru")
@example(
    subject="a" * 77 + " " + "b" * 78, to="a@b.cd", text="x\r\n" * 3, html=None, locale="pt-BR"
)
def test_a_built_message_reads_back_as_its_inputs(
    subject: str, to: str, text: str, html: str | None, locale: str
) -> None:
    """email.parser (policy default) reads back the same subject, To, Content-Language, parts
    and bodies; CRLF only, 7-bit, every line within 78 but for the To (a long address)."""
    mail = RenderedMail(subject=subject, text=text, html=html, locale=locale)
    data = build_message(
        mail,
        from_address="noreply@example.com",
        service_name="Acme",
        to=to,
        message_id="<1@example.com>",
        now=NOW,
    )
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert not parsed.defects
    assert str(parsed["Subject"]) == subject
    assert [a.addr_spec for a in parsed["To"].addresses] == [to]
    assert str(parsed["Content-Language"]) == locale
    assert str(parsed["Message-ID"]) == "<1@example.com>"
    assert str(parsed["Auto-Submitted"]) == "auto-generated"
    parts = list(parsed.iter_parts()) if html is not None else [parsed]
    assert [p.get_content_type() for p in parts] == (
        ["text/plain", "text/html"] if html is not None else ["text/plain"]
    )
    assert all(not p.defects for p in parts)
    contents = [p.get_content().replace("\r\n", "\n") for p in parts]
    assert contents == [_as_read(text)] + ([] if html is None else [_as_read(html)])
    assert data.isascii()
    assert data.replace(b"\r\n", b"").count(b"\n") == data.replace(b"\r\n", b"").count(b"\r") == 0
    assert all(len(line) <= 78 for line in data.split(b"\r\n") if not line.startswith(b"To: "))
