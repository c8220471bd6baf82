"""Build the RFC 5322 message for one mail, and check what was built.

Pure. Theory of operation
-------------------------
A mail is serialized directly, from a handful of fixed shapes, not through
``email.message.EmailMessage`` (whose header registry, content manager, generator and
parse-back cost about 6 ms of CPU per mail, the largest single cost of the service):

- The sender's fields (From with its display name, Auto-Submitted, MIME-Version) are the same
  for every mail of a composer: the stdlib's policy encodes the From field once
  (``_sender_fields``, cached per sender), which is parsed back then and must show exactly that
  display name and address.
- Each part's body is encoded once, by the same rules as before: 7bit for ASCII whose lines
  all stay within 78 characters (RFC 5322 2.1.1) and that holds no NUL; quoted-printable for
  other ASCII (stays readable; RFC 2045 6.7 lines of at most 76); base64 for anything else
  (compact for Cyrillic, where quoted-printable would triple the size). Line ends become CRLF
  first, whatever the template used, as the email package did.
- A non-ASCII Subject is a run of RFC 2047 base64 encoded words of whole UTF-8 characters, one
  per folded line (every line within 76 characters, RFC 2047 2); a plain ASCII one is folded at
  its spaces, or encoded too when a word would not fit a 78-character line.
- A template with an html block makes a ``multipart/alternative`` mail, text part first
  (RFC 2046 5.1.4: the last part is the preferred one, and a reader without HTML shows the
  first), with a fresh random boundary that starts with ``=_``: that pair can occur neither in
  quoted-printable (``=`` is always followed by two hex digits or a line end) nor in base64,
  and a 7bit part is searched for it.

Because a bug here would be a header injection, every serialized message is checked by
``check_serialized`` before it leaves: a strict scan of the bytes that accepts only what the
email parser reads exactly one way (7-bit, CRLF line ends only, no NUL, lines within 998
octets, every header line a field or a continuation), and insists on exactly the expected
header names at the top and in each part, each once; one recipient, the same To; the given
Message-ID, Auto-Submitted and Content-Language; parts text/plain then text/html. It proves
what the parse-back used to (Python 3.11.7 can still be tricked into refolding a header into
two, CVE-2024-6923), at a few percent of its cost.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import functools
import re
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage

import attrs

from trio_mailer.core.errors import InvalidRequest, MessageBuildError
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderedMail, validate_locale
from trio_mailer.core.validation import reject_unsafe_header_text, validate_address, validate_code

# The top-level headers of a text/plain mail; a multipart/alternative one has no
# Content-Transfer-Encoding at the top (each part has its own).
EXPECTED_HEADERS = frozenset(
    {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "auto-submitted",
        "content-language",
    }
)
EXPECTED_MULTIPART_HEADERS = EXPECTED_HEADERS - {"content-transfer-encoding"}
EXPECTED_PART_HEADERS = frozenset({"content-type", "content-transfer-encoding"})
AUTO_SUBMITTED = "auto-generated"  # RFC 3834 section 5: autoresponders must not answer
TRANSFER_ENCODINGS = frozenset({"7bit", "quoted-printable", "base64"})
MAX_7BIT_LINE_CHARS = 78  # RFC 5322 2.1.1's recommended limit, for headers and 7bit bodies
MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1's hard limit, not counting the CRLF
# UTF-8 octets per encoded word: 39 make 52 base64 characters, so "Subject: =?utf-8?b?...?="
# is 73 characters and every line stays within RFC 2047's 76.
ENCODED_WORD_OCTETS = 39
BOUNDARY_TOKEN_BYTES = 16  # random bytes in a MIME boundary (32 hex digits after "=_")

_TEXT_TYPE = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: '
_HTML_TYPE = b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: '
# A field: its name is what the email parser accepts (printable ASCII but the colon; it allows
# an empty name, this does not), then its value, continued on each line that starts with a
# space or a tab. A header block is fields and nothing else, one after another.
_FIELD_PATTERN = r"([!-9;-~]+):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)"
_FIELD = re.compile(_FIELD_PATTERN)
_HEADER_BLOCK = re.compile(f"{_FIELD_PATTERN}(?:\r\n{_FIELD_PATTERN})*")
_TEXT_CONTENT_TYPE = re.compile(r'text/(?:plain|html)(?:;[ \t]*charset=(?:"utf-8"|utf-8))?', re.I)
# RFC 2046 5.1.1's boundary characters, quoted, without the space it allows inside and without
# "?": the email package decodes an RFC 2047 encoded word even inside a quoted string, so a
# boundary holding "=?...?=" would mean one thing to this scan and another to the parser.
_MULTIPART_CONTENT_TYPE = re.compile(
    r'multipart/alternative;[ \t]*boundary="([0-9A-Za-z\'()+_,./:=-]{1,70})"', re.I
)


def expected_headers(multipart: bool) -> frozenset[str]:
    """The header names a serialized mail must show exactly."""
    return EXPECTED_MULTIPART_HEADERS if multipart else EXPECTED_HEADERS


@attrs.frozen
class OutgoingMail:
    """One accepted mail, ready for the SMTP envelope; what the queue carries."""

    message_id: str  # with angle brackets, as in the Message-ID header
    kind: str  # the template's name ("password", "retrieve", ...); the outbox stores it
    envelope_from: str
    envelope_to: str
    data: bytes = attrs.field(repr=False)  # the serialized message, CRLF line ends


@attrs.frozen
class MailComposer:
    """Turns a validated request into an ``OutgoingMail``."""

    templates: MailTemplates
    from_address: str
    service_name: str

    def compose(
        self, kind: MailKind, to: str, code: str, now: datetime, *, locale: str = ""
    ) -> OutgoingMail:
        """The ``SendPass``/``SendRetrieve`` mail: template ``kind`` with ``{"code": code}``.

        Raises:
            InvalidRequest: a field is malformed (names the field: ``to``, ``code``, ``locale``).
            RenderError: the template failed for these values.
            MessageBuildError: the built message failed its safety check.
        """
        validate_address("to", to)
        validate_code("code", code)
        return self.compose_template(str(kind), to, {"code": code}, now, locale=locale)

    def compose_template(
        self,
        template: str,
        to: str,
        variables: Mapping[str, str],
        now: datetime,
        *,
        locale: str = "",
    ) -> OutgoingMail:
        """Validate the request, render ``template`` in ``locale`` and build the message.

        Args:
            variables: the caller's values; exactly the ones the template declares.
            locale: the requested locale ("" for the default); unknown ones fall back.
            now: the Date header's time (timezone-aware).

        Raises:
            InvalidRequest: a field is malformed (``to``, ``template``, ``vars.<name>``,
                ``locale``), naming the template where it matters.
            RenderError: the template failed for these values.
            MessageBuildError: the built message failed its safety check.
        """
        validate_address("to", to)
        validate_locale("locale", locale)
        self.templates.check_variables(template, variables)
        rendered = self.templates.render(
            template,
            variables,
            locale=locale,
            builtins={"to": to, "service_name": self.service_name},
        )
        reject_unsafe_header_text("subject", rendered.subject)
        domain = self.from_address.rpartition("@")[2]
        message_id = f"<{uuid.uuid4().hex}@{domain}>"
        data = build_message(
            rendered,
            from_address=self.from_address,
            service_name=self.service_name,
            to=to,
            message_id=message_id,
            now=now,
        )
        return OutgoingMail(
            message_id=message_id,
            kind=template,
            envelope_from=self.from_address,
            envelope_to=to,
            data=data,
        )


def build_message(
    rendered: RenderedMail,
    *,
    from_address: str,
    service_name: str,
    to: str,
    message_id: str,
    now: datetime,
) -> bytes:
    """Serialize ``rendered``: text/plain, or multipart/alternative (text first, then html).

    Raises:
        MessageBuildError: the result failed ``check_serialized``, or a part or the subject
            holds what UTF-8 cannot encode (a lone surrogate).
    """
    try:
        text_encoding, text = _encode_body(rendered.text)
        html_part = None if rendered.html is None else _encode_body(rendered.html)
        fields = (
            f"{_sender_fields(from_address, service_name)}To: {to}\r\n"
            f"{_subject_field(rendered.subject)}"
            f"Date: {email.utils.format_datetime(now)}\r\nMessage-ID: {message_id}\r\n"
            f"Content-Language: {rendered.locale}\r\n"
        ).encode()
    except UnicodeEncodeError as exc:
        raise MessageBuildError(f"not encodable as UTF-8: {exc.reason}") from None
    if html_part is None:
        data = b"".join((fields, _TEXT_TYPE, text_encoding, b"\r\n\r\n", text))
    else:
        html_encoding, html = html_part
        delimiter = b"--" + _boundary(text, html)
        data = b"".join(
            (
                fields,
                b'Content-Type: multipart/alternative;\r\n boundary="',
                delimiter[2:],
                b'"\r\n\r\n',
                delimiter,
                b"\r\n",
                _TEXT_TYPE,
                text_encoding,
                b"\r\n\r\n",
                text,
                b"\r\n",
                delimiter,
                b"\r\n",
                _HTML_TYPE,
                html_encoding,
                b"\r\n\r\n",
                html,
                b"\r\n",
                delimiter,
                b"--\r\n",
            )
        )
    check_serialized(
        data,
        to=to,
        message_id=message_id,
        locale=rendered.locale,
        multipart=html_part is not None,
    )
    return data


@functools.lru_cache(maxsize=16)
def _sender_fields(from_address: str, service_name: str) -> str:
    """From (display name and address), Auto-Submitted and MIME-Version, CRLF-terminated.

    The same for every mail of a sender, so the email package's policy encodes the display name
    (quoting, RFC 2047) once, and the result is parsed back here, once.

    Raises:
        MessageBuildError: the From field does not read back as exactly this display name and
            address, on one field.
    """
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = Address(display_name=service_name, addr_spec=from_address)
    header = message["From"]
    field = email.policy.SMTP.fold_binary(header.name, header)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(field)
    addresses: tuple[Address, ...] = getattr(parsed["From"], "addresses", ())
    if parsed.keys() != ["From"] or [(a.display_name, a.addr_spec) for a in addresses] != [
        (service_name, from_address)
    ]:
        raise MessageBuildError(f"the From field does not read back: {field!r}")
    return f"{field.decode()}Auto-Submitted: {AUTO_SUBMITTED}\r\nMIME-Version: 1.0\r\n"


def _encode_body(part: str) -> tuple[bytes, bytes]:
    """A part's Content-Transfer-Encoding and its body, encoded, CRLF line ends, ending in CRLF.

    Raises:
        UnicodeEncodeError: ``part`` holds a lone surrogate.
    """
    lines = part.encode().splitlines()  # CR, LF and CRLF, as the email package splits them
    body = b"\r\n".join(lines) + b"\r\n"
    if not body.isascii():
        return b"base64", base64.encodebytes(body).replace(b"\n", b"\r\n")
    if b"\x00" in body or max(map(len, body.split(b"\r\n"))) > MAX_7BIT_LINE_CHARS:
        return b"quoted-printable", binascii.b2a_qp(body, istext=True)
    return b"7bit", body


def _subject_field(subject: str) -> str:
    """The Subject field, folded, CRLF-terminated: plain ASCII when it is printable, free of
    ``=?`` and every line fits in 78 characters; else RFC 2047 encoded words.

    Raises:
        UnicodeEncodeError: ``subject`` holds a lone surrogate.
    """
    if subject.isascii() and subject.isprintable() and "=?" not in subject:
        lines = _fold(subject)
        if max(map(len, lines)) <= MAX_7BIT_LINE_CHARS:
            return "\r\n".join(lines) + "\r\n"
    raw = subject.encode()
    words = []
    start = 0
    while start < len(raw):
        end = start + ENCODED_WORD_OCTETS
        # Back off to the start of a character: an encoded word holds whole ones (RFC 2047 5).
        while end < len(raw) and raw[end] & 0xC0 == 0x80:
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(raw[start:end]).decode()}?=")
        start = end
    return "Subject: " + "\r\n ".join(words) + "\r\n"


def _fold(subject: str) -> list[str]:
    """The Subject field's lines when folded before a space of ``subject`` wherever the line
    would pass 78 characters (RFC 5322 2.2.3). A word too long for a line stays whole; the
    first word stays on the field's first line (a reader keeps the space that would follow a
    fold right after the colon); no line is only spaces."""
    words = subject.split(" ")
    lines = [f"Subject: {words[0]}"]
    for word in words[1:]:
        if word and len(lines[-1]) + 1 + len(word) > MAX_7BIT_LINE_CHARS:
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return lines


def _boundary(*parts: bytes) -> bytes:
    """A fresh random MIME boundary that occurs in none of ``parts``."""
    while True:
        boundary = f"=_{_boundary_token()}".encode()
        if not any(boundary in part for part in parts):
            return boundary


def _boundary_token() -> str:
    return secrets.token_hex(BOUNDARY_TOKEN_BYTES)


def check_serialized(
    data: bytes, *, to: str, message_id: str, locale: str | None = None, multipart: bool = False
) -> None:
    """Scan ``data`` and insist it has exactly the headers we set, in a shape that the email
    parser (and any reader) can take only one way.

    Raises:
        MessageBuildError: 8-bit data, a NUL, a bare CR or LF, a line over 998 octets, a line in
            a header block that is neither a field nor a continuation; an unexpected, missing or
            repeated header (at the top or in a part); a To other than the one plain address
            given, a Message-ID, Auto-Submitted or Content-Language other than the one given;
            a transfer encoding other than 7bit, quoted-printable or base64; a type other than
            text/plain, or multipart/alternative with exactly a text/plain then a text/html
            part, each in UTF-8.
    """
    if not data.isascii() or b"\x00" in data:
        raise MessageBuildError("serialized message is not 7-bit text without NUL")
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf or not data.endswith(b"\r\n"):
        raise MessageBuildError("serialized message has a bare CR or LF")
    if max(map(len, data.split(b"\r\n"))) > MAX_LINE_OCTETS:
        raise MessageBuildError(f"serialized message has a line over {MAX_LINE_OCTETS} octets")
    head, _, body = data.partition(b"\r\n\r\n")
    fields = _fields(head)
    names = [name for name, _ in fields]
    if sorted(names) != sorted(expected_headers(multipart)):
        raise MessageBuildError(f"serialized headers are {names}")
    values = dict(fields)
    if values["to"] != to or not _is_one_address(to):
        raise MessageBuildError("serialized To does not hold exactly the recipient")
    if values["message-id"] != message_id:
        raise MessageBuildError("serialized Message-ID differs")
    if values["auto-submitted"] != AUTO_SUBMITTED:
        raise MessageBuildError("serialized Auto-Submitted differs")
    if locale is not None and values["content-language"] != locale:
        raise MessageBuildError("serialized Content-Language differs")
    content_type = _main_type(values["content-type"])
    if not multipart:
        if content_type != "text/plain":
            raise MessageBuildError(f"serialized type is {content_type}")
        _check_part_fields(values)
        return
    if content_type != "multipart/alternative":
        raise MessageBuildError(f"serialized type is {content_type}")
    match = _MULTIPART_CONTENT_TYPE.fullmatch(values["content-type"])
    if match is None:
        raise MessageBuildError(f"serialized boundary is unusable: {values['content-type']!r}")
    delimiter = b"--" + match[1].encode()
    opening, closing = delimiter + b"\r\n", b"\r\n" + delimiter + b"--\r\n"
    if body.count(delimiter) != 3 or not body.startswith(opening) or not body.endswith(closing):
        raise MessageBuildError("serialized body is not two parts between three boundaries")
    parts = []
    for segment in body[len(opening) : -len(closing)].split(b"\r\n" + opening):
        part_head, separator, _ = segment.partition(b"\r\n\r\n")
        if not separator:
            raise MessageBuildError("serialized part has no blank line after its headers")
        parts.append(_fields(part_head))
    types = [_main_type(dict(part).get("content-type", "")) for part in parts]
    if types != ["text/plain", "text/html"]:
        raise MessageBuildError(f"serialized parts are {types}")
    for part in parts:
        part_names = [name for name, _ in part]
        if sorted(part_names) != sorted(EXPECTED_PART_HEADERS):
            raise MessageBuildError(f"serialized part headers are {part_names}")
        _check_part_fields(dict(part))


def _fields(head: bytes) -> list[tuple[str, str]]:
    """A header block's fields, in order: lower-cased names and unfolded values (RFC 5322
    2.2.3: a line that starts with a space or a tab continues the field before it).

    Raises:
        MessageBuildError: a line is neither a field nor a continuation of one.
    """
    text = head.decode()
    if _HEADER_BLOCK.fullmatch(text) is None:
        raise MessageBuildError(f"serialized header block has a line that is not a field: {text!r}")
    return [
        (name.lower(), value.replace("\r\n", "").strip(" \t"))
        for name, value in _FIELD.findall(text)
    ]


def _main_type(content_type: str) -> str:
    return content_type.partition(";")[0].lower()


def _check_part_fields(values: Mapping[str, str]) -> None:
    """A text part's Content-Type (no parameter but a UTF-8 charset) and transfer encoding."""
    if _TEXT_CONTENT_TYPE.fullmatch(values["content-type"]) is None:
        raise MessageBuildError(f"serialized Content-Type is {values['content-type']!r}")
    encoding = values["content-transfer-encoding"]
    if encoding.lower() not in TRANSFER_ENCODINGS:
        raise MessageBuildError(f"serialized Content-Transfer-Encoding is {encoding!r}")


def _is_one_address(to: str) -> bool:
    try:
        validate_address("to", to)
    except InvalidRequest:
        return False
    return True
