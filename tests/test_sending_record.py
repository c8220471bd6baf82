"""No record, no send: an attempt the outbox cannot store as started is not made.

The sender stores ``SENDING`` before the relay hears DATA. When that fails the mail must not go
out (a replica cut off from a shared outbox could otherwise send a mail another replica holds);
it waits and is tried again, and goes out once when the outbox is back. When the outbox refuses
the attempt (the mail is finished, or another replica holds it) the mail leaves this sender.
On the autojump clock with in-trio fakes (STYLE 12).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.testing

from trio_mailer.core.errors import OutboxConflict, OutboxError
from trio_mailer.core.mail_lifecycle import MailRecord, MailState, StatusChange
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.retry_policy import ReconnectBackoff
from trio_mailer.delivery.attempt import UNSTORED_RETRY_MAX_S
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail, Sender
from trio_mailer.delivery.smtp_session import Delivered, Reply
from trio_mailer.store.outbox import MemoryOutbox
from trio_mailer.store.status_board import StatusBoard

from .helpers import mail
from .sender_helpers import build_sender


@attrs.define
class Relay:
    """Every mail it is sent, with the trio time it came."""

    sent: list[tuple[float, str]] = attrs.Factory(list)

    async def connect(self) -> Session:
        await trio.lowlevel.checkpoint()
        return Session(self)


@attrs.define
class Session:
    relay: Relay

    async def send(self, mail: OutgoingMail) -> Delivered:
        await trio.sleep(0.01)
        self.relay.sent.append((trio.current_time(), mail.message_id))
        return Delivered(Reply(250, "ok"))

    async def probe(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def reset(self) -> bool:
        return True

    async def close(self, *, quit: bool) -> None:
        await trio.lowlevel.checkpoint()


def _sending(change: StatusChange) -> bool:
    return change.state is MailState.SENDING


@attrs.define
class FlakyOutbox(MemoryOutbox):
    """A memory outbox whose ``record`` raises ``error`` for the changes ``fails`` picks
    (SENDING by default), while ``failing``."""

    failing: bool = False
    error: OutboxError = attrs.Factory(lambda: OutboxError("the database does not answer"))
    fails: Callable[[StatusChange], bool] = _sending
    refused: list[StatusChange] = attrs.Factory(list)
    refused_at: list[float] = attrs.Factory(list)  # trio time

    async def record(self, change: StatusChange) -> None:
        await trio.lowlevel.checkpoint()
        if self.failing and self.fails(change):
            self.refused.append(change)
            self.refused_at.append(trio.current_time())
            raise self.error
        await super().record(change)


async def start(
    outbox: FlakyOutbox, count: int
) -> tuple[Sender, MailQueue, StatusBoard, Relay, list[FinishedMail]]:
    relay = Relay()
    board = StatusBoard()
    finished: list[FinishedMail] = []
    sender = build_sender(
        relay.connect,
        board=board,
        outbox=outbox,
        on_finished=finished.append,
        backoff=ReconnectBackoff(base_s=1, cap_s=8),
        random=lambda: 1.0,
    )
    queue = MailQueue.open(capacity=count, retry_capacity=count)
    for n in range(count):
        record = MailRecord.accepted(mail(n), accepted_at_unix=sender.wall_clock())
        await outbox.add(record)
        board.track(record)
        queue.put_nowait(mail(n))
    return sender, queue, board, relay, finished


async def test_an_attempt_that_cannot_be_stored_is_not_sent_and_is_tried_again_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The outbox fails for 30 s: nothing reaches the relay meanwhile, the attempt is not
    counted, the waits grow with the backoff; once it works each mail is delivered once, with
    one attempt stored."""
    outbox = FlakyOutbox(failing=True)
    sender, queue, board, relay, finished = await start(outbox, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, queue)
        await trio.sleep(30)
        assert relay.sent == []
        tries = [
            at
            for at, c in zip(outbox.refused_at, outbox.refused, strict=True)
            if c.message_id == mail(0).message_id
        ]
        assert len(tries) >= 3, tries  # tried again, not dropped
        assert all(c.attempts == 1 for c in outbox.refused)  # never counted
        gaps = [b - a for a, b in itertools.pairwise(tries)]
        assert gaps == sorted(gaps) and 0 < gaps[0], gaps  # the backoff grows
        assert gaps[-1] <= UNSTORED_RETRY_MAX_S + 0.1, gaps  # and is capped
        seen = board.get(mail(0).message_id)
        assert seen is not None and seen.state is MailState.QUEUED  # not shown as sending
        outbox.failing = False
        queue.close()
    assert sorted(m for _, m in relay.sent) == [mail(0).message_id, mail(1).message_id]
    assert [f.outcome for f in finished] == ["delivered", "delivered"]
    for n in range(2):
        stored = await outbox.get(mail(n).message_id)
        assert stored is not None
        assert (stored.state, stored.attempts) == (MailState.DELIVERED, 1)
        assert not stored.possible_duplicate


async def test_a_mail_whose_attempt_the_outbox_refuses_is_not_sent_and_leaves_this_sender(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """``OutboxConflict`` for SENDING (another replica holds the mail, or it is finished): not
    sent, not reported finished, off the board; the other mail goes on as usual."""
    outbox = FlakyOutbox(
        error=OutboxConflict("another replica holds the mail now"),
        fails=lambda c: _sending(c) and c.message_id == mail(0).message_id,
    )
    sender, queue, board, relay, finished = await start(outbox, 2)
    outbox.failing = True
    queue.close()
    with trio.fail_after(60):
        await sender.run(queue)
    assert [m for _, m in relay.sent] == [mail(1).message_id]
    assert [f.delivery.message_id for f in finished] == [mail(1).message_id]
    assert board.get(mail(0).message_id) is None
    assert "not sending <0@example.com>: the outbox refuses the attempt" in caplog.text


async def test_a_failed_outcome_record_does_not_resend(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only SENDING holds the mail back: a delivery whose DELIVERED cannot be stored is still
    delivered once (and logged), not sent again."""
    outbox = FlakyOutbox(fails=lambda c: c.state is MailState.DELIVERED)
    sender, queue, _, relay, finished = await start(outbox, 1)
    outbox.failing = True
    queue.close()
    with trio.fail_after(60):
        await sender.run(queue)
    assert [m for _, m in relay.sent] == [mail(0).message_id]
    assert [f.outcome for f in finished] == ["delivered"]
    assert [c.state for c in outbox.refused] == [MailState.DELIVERED]
