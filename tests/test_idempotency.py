"""Idempotency keys: a repeat gets the first reply and makes no second mail, also across a
restart and a kill -9 between the commit and the answer."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path

import purerpc
import pytest
import trio
import trio.testing

from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.grpc.mailer_service import MailerService
from trio_mailer.store.admission_tables import Acceptance
from trio_mailer.store.outbox import MemoryOutbox, SqliteOutbox
from trio_mailer.v1.mailer_pb2 import SendRequest, StatusRequest

from .admission_helpers import FakeCall, as_caller, build_service, queued, refused_with, send

TIMEOUT_S = 20
ROOT = Path(__file__).resolve().parent.parent  # the child imports tests.admission_helpers
KEY = "reset-form/7f3a9c"


async def test_a_repeat_gets_the_first_reply_and_nothing_new_is_stored() -> None:
    with trio.fail_after(TIMEOUT_S):
        outbox = MemoryOutbox()
        service = build_service(outbox)
        first = await send(service, key=KEY)
        again = await send(service, key=KEY)
        other = await send(service, key="another-key")
        plain = [await send(service), await send(service)]  # no key: two mails
    assert first.sent and again == first
    assert other.sent and other.message_id != first.message_id
    assert plain[0].message_id != plain[1].message_id
    assert queued(service) == 4
    assert len(await outbox.unfinished()) == 4


@pytest.mark.parametrize(
    ("to", "code", "kind"),
    [
        ("other@example.com", "123456", "SendPass"),
        ("user@example.com", "654321", "SendPass"),
        ("user@example.com", "123456", "SendRetrieve"),
    ],
)
async def test_the_same_key_with_another_payload_is_a_failed_precondition(
    to: str, code: str, kind: str
) -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service()
        await send(service, key=KEY)
        message = await refused_with(
            purerpc.StatusCode.FAILED_PRECONDITION, service, to, code, KEY, kind=kind
        )
    assert message.startswith("idempotency_key: already used for a mail with another")
    assert queued(service) == 1


async def test_keys_belong_to_their_caller() -> None:
    """Another caller's same key is another key; unauthenticated callers share one space."""
    with trio.fail_after(TIMEOUT_S):
        service = build_service()
        alpha = await send(service, key=KEY, call=as_caller("alpha"))
        beta = await send(service, "b@example.com", key=KEY, call=as_caller("beta"))
        anon1 = await send(service, key=KEY)
        anon2 = await send(service, key=KEY)
    assert len({alpha.message_id, beta.message_id, anon1.message_id}) == 3
    assert anon2 == anon1


async def test_bad_keys_are_invalid_arguments_naming_the_field() -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service()
        message = await refused_with(purerpc.StatusCode.INVALID_ARGUMENT, service, key="x" * 257)
    assert message == "idempotency_key: expected at most 256 characters, got 257"


class GatedOutbox(MemoryOutbox):
    """Holds every add until ``gate`` is set (an in-trio fake: MockClock is fine with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.entered = trio.Event()

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().add(record, acceptance)


async def test_a_concurrent_repeat_waits_for_the_first_outcome() -> None:
    with trio.fail_after(TIMEOUT_S):
        outbox = GatedOutbox()
        service = build_service(outbox)
        replies = []

        async def call() -> None:
            replies.append(await send(service, key=KEY))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await outbox.entered.wait()
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert replies == []  # the repeat waits; it did not start a mail of its own
            outbox.gate.set()
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0].sent
    assert queued(service) == 1


async def test_a_concurrent_repeat_gives_up_at_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        outbox = GatedOutbox()
        service = build_service(outbox)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, service, "user@example.com", "123456", KEY)
            await outbox.entered.wait()
            started = trio.current_time()
            message = await refused_with(
                purerpc.StatusCode.DEADLINE_EXCEEDED,
                service,
                key=KEY,
                call=as_caller("anonymous", 2.0),
            )
            assert trio.current_time() - started == pytest.approx(2.0)
            outbox.gate.set()
    assert message == "deadline exceeded; nothing was stored"


async def test_a_refused_first_call_does_not_consume_its_key() -> None:
    """Invalid, then queue full: each time the key is still free for the corrected call."""
    with trio.fail_after(TIMEOUT_S):
        service = build_service(queue_size=1)
        await refused_with(purerpc.StatusCode.INVALID_ARGUMENT, service, "not-an-address", key=KEY)
        await send(service, "filler@example.com")  # the queue is full now
        full = await send(service, key=KEY)
        assert not full.sent and full.reason == "queue full"
        delivery = await service.accept.queue.next_due()
        assert delivery is not None
        service.accept.queue.finish(delivery)
        accepted = await send(service, key=KEY)
        assert accepted.sent and await send(service, key=KEY) == accepted


async def test_a_key_expires_with_its_window(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(1000):  # the mock clock's seconds
        service = build_service(window_s=60.0)
        first = await send(service, key=KEY)
        await trio.sleep(59.0)
        assert await send(service, key=KEY) == first
        await trio.sleep(1.5)
        later = await send(service, key=KEY)
        assert later.sent and later.message_id != first.message_id
        assert await send(service, key=KEY) == later
        # Past the window, even another payload may use the key again.
        await trio.sleep(61.0)
        assert (await send(service, "new@example.com", key=KEY)).sent


async def test_get_status_by_idempotency_key() -> None:
    with trio.fail_after(TIMEOUT_S):
        service = build_service()
        reply = await send(service, key=KEY, call=as_caller("alpha"))
        status = await service.GetStatus(StatusRequest(idempotency_key=KEY), as_caller("alpha"))
        assert status.message_id == reply.message_id
        with pytest.raises(purerpc.RpcFailedError) as info:
            await service.GetStatus(StatusRequest(idempotency_key=KEY), as_caller("beta"))
        assert info.value.status.status_code == purerpc.StatusCode.NOT_FOUND
        with pytest.raises(purerpc.RpcFailedError) as info:
            both = StatusRequest(message_id=reply.message_id, idempotency_key=KEY)
            await service.GetStatus(both, as_caller("alpha"))
        assert info.value.status.status_code == purerpc.StatusCode.INVALID_ARGUMENT
        assert info.value.status.status_message.startswith("message_id, idempotency_key:")


async def reopened(path: Path) -> tuple[SqliteOutbox, MailerService]:
    """The outbox file opened again, and a new service (its admission loaded) on it."""
    outbox = await SqliteOutbox.open(path)
    service = build_service(outbox, wall_clock=time.time)
    await service.accept.admission.load()
    return outbox, service


async def test_a_repeat_after_a_restart_gets_the_first_reply(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        outbox, service = await reopened(path)
        first = await send(service, key=KEY)
        await outbox.aclose()
        outbox, service = await reopened(path)
        try:
            again = await send(service, key=KEY)
            status = await service.GetStatus(StatusRequest(idempotency_key=KEY))
            unfinished = await outbox.unfinished()
            with pytest.raises(purerpc.RpcFailedError) as info:
                await send(service, "other@example.com", key=KEY)
        finally:
            await outbox.aclose()
    assert again == first and status.message_id == first.message_id
    assert [r.message_id for r in unfinished] == [first.message_id]
    assert info.value.status.status_code == purerpc.StatusCode.FAILED_PRECONDITION


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import trio
    from tests.admission_helpers import build_service, send
    from trio_mailer.store.outbox import SqliteOutbox

    class DyingOutbox(SqliteOutbox):
        async def add(self, record, acceptance=None):
            await super().add(record, acceptance)  # committed: on disk
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the answer never leaves

    async def main(path):
        outbox = await DyingOutbox.open(path)
        service = build_service(outbox, wall_clock=time.time)
        await send(service, key=sys.argv[2])
        print("answered", flush=True)  # never reached

    trio.run(main, Path(sys.argv[1]))
    """
)


async def test_kill_9_between_the_commit_and_the_answer_then_a_retry_makes_one_mail(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    with trio.fail_after(60):
        child = await trio.run_process(
            [sys.executable, "-c", CHILD, str(path), KEY],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            cwd=ROOT,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        assert b"answered" not in child.stdout
        outbox, service = await reopened(path)
        try:
            stored = await outbox.unfinished()
            retry = await send(service, key=KEY)
            after = await outbox.unfinished()
        finally:
            await outbox.aclose()
    assert len(stored) == 1  # the mail was stored, with its key...
    assert retry.sent and retry.message_id == stored[0].message_id  # ...so the retry gets it
    assert after == stored  # and nothing new


async def test_send_takes_an_idempotency_key_too() -> None:
    """Send (template + vars) uses the same rules: a repeat answers, other vars conflict."""
    with trio.fail_after(TIMEOUT_S):
        service = build_service()
        request = SendRequest(
            to="user@example.com", template="password", vars={"code": "1"}, idempotency_key=KEY
        )
        first = await service.Send(request, FakeCall())
        again = await service.Send(request, FakeCall())
        other = SendRequest(
            to="user@example.com", template="password", vars={"code": "2"}, idempotency_key=KEY
        )
        with pytest.raises(purerpc.RpcFailedError) as info:
            await service.Send(other, FakeCall())
    assert first.sent and again == first
    assert info.value.status.status_code == purerpc.StatusCode.FAILED_PRECONDITION
    assert queued(service) == 1
