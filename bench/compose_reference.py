"""The reference for the compose section: how trio-mailer built a message before issue 16.

``reference_build_message`` and ``reference_check_serialized`` are ``build_message`` and
``check_serialized`` as they were in trio_mailer/core/message.py before it learned to serialize
directly: ``email.message.EmailMessage`` with the SMTP policy builds and serializes the message,
and the result is parsed back (the modern parser for the top-level headers, compat32 for the MIME
structure). Kept verbatim, apart from the names, so that bench/compose.py can set today's cost
against it side by side; not used by the service.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import email.utils
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage

from trio_mailer.core.errors import MessageBuildError
from trio_mailer.core.rendering import RenderedMail

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
AUTO_SUBMITTED = "auto-generated"
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
MAX_7BIT_LINE_CHARS = 78


def _transfer_encoding(part: str) -> str:
    if part.isascii():
        if max(map(len, part.splitlines()), default=0) <= MAX_7BIT_LINE_CHARS:
            return "7bit"
        return "quoted-printable"
    return "base64"


def expected_headers(multipart: bool) -> frozenset[str]:
    return EXPECTED_MULTIPART_HEADERS if multipart else EXPECTED_HEADERS


def reference_build_message(
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
    reference_check_serialized(
        data,
        to=to,
        message_id=message_id,
        locale=rendered.locale,
        multipart=rendered.html is not None,
    )
    return data


def reference_check_serialized(
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
