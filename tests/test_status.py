"""Mail status over gRPC (GetStatus, WatchStatus), and the outbox behind it."""

from __future__ import annotations

import logging
import ssl
import time
from contextlib import aclosing
from pathlib import Path

import attrs
import purerpc
import pytest
import trio

from trio_mailer.client import open_channel
from trio_mailer.core.errors import OutboxFull
from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind
from trio_mailer.store.outbox import SqliteOutbox
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MailStatus, MsgRequest, StatusRequest

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import FAST, Harness, send_pass


def filler(n: int, size: int) -> OutgoingMail:
    return OutgoingMail(
        f"<fill{n}@x.example>", MailKind.PASSWORD, "a@x.example", "b@x.example", b"x" * size
    )


async def status(h: Harness, message_id: str) -> MailStatus:
    reply: MailStatus = await h.stub.GetStatus(StatusRequest(message_id=message_id))
    return reply


def name(state: int) -> str:
    return str(MailStatus.State.Name(state))


async def wait_for_state(h: Harness, message_id: str, state: str) -> None:
    """Follow WatchStatus until ``message_id`` reaches ``state``."""
    async with aclosing(h.stub.WatchStatus(StatusRequest(message_id=message_id))) as changes:
        async for change in changes:
            if name(change.state) == state:
                return
    raise AssertionError(f"{message_id} ended without reaching {state}")


async def test_delivered_mail_reports_its_history(start_harness) -> None:
    """After delivery: DELIVERED, one attempt, the 250 reply, and the three timestamps."""
    with trio.fail_after(10):
        async with start_harness() as h:
            message_id = await send_pass(h)
            await h.wait_finished(1)
            reply = await status(h, message_id)
    assert name(reply.state) == "DELIVERED"
    assert (reply.message_id, reply.attempts, reply.last_reply_code) == (message_id, 1, 250)
    assert reply.last_reply_text.startswith("250 2.0.0 Ok")
    accepted, attempted, finished = (
        reply.accepted_at.ToNanoseconds(),
        reply.last_attempt_at.ToNanoseconds(),
        reply.finished_at.ToNanoseconds(),
    )
    assert 0 < accepted <= attempted <= finished
    assert not reply.possible_duplicate


async def test_each_state_is_reached(start_harness, free_port: int) -> None:
    """QUEUED, SENDING, RETRY_WAIT, FAILED and EXPIRED, each seen through GetStatus."""
    with trio.fail_after(20):
        # QUEUED, then EXPIRED: the relay is unreachable and the time to live is short.
        async with start_harness(
            env={
                **FAST,
                "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}",
                "MAILER_MESSAGE_TTL_S": "0.5",
            }
        ) as h:
            message_id = await send_pass(h)
            assert name((await status(h, message_id)).state) == "QUEUED"
            await h.wait_finished(1)
            expired = await status(h, message_id)
            assert name(expired.state) == "EXPIRED" and expired.finished_at.ToNanoseconds() > 0
        # SENDING while the relay sits on the final ".", then RETRY_WAIT after its 451, FAILED
        # after a 550.
        async with start_harness(
            env={**FAST, "MAILER_RETRY_BASE_S": "30", "MAILER_RETRY_MAX_S": "30"}
        ) as h:
            h.relay.add_fault(Fault("DOT", delay_s=0.3, reply="451 4.3.0 try later"))
            first = await send_pass(h, code="1")
            await h.relay.wait_for_command("DATA")
            assert name((await status(h, first)).state) == "SENDING"
            await wait_for_state(h, first, "RETRY_WAIT")
            waiting = await status(h, first)
            assert name(waiting.state) == "RETRY_WAIT"
            assert (waiting.attempts, waiting.last_reply_code) == (1, 451)
            h.relay.add_fault(Fault("RCPT", reply="550 5.1.1 no such user"))
            second = await send_pass(h, code="2")
            [failed] = await h.wait_finished(1)
            assert failed.delivery.message_id == second
            reply = await status(h, second)
            assert name(reply.state) == "FAILED" and reply.last_reply_code == 550
            h.app.request_shutdown(force=True)


async def test_unknown_and_malformed_ids(start_harness) -> None:
    """An id the service never issued is NOT_FOUND; an empty one INVALID_ARGUMENT."""
    with trio.fail_after(10):
        async with start_harness() as h:
            with pytest.raises(purerpc.NotFoundError):
                await status(h, "<nobody@example.com>")
            with pytest.raises(purerpc.InvalidArgumentError):
                await status(h, "")


async def test_watch_streams_every_change_and_ends_after_the_outcome(start_harness) -> None:
    """WatchStatus: the current state, each change, and the end of the stream once final."""
    with trio.fail_after(10):
        async with start_harness(env=FAST) as h:
            h.relay.add_fault(Fault("GREETING", delay_s=0.3))  # holds the mail in QUEUED a while
            message_id = await send_pass(h)
            async with aclosing(
                h.stub.WatchStatus(StatusRequest(message_id=message_id))
            ) as changes:
                states = [(name(s.state), s.attempts) async for s in changes]
            assert states == [("QUEUED", 0), ("SENDING", 1), ("DELIVERED", 1)]
            assert h.app.board.watchers() == 0


async def test_a_watcher_that_goes_away_costs_nothing(start_harness, free_port: int) -> None:
    """A client that stops watching leaves no waiter behind."""
    with trio.fail_after(10):
        async with start_harness(env={**FAST, "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}"}) as h:
            message_id = await send_pass(h)
            async with open_channel("127.0.0.1", h.grpc_port) as channel:
                watch = MailerStub(channel).WatchStatus(StatusRequest(message_id=message_id))
                first = await watch.__anext__()
                assert name(first.state) == "QUEUED"
                assert h.app.board.watchers() == 1
                await watch.aclose()
            # The client's connection is gone: the server's watcher goes with it.
            with trio.fail_after(5):
                while h.app.board.watchers():  # noqa: ASYNC110 - the board has no event for this
                    await trio.sleep(0.01)
            h.app.request_shutdown(force=True)


async def test_file_outbox_keeps_mail_across_a_restart(start_harness, tmp_path: Path) -> None:
    """Accepted while the relay is down, stopped, started again: delivered, status kept."""
    path = tmp_path / "outbox.sqlite3"
    env = {**FAST, "MAILER_OUTBOX": str(path), "MAILER_SHUTDOWN_GRACE_S": "0"}
    with trio.fail_after(20):
        async with start_harness(env={**env}) as h:
            h.relay.add_fault(Fault("RCPT", reply="451 4.7.1 later", times=-1))
            ids = [await send_pass(h, code=str(n)) for n in range(3)]
            await wait_for_state(h, ids[0], "RETRY_WAIT")
            assert await h.shutdown(force=True) == 1
        async with start_harness(env=env) as h:
            finished = await h.wait_finished(3)
            assert sorted(f.delivery.message_id for f in finished) == sorted(ids)
            assert all(f.delivered for f in finished)
            first = await status(h, ids[0])
            assert name(first.state) == "DELIVERED"
            assert first.attempts >= 2  # the attempt before the restart counts


async def test_a_backlog_larger_than_the_queue_is_all_delivered_after_a_restart(
    start_harness, relay_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    """An outbox holding far more unfinished mail than the queue and the retry heap: every
    mail is delivered after the start, and the service never holds more than its bound."""
    path = tmp_path / "outbox.sqlite3"
    queue_size, retry_capacity, mails = 3, 4, 60
    outbox = await SqliteOutbox.open(path)
    accepted = time.time() - 10
    async with trio.open_nursery() as nursery:
        for n in range(mails):
            mail = attrs.evolve(filler(n, 500), data=b"mail %d\r\n" % n + b"x" * 500)
            record = MailRecord.accepted(mail, accepted_at_unix=accepted + n * 1e-3)
            nursery.start_soon(outbox.add, record)
    await outbox.aclose()
    env = {
        **FAST,
        "MAILER_SMTP_TIMEOUT_S": "5",  # a loaded machine must not break sessions (duplicates)
        "MAILER_SHUTDOWN_GRACE_S": "10",  # the drain stores the last mails' outcomes
        "MAILER_OUTBOX": str(path),
        "MAILER_QUEUE_SIZE": str(queue_size),
        "MAILER_RETRY_CAPACITY": str(retry_capacity),
    }
    # Each final "." answered after 20 ms: the backlog drains over about a second, while the
    # sampler below watches what the service holds.
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("DOT", delay_s=0.02, times=-1))
    # Recovery reads a page (queue_size mails) at a time and puts each on the board as it
    # queues it, waiting for room: the channel, the retry heap and in flight, plus one.
    bound = 2 * queue_size + retry_capacity
    seen: list[int] = []
    with trio.fail_after(60):
        async with start_harness(env=env, relay=relay) as h:
            expected = {b"mail %d" % n for n in range(mails)}
            while not expected <= {m.data.split(b"\r\n", 1)[0] for m in h.relay.received}:
                seen.append(h.app.board.unfinished()[0])
                await trio.sleep(0.005)
        # Out of the harness: the service has drained and stored every outcome.
    assert len(seen) > 10 and max(seen) <= bound, (len(seen), max(seen), bound)
    reopened = await SqliteOutbox.open(path)
    try:
        assert await reopened.unfinished() == []
        for n in range(mails):
            record = await reopened.get(f"<fill{n}@x.example>")
            assert record is not None and record.state is MailState.DELIVERED, n
    finally:
        await reopened.aclose()


async def test_full_outbox_refuses_with_unavailable(start_harness, tmp_path: Path, caplog) -> None:
    """An outbox that cannot grow: UNAVAILABLE, a clear log line, the mail not sent."""
    caplog.set_level(logging.ERROR, "trio_mailer")
    path = tmp_path / "small.sqlite3"
    await (await SqliteOutbox.open(path)).aclose()
    outbox = await SqliteOutbox.open(path, max_size_bytes=1)  # as full as a full disk
    n = 0
    for size in (8000, 1000, 100):  # fill what room the file still has, down to crumbs
        for _ in range(100):
            n += 1
            try:
                await outbox.add(MailRecord.accepted(filler(n, size), accepted_at_unix=time.time()))
            except OutboxFull:
                break
    with trio.fail_after(10):
        async with start_harness(outbox=outbox) as h:
            with pytest.raises(purerpc.UnavailableError) as info:
                await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"))
            assert info.value.status.status_message == (
                "cannot store the mail right now; try again later"
            )
    # Only the fillers (resumed from the outbox at start-up) went out, not the refused mail.
    assert all(m.rcpt_to == ("b@x.example",) for m in h.relay.received)
    assert "cannot store a password mail: outbox" in caplog.text


async def test_finished_statuses_are_pruned_after_the_retention(start_harness) -> None:
    """A delivered mail's status answers until the retention period, then NOT_FOUND."""
    with trio.fail_after(10):
        async with start_harness(env={"MAILER_STATUS_RETENTION_S": "0.3"}) as h:
            message_id = await send_pass(h)
            await h.wait_finished(1)
            assert name((await status(h, message_id)).state) == "DELIVERED"
            await trio.sleep(1.0)  # the retention (0.3 s) and a pruning round (every 0.3 s)
            with pytest.raises(purerpc.NotFoundError):
                await status(h, message_id)
