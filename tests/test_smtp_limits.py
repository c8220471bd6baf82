"""The real smtplib session against misbehaving relays, on the real clock (threads involved).

Bounded replies (issue 11, SMTP side), one AUTH mechanism, QUIT after a failed set-up,
STARTTLS not offered as a configuration error (issue 10, item 11).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio

from trio_mailer.core.config import TlsMode
from trio_mailer.delivery.smtp_session import (
    MAX_REPLY_LINES,
    ConnectFailed,
    RelaySettings,
    ThreadedSmtpSession,
)

from .fakes.fault_relay import FaultRelay

ENDLESS_AT = ["greeting", "ehlo"]


async def endless_reply_relay(
    at: str, sent: list[int], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A relay whose greeting (or EHLO reply) is an endless multi-line reply; ``sent`` counts
    the bytes it managed to write before the client hung up."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def serve(stream: trio.SocketStream) -> None:
        line = b"250-" + b"x" * 60 + b"\r\n"
        try:
            if at == "greeting":
                prefix = b"220-"
            else:
                await stream.send_all(b"220 fake ESMTP\r\n")
                await stream.receive_some(1024)  # EHLO
                prefix = b"250-"
            chunk = (prefix + line[4:]) * 100
            for _ in range(1_000_000):  # bounded: about 6 GB if nobody hung up
                await stream.send_all(chunk)
                sent[0] += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(serve, listeners)


@pytest.mark.parametrize("at", ENDLESS_AT)
async def test_an_endless_multi_line_reply_ends_the_session_with_bounded_memory(at: str) -> None:
    """Endless 220-/250-: ConnectFailed naming the cap, the relay cut off after a few MB at
    most (what sits in socket buffers), and no worker thread left using the session."""
    sent = [0]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(endless_reply_relay, at, sent)
            settings = RelaySettings("127.0.0.1", port, TlsMode.NONE, timeout_s=5)
            with pytest.raises(ConnectFailed) as caught:
                await ThreadedSmtpSession.connect(settings, None)
            assert f"reply longer than {MAX_REPLY_LINES} lines" in caught.value.reason
            await trio.sleep(0.5)  # let the relay notice the hang-up
            assert sent[0] < 64 * 1024 * 1024
            nursery.cancel_scope.cancel()


async def test_a_wrong_password_costs_one_auth_failure_and_the_session_says_quit(
    relay_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """Issue 10 item 11: one AUTH per connection (not PLAIN then LOGIN), then QUIT."""
    relay = FaultRelay(ssl_context=relay_tls, credentials=("bot", "right"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay.serve, "127.0.0.1", 0)
            settings = RelaySettings(
                "localhost", port, TlsMode.IMPLICIT, timeout_s=5, user="bot", password="wrong"
            )
            context = ssl.create_default_context(cafile=str(ca_file))
            with pytest.raises(ConnectFailed) as caught:
                await ThreadedSmtpSession.connect(settings, context)
            assert caught.value.config_error
            assert caught.value.reason.startswith("AUTH refused: 535")
            with trio.fail_after(5):
                await relay.wait_for_command("QUIT")
            assert [verb for _, verb in relay.commands] == ["EHLO", "AUTH", "QUIT"]
            nursery.cancel_scope.cancel()


async def test_starttls_not_offered_is_a_configuration_error(relay_tls: ssl.SSLContext) -> None:
    """Issue 10 item 11: not an outage to retry at outage pace; and the session says QUIT."""
    relay = FaultRelay(ssl_context=relay_tls, tls_mode="starttls", offer_starttls=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay.serve, "127.0.0.1", 0)
            settings = RelaySettings("localhost", port, TlsMode.STARTTLS, timeout_s=5)
            with pytest.raises(ConnectFailed) as caught:
                await ThreadedSmtpSession.connect(settings, ssl.create_default_context())
            assert caught.value.config_error
            assert "does not offer STARTTLS" in caught.value.reason
            with trio.fail_after(5):
                await relay.wait_for_command("QUIT")
            nursery.cancel_scope.cancel()
