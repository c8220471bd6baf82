"""Dead addresses: a 550 5.1.1 to RCPT puts the address on the suppression list; later calls get
sent=false at once; `trio-mailer suppressed list/remove` read and edit a running service's list;
the list is durable in the outbox."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import trio

from tests.fakes.fault_relay import Fault
from trio_mailer.core.rate_limits import RateLimit
from trio_mailer.service.admission import AdmissionControl
from trio_mailer.store.outbox import SqliteOutbox
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .helpers import DEAD, FAST, ON, subprocess_env


async def cli(*args: str) -> tuple[int, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_mailer", *args],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
        env=subprocess_env(),
    )
    return result.returncode, (result.stdout + result.stderr).decode()


async def test_a_dead_address_is_suppressed_listed_and_removed(start_harness, caplog) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(60):
        async with start_harness(env=ON) as h:
            h.relay.add_fault(Fault("RCPT", reply=DEAD))
            first = await h.stub.SendPass(MsgRequest(to="gone@example.com", code="1"))
            assert first.sent
            (finished,) = await h.wait_finished(1)
            assert finished.outcome == "failed"
            refused = await h.stub.SendPass(MsgRequest(to="Gone@EXAMPLE.com", code="2"))
            assert (refused.sent, refused.reason, refused.retry_after_ms) == (
                False,
                "suppressed",
                0,
            )
            assert (await h.stub.SendPass(MsgRequest(to="alive@example.com", code="3"))).sent

            server = f"127.0.0.1:{h.grpc_port}"
            status, listed = await cli("suppressed", "list", "--server", server)
            assert status == 0, listed
            assert listed.startswith("gone@example.com\tuntil=")
            assert "550 5.1.1 <gone@example.com>: Recipient address rejected" in listed
            status, removed = await cli(
                "suppressed", "remove", "gone@example.com", "--server", server
            )
            assert (status, removed.strip()) == (0, "removed gone@example.com")
            status, again = await cli(
                "suppressed", "remove", "gone@example.com", "--server", server
            )
            assert (status, again.strip()) == (1, "not suppressed: gone@example.com")
            status, listed = await cli("suppressed", "list", "--server", server)
            assert (status, listed) == (0, "")
            assert (await h.stub.SendPass(MsgRequest(to="gone@example.com", code="4"))).sent
    assert "suppressing g***@example.com for 604800s" in caplog.text
    assert "refused password mail to G***@EXAMPLE.com: suppressed" in caplog.text


async def test_other_permanent_failures_do_not_suppress(start_harness) -> None:
    with trio.fail_after(60):
        async with start_harness(env=ON) as h:
            h.relay.add_fault(Fault("RCPT", reply="550 5.7.1 relaying denied"))
            await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"))
            await h.wait_finished(1)
            assert (await h.stub.SendPass(MsgRequest(to="user@example.com", code="2"))).sent


async def test_suppression_off_when_the_setting_is_zero(start_harness) -> None:
    with trio.fail_after(60):
        async with start_harness(env={**FAST, "MAILER_SUPPRESS_S": "0"}) as h:
            h.relay.add_fault(Fault("RCPT", reply=DEAD))
            await h.stub.SendPass(MsgRequest(to="gone@example.com", code="1"))
            await h.wait_finished(1)
            assert (await h.stub.SendPass(MsgRequest(to="gone@example.com", code="2"))).sent


async def test_the_list_survives_a_restart_and_expires(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    clock = [time.time()]

    async def control(outbox: SqliteOutbox) -> AdmissionControl:
        admission = AdmissionControl(
            window_s=60.0,
            recipient_limit=RateLimit.parse("0"),
            suppress_s=3600.0,
            wall_clock=lambda: clock[0],
            outbox=outbox,
        )
        await admission.load()
        return admission

    with trio.fail_after(20):
        outbox = await SqliteOutbox.open(path)
        admission = await control(outbox)
        assert admission.mail_failed("Gone@Example.com", f"RCPT rejected: {DEAD}", "<m1@x>")
        assert not admission.mail_failed(
            "x@example.com", "RCPT rejected: 451 4.3.0 later", "<m2@x>"
        )
        await admission.flush()
        await outbox.aclose()

        outbox = await SqliteOutbox.open(path)
        try:
            admission = await control(outbox)
            (entry,) = admission.suppressed()
            assert (entry.address, entry.reply_code, entry.message_id) == (
                "gone@example.com",
                550,
                "<m1@x>",
            )
            clock[0] += 3601.0
            assert admission.suppressed() == []
            assert await outbox.list_suppressed(clock[0]) == []
        finally:
            await outbox.aclose()
