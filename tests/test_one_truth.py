"""One truth per mail: the log lines, the stop summary and GetStatus agree on its state and on
its number of attempts; a drain's refusals are summed up, not logged one by one (issue 25)."""

from __future__ import annotations

import logging

import purerpc
import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MailStatus, MsgRequest, StatusRequest

from .fakes.fault_relay import Fault
from .helpers import FAST, send_pass


async def test_an_expired_mail_is_expired_in_its_log_line_the_summary_and_its_status(
    start_harness, free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay is down past the time to live: ``expired <id>``, never ``failed <id>``; the
    stop summary counts it as expired; GetStatus says EXPIRED."""
    caplog.set_level(logging.INFO, "trio_mailer")
    env = {
        **FAST,
        "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}",
        "MAILER_MESSAGE_TTL_S": "0.5",
    }
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            message_id = await send_pass(h)
            [finished] = await h.wait_finished(1)
            status = await h.stub.GetStatus(StatusRequest(message_id=message_id))
            assert await h.shutdown() == 0
    assert finished.outcome == "expired"
    assert status.state == MailStatus.EXPIRED
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if line.startswith(f"expired {message_id} (attempts=0")]
    assert not [line for line in lines if line.startswith(f"failed {message_id}")]
    [summary] = [line for line in lines if line.startswith("stopped: ")]
    assert summary.startswith("stopped: 0 delivered, 0 failed, 1 expired, 0 left behind")


async def test_an_attempt_in_flight_at_shutdown_counts_in_the_shutdown_line(
    start_harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay holds the final "." past the grace period: the line naming the mail left
    behind says attempts=1, as GetStatus did."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(20):
        async with start_harness(env={"MAILER_SHUTDOWN_GRACE_S": "0"}) as h:
            h.relay.add_fault(Fault("DOT", delay_s=30))
            message_id = await send_pass(h)
            await h.relay.wait_for_command("DATA")
            status = await h.stub.GetStatus(StatusRequest(message_id=message_id))
            assert await h.shutdown() == 1
    assert (status.state, status.attempts) == (MailStatus.SENDING, 1)
    [line] = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"not delivered at shutdown: {message_id}")
    ]
    assert "(attempts=1," in line


async def test_refusals_during_a_drain_are_one_summary_line_a_second(
    start_harness, caplog: pytest.LogCaptureFixture
) -> None:
    """60 calls refused while draining within a fraction of a second: one log line, then a
    line a second later that sums up the rest, and the stop summary counts them all."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(20):
        async with start_harness() as h:
            h.app.accept.draining = True
            for n in range(60):
                with pytest.raises(purerpc.RpcFailedError):
                    await h.stub.SendPass(MsgRequest(to="user@example.com", code=str(n)))
            during = [r for r in caplog.records if "shutting down" in r.getMessage()]
            await trio.sleep(1.05)
            with pytest.raises(purerpc.RpcFailedError):
                await h.stub.SendPass(MsgRequest(to="user@example.com", code="late"))
            after = [r for r in caplog.records if "shutting down" in r.getMessage()]
            h.app.accept.draining = False
    assert len(during) == 1, [r.getMessage() for r in during]
    assert during[0].getMessage() == "refused 1 send call(s): server is shutting down"
    assert len(after) == 2
    assert after[1].getMessage() == "refused 60 send call(s): server is shutting down"
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped: ")]
    assert "61 send call(s) refused while shutting down" in summary
