"""Per-recipient and per-caller limits, durable with the outbox; queue-full retry hints."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_mailer.grpc.mailer_service import MailerService
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import SqliteOutbox

from .admission_helpers import as_caller, build_service, queued, send

TIMEOUT_S = 20


async def test_the_sixth_mail_is_refused_until_retry_after_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """5/600: five mails 10 s apart; the sixth is told 550 s; after that it goes."""
    with trio.fail_after(10_000):  # the mock clock's seconds
        service = build_service(recipient_limit="5/600", wall_clock=trio.current_time)
        start = trio.current_time()
        for _ in range(5):
            assert (await send(service)).sent
            await trio.sleep(10.0)
        sixth = await send(service)
        assert (sixth.sent, sixth.reason, sixth.retry_after_ms) == (
            False,
            "recipient rate limited",
            550_000,
        )
        assert (await send(service, "other@example.com")).sent  # another address is not held
        await trio.sleep(sixth.retry_after_ms / 1000 - 0.001)
        assert not (await send(service)).sent  # a millisecond early: still refused
        await trio.sleep(0.001)
        assert (await send(service)).sent
        # The next one waits for the second of the five (sent at +10 s) to leave the window.
        seventh = await send(service)
        now = trio.current_time() - start
        assert seventh.retry_after_ms == pytest.approx((610.0 - now) * 1000, abs=1)
    assert queued(service) == 7


async def test_addresses_are_counted_normalised_and_across_kinds() -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service(recipient_limit="2/600")
        assert (await send(service, "Alice@Example.COM")).sent
        assert (await send(service, "alice@example.com", kind="SendRetrieve")).sent
        third = await send(service, "ALICE@example.com")
    assert (third.sent, third.reason) == (False, "recipient rate limited")
    assert third.retry_after_ms > 0


async def test_the_caller_limit_counts_each_caller_identity() -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service(caller_limit="2/60")
        alpha = [
            await send(service, f"a{n}@example.com", call=as_caller("alpha")) for n in range(3)
        ]
        beta = await send(service, "b@example.com", call=as_caller("beta"))
    assert [r.sent for r in alpha] == [True, True, False]
    assert alpha[2].reason == "caller rate limited" and 0 < alpha[2].retry_after_ms <= 60_000
    assert beta.sent


async def test_a_refused_call_does_not_count() -> None:
    """A call refused for a full queue leaves the recipient's allowance as it was."""
    with trio.fail_after(TIMEOUT_S):
        service = build_service(recipient_limit="1/600", queue_size=1)
        assert (await send(service, "filler@example.com")).sent
        full = await send(service)
        assert (full.reason, full.retry_after_ms) == ("queue full", 1000)  # no pace yet: 1 s
        delivery = await service.accept.queue.next_due()
        assert delivery is not None
        service.accept.queue.finish(delivery)
        assert (await send(service)).sent


async def test_refusals_are_logged_masked_without_the_code_and_counted(caplog) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    with trio.fail_after(TIMEOUT_S):
        service = build_service(recipient_limit="1/600", metrics=metrics)
        await send(service, "victim@example.com", "918273")
        await send(service, "victim@example.com", "918273")
    assert "refused password mail to v***@example.com: recipient rate limited" in caplog.text
    assert "918273" not in caplog.text and "victim@" not in caplog.text
    counted = metrics.requests.labels("SendPass", "recipient_rate_limited")._value.get()
    assert counted == 1


async def opened(path: Path, **limits: str) -> tuple[SqliteOutbox, MailerService]:
    outbox = await SqliteOutbox.open(path)
    service = build_service(outbox, wall_clock=time.time, **limits)  # type: ignore[arg-type]
    await service.accept.admission.load()
    return outbox, service


async def test_the_counts_survive_a_restart_at_no_extra_commit(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        outbox, service = await opened(path, recipient_limit="2/600", caller_limit="100/1")
        for n in range(2):
            assert (await send(service, key=f"k{n}")).sent
        # One commit per mail, with its key and its rate-limit row in it: no extra fsync.
        assert outbox.statistics().commits == 2
        await outbox.aclose()
        outbox, service = await opened(path, recipient_limit="2/600")
        try:
            third = await send(service)
            # A repeat of a stored mail still gets its reply, though the limit is reached.
            repeat = await send(service, key="k1")
        finally:
            await outbox.aclose()
    assert (third.sent, third.reason) == (False, "recipient rate limited")
    assert repeat.sent


async def test_a_repeat_does_not_count_against_the_limit() -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service(recipient_limit="1/600")
        first = await send(service, key="k")
        assert await send(service, key="k") == first
        assert await send(service, key="k") == first
    assert queued(service) == 1
