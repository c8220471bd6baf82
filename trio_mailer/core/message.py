"""Build the RFC 5322 message for one mail, and check what was built.

Pure. Headers are set through ``email.message.EmailMessage`` with the SMTP policy (CRLF line
ends, RFC 2047 for non-ASCII subjects), never by pasting strings. Because Python 3.11.7 can still
be tricked into refolding a header into two (CVE-2024-6923), every serialized message is parsed
back and must show exactly the expected header names, one recipient, and the same To.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import uuid
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage

import attrs

from trio_mailer.core.errors import MessageBuildError
from trio_mailer.core.rendering import MailKind, MailTemplates
from trio_mailer.core.validation import reject_unsafe_header_text, validate_address, validate_code

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
    }
)


@attrs.frozen
class OutgoingMail:
    """One accepted mail, ready for the SMTP envelope; what the queue carries."""

    message_id: str  # with angle brackets, as in the Message-ID header
    kind: MailKind
    envelope_from: str
    envelope_to: str
    data: bytes = attrs.field(repr=False)  # the serialized message, CRLF line ends


@attrs.frozen
class MailComposer:
    """Turns a validated request into an ``OutgoingMail``."""

    templates: MailTemplates
    from_address: str
    service_name: str

    def compose(self, kind: MailKind, to: str, code: str, now: datetime) -> OutgoingMail:
        """Validate ``to`` and ``code``, render ``kind`` and build the message.

        Args:
            now: the Date header's time (timezone-aware).

        Raises:
            InvalidRequest: a field is malformed (names the field).
            RenderError: the template failed for these values.
            MessageBuildError: the built message failed its safety check.
        """
        validate_address("to", to)
        validate_code("code", code)
        rendered = self.templates.render(
            kind, {"code": code, "to": to, "service_name": self.service_name}
        )
        reject_unsafe_header_text("subject", rendered.subject)
        domain = self.from_address.rpartition("@")[2]
        message_id = f"<{uuid.uuid4().hex}@{domain}>"

        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = Address(display_name=self.service_name, addr_spec=self.from_address)
        msg["To"] = Address(addr_spec=to)
        msg["Subject"] = rendered.subject
        msg["Date"] = email.utils.format_datetime(now)
        msg["Message-ID"] = message_id
        msg.set_content(rendered.body, charset="utf-8")
        data = msg.as_bytes()
        check_serialized(data, to=to, message_id=message_id)
        return OutgoingMail(
            message_id=message_id,
            kind=kind,
            envelope_from=self.from_address,
            envelope_to=to,
            data=data,
        )


def check_serialized(data: bytes, *, to: str, message_id: str) -> None:
    """Parse ``data`` back and insist it has exactly the headers we set.

    Raises:
        MessageBuildError: an unexpected, missing or repeated header, or a To or Message-ID
            other than the one given.
    """
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    names = [name.lower() for name in parsed.keys()]
    if sorted(names) != sorted(EXPECTED_HEADERS):
        raise MessageBuildError(f"serialized headers are {names}")
    to_header = parsed["To"]
    addresses: tuple[Address, ...] = getattr(to_header, "addresses", ())
    if len(addresses) != 1 or addresses[0].addr_spec != to:
        raise MessageBuildError("serialized To does not hold exactly the recipient")
    if str(parsed["Message-ID"]) != message_id:
        raise MessageBuildError("serialized Message-ID differs")
