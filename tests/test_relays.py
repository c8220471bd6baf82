"""Several relays (MAILER_REMOTE_HOST comma-separated): tried in order, a failing one skipped."""

from __future__ import annotations

import logging

import attrs
import pytest
import trio
import trio.testing

from trio_mailer.core.config import TlsMode, load_config
from trio_mailer.core.retry_policy import ReconnectBackoff
from trio_mailer.delivery.relays import RelayChain
from trio_mailer.delivery.smtp_session import ConnectFailed, RelaySettings

from .helpers import FAST, send_pass


async def test_two_relays_one_down_the_mail_goes_to_the_other(
    start_harness, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The first relay refuses connections: the mail is delivered by the second, and the log
    line and the metric say which relay took it."""
    caplog.set_level(logging.INFO, "trio_mailer")

    def two_relays(config):  # type: ignore[no-untyped-def]
        return attrs.evolve(
            config, relays=(("127.0.0.1", free_port), (config.relay_host, config.relay_port))
        )

    with trio.fail_after(30):
        async with start_harness(env=FAST, configure=two_relays) as h:
            message_id = await send_pass(h)
            [finished] = await h.wait_finished(1)
            assert finished.delivered
            live = f"127.0.0.1:{h.relay_port}"
            assert len(h.relay.received) == 1
            assert f"delivered {message_id}" in caplog.text
            assert f"via {live}" in caplog.text
            assert f"relay 127.0.0.1:{free_port} skipped" in caplog.text
            assert h.app.metrics.delivered_by_relay.labels(live)._value.get() == 1


def test_remote_host_takes_a_comma_separated_list() -> None:
    env = {
        "MAILER_REMOTE_HOST": "a.example:465, b.example, [2001:db8::1]:2465",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_OUTBOX": "memory",
    }
    config = load_config(env)
    assert config.relay_list == (("a.example", 465), ("b.example", 465), ("2001:db8::1", 2465))
    assert (config.relay_host, config.relay_port) == ("a.example", 465)


async def test_a_failing_relay_is_skipped_for_its_backoff_then_tried_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Connect failure or 421 on relay a: b is used without trying a, until a's backoff ends."""
    tried: list[str] = []
    down = {"a"}

    async def connect_one(settings: RelaySettings) -> str:
        await trio.lowlevel.checkpoint()
        tried.append(settings.host)
        if settings.host in down:
            raise ConnectFailed("connection refused")
        return settings.host  # stands in for a session

    relays = [RelaySettings(name, 25, TlsMode.NONE, 5) for name in ("a", "b")]
    backoff = ReconnectBackoff(base_s=10, cap_s=60)
    chain = RelayChain(relays, connect_one, backoff, lambda: 1.0)  # type: ignore[arg-type]
    assert await chain.connect() == "b"
    assert tried == ["a", "b"]
    assert await chain.connect() == "b"
    assert tried == ["a", "b", "b"]  # a skipped
    await trio.sleep(10)
    down.clear()
    assert await chain.connect() == "a"  # a's backoff is over: first in order again
    chain.trouble("a:25", "421 4.7.0 try later")  # a session of a said 421
    assert await chain.connect() == "b"
    down.update({"a", "b"})
    with pytest.raises(ConnectFailed) as caught:
        await chain.connect()
    assert caught.value.reason == "b:25: connection refused"
