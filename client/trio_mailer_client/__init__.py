"""Call trio-mailer from Trio.

::

    import trio_mailer_client

    async with trio_mailer_client.open_mailer("mailer:20100", token=token) as mailer:
        result = await mailer.send_pass("user@example.com", "123456", locale="ru")
        if not result.sent:
            ...  # result.reason, result.retry_after (seconds)
        await mailer.send("user@example.com", "welcome", {"name": "Ann"})  # any template

grpcio carries the calls (deadlines, reconnects, keepalive); each call is awaited in Trio
without a thread, and cancelling the Trio task cancels the call. ``trio_mailer_client.testing``
has ``FakeMailer``, the same API in-process for your own tests.
"""

from trio_mailer_client._mailer import CHANNEL_OPTIONS, Mailer, open_mailer, tls_credentials
from trio_mailer_client._policy import DEFAULT_TIMEOUT_S, new_idempotency_key
from trio_mailer_client._types import (
    Accepted,
    MailerError,
    MailKind,
    MailState,
    MailStatus,
    Refused,
    SendResult,
)

__version__ = "0.1.0"

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT_S",
    "Accepted",
    "MailKind",
    "MailState",
    "MailStatus",
    "Mailer",
    "MailerError",
    "Refused",
    "SendResult",
    "new_idempotency_key",
    "open_mailer",
    "tls_credentials",
]
