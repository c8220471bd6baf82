"""Build the RFC 5322 message for one mail, and check what was built.

Pure. Headers are set through ``email.message.EmailMessage`` with the SMTP policy (CRLF line
ends, RFC 2047 for non-ASCII subjects), never by pasting strings. A template with an html block
makes a ``multipart/alternative`` mail, text part first (RFC 2046 5.1.4: the last part is the
preferred one, and a reader without HTML shows the first). Because Python 3.11.7 can still
be tricked into refolding a header into two (CVE-2024-6923), every serialized message is parsed
back and must show exactly the expected header names, one recipient, and the same To.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import email.utils
import uuid
from collections.abc import Mapping
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage

import attrs

from trio_mailer.core.errors import MessageBuildError
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
# Parts are encoded for a 7-bit path, so no relay needs 8BITMIME and every line stays under the
# RFC 5322 limit (see _transfer_encoding).
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
MAX_7BIT_LINE_CHARS = 78  # RFC 5322 2.1.1's recommended limit, which the policy folds at


def _transfer_encoding(part: str) -> str:
    """7bit for short-lined ASCII; quoted-printable for ASCII with long lines (it stays
    readable); base64 for anything else (compact for Cyrillic, where quoted-printable would
    triple the size). Chosen here: the email package would otherwise encode a part both ways
    to pick the shorter, which doubled the cost of building a mail."""
    if part.isascii():
        if max(map(len, part.splitlines()), default=0) <= MAX_7BIT_LINE_CHARS:
            return "7bit"
        return "quoted-printable"
    return "base64"


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
        MessageBuildError: the result failed ``check_serialized``.
    """
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address(display_name=service_name, addr_spec=from_address)
    msg["To"] = Address(addr_spec=to)
    msg["Subject"] = rendered.subject
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = AUTO_SUBMITTED
    if rendered.html is None:
        msg.set_content(rendered.text, charset="utf-8", cte=_transfer_encoding(rendered.text))
    else:
        # The parts built on their own and attached: add_alternative would build the text
        # part, then move it and copy its headers, at more than twice the cost.
        text = EmailMessage(policy=_POLICY)
        text.set_content(rendered.text, charset="utf-8", cte=_transfer_encoding(rendered.text))
        html = EmailMessage(policy=_POLICY)
        html.set_content(
            rendered.html, subtype="html", charset="utf-8", cte=_transfer_encoding(rendered.html)
        )
        msg.make_alternative()
        for part in (text, html):
            del part["MIME-Version"]  # once, at the top, is enough
            msg.attach(part)
        msg["MIME-Version"] = "1.0"
    # After the content: set_content and add_alternative move or drop every Content-* header.
    msg["Content-Language"] = rendered.locale
    data = msg.as_bytes()
    check_serialized(
        data,
        to=to,
        message_id=message_id,
        locale=rendered.locale,
        multipart=rendered.html is not None,
    )
    return data


def check_serialized(
    data: bytes, *, to: str, message_id: str, locale: str | None = None, multipart: bool = False
) -> None:
    """Parse ``data`` back and insist it has exactly the headers we set.

    Raises:
        MessageBuildError: an unexpected, missing or repeated header (at the top or in a part),
            a To or Message-ID other than the one given, or parts other than text then html.
    """
    # The top-level headers with the modern parser (it is what a reader's client would see);
    # the MIME structure with compat32, which does not re-parse every header at each boundary
    # (the default policy makes that the slowest step of building a mail).
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    names = [name.lower() for name in parsed.keys()]
    if sorted(names) != sorted(expected_headers(multipart)):
        raise MessageBuildError(f"serialized headers are {names}")
    to_header = parsed["To"]
    addresses: tuple[Address, ...] = getattr(to_header, "addresses", ())
    if len(addresses) != 1 or addresses[0].addr_spec != to:
        raise MessageBuildError("serialized To does not hold exactly the recipient")
    if str(parsed["Message-ID"]) != message_id:
        raise MessageBuildError("serialized Message-ID differs")
    if str(parsed["Auto-Submitted"]) != AUTO_SUBMITTED:
        raise MessageBuildError("serialized Auto-Submitted differs")
    if locale is not None and str(parsed["Content-Language"]) != locale:
        raise MessageBuildError("serialized Content-Language differs")
    structure = email.message_from_bytes(data, policy=email.policy.compat32)
    content_type = structure.get_content_type()
    if multipart:
        if content_type != "multipart/alternative":
            raise MessageBuildError(f"serialized type is {content_type}")
        payload = structure.get_payload()
        parts = (
            [p for p in payload if isinstance(p, email.message.Message)]
            if isinstance(payload, list)
            else []
        )
        types = [part.get_content_type() for part in parts]
        if types != ["text/plain", "text/html"]:
            raise MessageBuildError(f"serialized parts are {types}")
        for part in parts:
            part_names = [name.lower() for name in part.keys()]
            if sorted(part_names) != sorted(EXPECTED_PART_HEADERS):
                raise MessageBuildError(f"serialized part headers are {part_names}")
    elif content_type != "text/plain":
        raise MessageBuildError(f"serialized type is {content_type}")
