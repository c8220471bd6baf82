"""One backoff per relay: the start-up relay check and every sender share it, so a relay that
refuses our credentials sees at most one login per MAILER_RETRY_MAX_S (issue 25)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

from trio_mailer.core.config import TlsMode
from trio_mailer.core.retry_policy import ReconnectBackoff
from trio_mailer.delivery.relays import RelayChain
from trio_mailer.delivery.smtp_session import ConnectFailed, RelaySettings
from trio_mailer.dev.smtp_server import Session

from .fakes.fault_relay import FaultRelay
from .helpers import send_pass

RETRY_MAX_S = 0.5


class LoginCountingRelay(FaultRelay):
    """The fault relay, noting the time of every AUTH command (the harness clears
    ``commands`` after the start-up check; these are kept)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.logins: list[float] = []

    def command_received(self, session: Session, verb: str) -> None:
        if verb == "AUTH":
            self.logins.append(trio.current_time())
        super().command_received(session, verb)


async def test_a_relay_refusing_our_password_sees_one_login_per_retry_max(
    start_harness, relay_tls
) -> None:
    """A wrong password, two senders, a mail waiting and the start-up check: over 2.2 s the
    relay sees logins at least MAILER_RETRY_MAX_S (0.5 s) apart, the check's included."""
    relay = LoginCountingRelay(
        ssl_context=relay_tls, credentials=("bot", "the-right-password"), require_auth=True
    )
    env = {
        "MAILER_USER": "bot",
        "MAILER_PASSWORD": "a-wrong-password",
        "MAILER_RETRY_BASE_S": "0.05",
        "MAILER_RETRY_MAX_S": str(RETRY_MAX_S),
        "MAILER_SMTP_SESSIONS": "2",
        "MAILER_SHUTDOWN_GRACE_S": "0",
    }
    with trio.fail_after(20):
        async with start_harness(env=env, relay=relay) as h:
            await send_pass(h)
            await trio.sleep(2.2)
            logins = list(relay.logins)
    assert 2 <= len(logins) <= 5, logins
    gaps = [later - earlier for earlier, later in itertools.pairwise(logins)]
    assert min(gaps) >= RETRY_MAX_S * 0.95, gaps


async def test_callers_of_a_failing_relay_share_its_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A check retrying on its own backoff and three senders retrying every 50 ms, for 60 s of
    trio time against a relay refusing our credentials (cap 10 s): the relay is tried at most
    once per 10 s, one connect at a time; the others hear why without a connect."""
    tried: list[float] = []
    connecting = 0

    async def connect_one(settings: RelaySettings) -> object:
        nonlocal connecting
        connecting += 1
        assert connecting == 1, "two connects to a failing relay at once"
        tried.append(trio.current_time())
        await trio.sleep(0.3)  # EHLO, TLS, AUTH
        connecting -= 1
        raise ConnectFailed("AUTH refused: 535 5.7.8 bad credentials", config_error=True)

    relay = RelaySettings("relay.example", 465, TlsMode.IMPLICIT, 5)
    chain = RelayChain([relay], connect_one, ReconnectBackoff(base_s=0.05, cap_s=10), lambda: 0.5)  # type: ignore[arg-type]
    heard: list[str] = []

    async def caller(pause_s: float) -> None:
        while True:
            with pytest.raises(ConnectFailed) as failed:
                await chain.connect()
            assert failed.value.config_error
            heard.append(failed.value.reason)
            await trio.sleep(pause_s)

    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, 10.0)  # the start-up check: the cap, a config error
            await trio.sleep(1)  # the senders start after the check's first outcome
            for _ in range(3):
                nursery.start_soon(caller, 0.05)
    assert 5 <= len(tried) <= 7, tried
    assert min(b - a for a, b in itertools.pairwise(tried)) >= 10
    assert set(heard) == {"AUTH refused: 535 5.7.8 bad credentials"}
    assert len(heard) > len(tried)
