"""The shared outbox's faults: the network to the database stalls, the database goes down under
a running service, and a replica's lease is taken while it was cut off.

Run under ``.ci/postgres`` (the tests skip without a server, and fail in CI). Real clock: the
store calls psycopg in worker threads (STYLE 12).
"""

from __future__ import annotations

import collections
import os
import shlex
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import purerpc
import pytest
import trio

from trio_mailer.client import Target, check_health, open_channel
from trio_mailer.core.errors import OutboxConflict, OutboxError, exception_leaves
from trio_mailer.core.mail_lifecycle import MailRecord, MailState, StatusChange
from trio_mailer.core.message import OutgoingMail
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.delivery.sender import FinishedMail
from trio_mailer.delivery.smtp_session import Delivered, Reply
from trio_mailer.store import psycopg_internals
from trio_mailer.store.postgres_outbox import LEASE_LOST, PostgresOutbox
from trio_mailer.store.status_board import StatusBoard
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import message_ids, queued, running_service
from .postgres_helpers import StallingProxy, fresh_database, server_port, via_port
from .sender_helpers import build_sender

TIMEOUT_S = 120  # generous: a busy machine, subprocesses, a database restart
DB_TIMEOUT_S = 1.0  # MAILER_DB_TIMEOUT_S in these tests
# A call on a stalled network: a statement's wait (timeout + grace), and perhaps the wait for a
# pooled connection and another statement's; then room for a loaded machine. A hang is forever.
STALLED_CALL_BOUND_S = 4 * (DB_TIMEOUT_S + 1.0) + 10
GREYLISTED = "451 4.7.1 greylisted, try again later"


def test_the_private_parts_of_psycopg_used_are_still_there() -> None:
    """The canary: when a psycopg upgrade moves what psycopg_internals uses, this names it."""
    for owner, name, what in psycopg_internals.PRIVATE_NAMES:
        assert hasattr(owner, name), f"psycopg moved {name} ({what}): adapt psycopg_internals"
    assert psycopg_internals.wait_takes_a_timeout(), "psycopg.Connection.wait lost its timeout"


async def test_a_stalled_network_fails_calls_within_the_timeout_and_the_store_recovers() -> None:
    """The proxy to the database freezes (nothing forwarded, nothing closed): calls raise
    OutboxError within the bound instead of hanging, the store says unreachable, nothing stored
    is lost; when the proxy resumes the store works again without being reopened."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        proxy = StallingProxy(server_port(url))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            box = await PostgresOutbox.open(
                via_port(url, port),
                pool_size=3,
                statement_timeout_s=DB_TIMEOUT_S,
                connect_timeout_s=DB_TIMEOUT_S,
            )
            try:
                await nursery.start(box.run, lambda message_id: None)  # no watchers
                for n in range(3):
                    await box.add(queued(n))
                proxy.freeze()
                for call in (lambda: box.add(queued(3)), box.unfinished):
                    started = trio.current_time()
                    with pytest.raises(OutboxError):
                        await call()
                    assert trio.current_time() - started < STALLED_CALL_BOUND_S
                    assert not box.reachable()
                proxy.resume()
                while not box.reachable():  # noqa: ASYNC110 (the probe's flag; no call from anyone)
                    await trio.sleep(0.1)
                await box.add(queued(4))
                stored = {r.message_id for r in await box.unfinished()}
                assert {queued(n).message_id for n in (0, 1, 2, 4)} <= stored
            finally:
                with trio.CancelScope(shield=True):
                    await box.aclose()
            nursery.cancel_scope.cancel()


async def send(port: int, to: str) -> MsgReply:
    async with open_channel("127.0.0.1", port) as channel:
        reply: MsgReply = await MailerStub(channel).SendPass(MsgRequest(to=to, code="123456"))
        return reply


async def refusal(port: int, to: str) -> str:
    """The gRPC status a Send is refused with ("" when it is accepted)."""
    refused = ""
    try:
        await send(port, to)
    except* purerpc.RpcFailedError as group:
        [error] = exception_leaves(group)
        refused = str(error.status.status_code.name)
    return refused


async def health(port: int) -> str:
    return await check_health(Target("127.0.0.1", port, timeout_s=30))


async def wait_for_health(port: int, status: str) -> None:
    while await health(port) != status:  # noqa: ASYNC110 (another process)
        await trio.sleep(0.2)


async def wait_delivered(relay: FaultRelay, accepted: list[str]) -> None:
    while not set(accepted) <= set(message_ids(relay)):
        await relay.wait_for_mails(relay.statistics().mails_received + 1)


@attrs.define
class Outage:
    """How a test cuts the service off its database, and brings it back."""

    url: str  # what the service is given as MAILER_OUTBOX
    cut: Callable[[], Awaitable[None]]
    restore: Callable[[], Awaitable[None]]


async def run_an_outage(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path, outage: Outage
) -> None:
    """A `trio-mailer serve` on the database; five mails accepted and waiting for retries
    (greylisted); the database cut off: health turns NOT_SERVING, a Send gets UNAVAILABLE within
    the bound, and no waiting mail is sent (its attempt cannot be stored); the database back:
    SERVING again by itself, every accepted mail delivered exactly once."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("RCPT", reply=GREYLISTED, times=-1))
    env = {
        "MAILER_OUTBOX": outage.url,
        "MAILER_DB_TIMEOUT_S": str(DB_TIMEOUT_S),
        "MAILER_LEASE_S": "3",
        "MAILER_RETRY_BASE_S": "0.05",
        "MAILER_RETRY_MAX_S": "0.5",
        "MAILER_HEALTH_DOWN_AFTER_S": "600",  # the relay's health is not what is tested
    }
    async with trio.open_nursery() as nursery:
        relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
        async with running_service(relay_port, ca_file, tmp_path, **env) as (service, port):
            try:
                accepted = [(await send(port, f"user{n}@example.com")).message_id for n in range(5)]
                # Each mail refused, and retried (the relay has no event for its commands).
                while sum(verb == "RCPT" for _, verb in relay.commands) < 10:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                await wait_for_health(port, "SERVING")

                await outage.cut()
                try:
                    # An attempt that stored SENDING just before finishes (refused: greylisted).
                    await trio.sleep(2 * DB_TIMEOUT_S + 3)
                    relay.faults.clear()  # the relay takes mail; only the outbox holds it back
                    await wait_for_health(port, "NOT_SERVING")
                    started = trio.current_time()
                    assert await refusal(port, "refused@example.com") == "UNAVAILABLE"
                    assert trio.current_time() - started < STALLED_CALL_BOUND_S
                    await trio.sleep(3)  # retries come due meanwhile (every 0.5 s at most)
                    assert message_ids(relay) == [], "sent while its attempt was not stored"
                finally:
                    with trio.CancelScope(shield=True):
                        await outage.restore()  # the next tests need the server
                await wait_for_health(port, "SERVING")
                accepted.append((await send(port, "after@example.com")).message_id)
                await wait_delivered(relay, accepted)
                await trio.sleep(1)  # a duplicate would come now
                service.process.terminate()
                assert await service.finish() == 0, service.text
                assert "Traceback" not in service.text, service.text
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    service.process.kill()
                    await service.finish()
                    print(service.text)  # shown when the test fails
                raise
        nursery.cancel_scope.cancel()
    copies = collections.Counter(message_ids(relay))
    assert set(copies) == set(accepted)
    assert max(copies.values()) == 1, copies


async def test_a_service_whose_database_network_stalls_refuses_calls_and_recovers(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """The stalled network at the app level, through a proxy that freezes."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        proxy = StallingProxy(server_port(url))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)

            async def freeze() -> None:
                proxy.freeze()

            async def resume() -> None:
                proxy.resume()

            await run_an_outage(
                relay_tls, ca_file, tmp_path, Outage(via_port(url, port), freeze, resume)
            )
            nursery.cancel_scope.cancel()


async def test_a_service_whose_database_stops_is_not_serving_until_it_is_back(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """The PostgreSQL server stops under a running service and starts again."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        ctl = os.environ.get("MAILER_TEST_POSTGRES_CTL")
        if not ctl:
            pytest.skip("MAILER_TEST_POSTGRES_CTL is not set (.ci/postgres sets it)")
        options = os.environ["MAILER_TEST_POSTGRES_OPTIONS"]

        async def stop() -> None:
            await trio.run_process([*shlex.split(ctl), "-m", "fast", "-w", "stop"])

        async def start() -> None:
            await trio.run_process(
                [*shlex.split(ctl), "-w", "-o", options, "start"], stdout=subprocess.DEVNULL
            )

        await run_an_outage(relay_tls, ca_file, tmp_path, Outage(url, stop, start))


@attrs.define
class Relay:
    """An in-trio relay session: every mail it is sent."""

    sent: list[str] = attrs.Factory(list)

    async def connect(self) -> Relay:
        await trio.lowlevel.checkpoint()
        return self

    async def send(self, mail: OutgoingMail) -> Delivered:
        await trio.lowlevel.checkpoint()
        self.sent.append(mail.message_id)
        return Delivered(Reply(250, "ok"))

    async def probe(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def reset(self) -> bool:
        return True

    async def close(self, *, quit: bool) -> None:
        await trio.lowlevel.checkpoint()


async def deliver(box: PostgresOutbox, relay: Relay, record: MailRecord) -> list[FinishedMail]:
    """Run a sender on ``box`` for ``record`` until it has no more work."""
    board = StatusBoard()
    board.track(record)
    finished: list[FinishedMail] = []
    sender = build_sender(relay.connect, board=board, outbox=box, on_finished=finished.append)
    queue = MailQueue.open(capacity=1, retry_capacity=1)
    queue.put_nowait(record.to_mail())
    queue.close()
    await sender.run(queue)
    return finished


async def test_a_replica_whose_lease_was_taken_does_not_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replica A accepts a mail and is then cut off past its lease; replica B claims it. When A
    comes back to send it, storing SENDING fails (the lease is lost), so A does not send; B
    delivers it, once."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        a = await PostgresOutbox.open(url, pool_size=2, lease_s=0.5)
        b = await PostgresOutbox.open(url, pool_size=2, lease_s=30)
        try:
            record = queued(1)
            await a.add(record)
            await trio.sleep(1.5)  # A renews nothing (its run is not started): the lease lapses
            assert await a.claim() == []  # its own mail is in its memory: never claimed twice
            [claimed] = await b.claim()
            assert claimed.message_id == record.message_id

            change = StatusChange(record.message_id, MailState.SENDING, 1, None, "", 1.0)
            with pytest.raises(OutboxConflict, match="lease on it lapsed"):
                await a.record(change)  # the store's own answer, without a sender
            relay = Relay()
            assert await deliver(a, relay, record) == []
            assert relay.sent == []
            assert "not sending" in caplog.text and LEASE_LOST in caplog.text

            finished = await deliver(b, relay, claimed)
            assert [f.outcome for f in finished] == ["delivered"]
            assert relay.sent == [record.message_id]
            stored = await b.get(record.message_id)
            assert stored is not None
            assert (stored.state, stored.attempts) == (MailState.DELIVERED, 1)
        finally:
            await a.aclose()
            await b.aclose()


async def test_a_lapsed_lease_nobody_took_is_still_this_replicas() -> None:
    """Cut off past its lease with no other replica taking the mail: the attempt is stored
    (the row is still this replica's) and the mail is sent, once."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        a = await PostgresOutbox.open(url, pool_size=2, lease_s=0.5)
        try:
            record = queued(2)
            await a.add(record)
            await trio.sleep(1.0)
            relay = Relay()
            finished = await deliver(a, relay, record)
            assert [f.outcome for f in finished] == ["delivered"]
            assert relay.sent == [record.message_id]
        finally:
            await a.aclose()


async def test_a_version_1_database_is_migrated_to_the_owner_check() -> None:
    """A database a version-1 trio-mailer made: opening it applies migration 2, after which a
    change to a row another replica holds is refused as a lost lease."""
    import psycopg

    from trio_mailer.store.postgres_schema import MIGRATIONS

    def make_version_1(url: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE trio_mailer_schema (version integer NOT NULL)")
            conn.execute(MIGRATIONS[0])
            conn.execute("INSERT INTO trio_mailer_schema (version) VALUES (1)")

    def take_over(url: str, message_id: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE mail SET owner = 'another', lease_until = lease_until + 3600 "
                "WHERE message_id = %s",
                (message_id,),
            )
            row = conn.execute("SELECT max(version) FROM trio_mailer_schema").fetchone()
            assert row is not None
            return int(row[0])

    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        await trio.to_thread.run_sync(make_version_1, url)
        box = await PostgresOutbox.open(url, pool_size=2)
        try:
            record = queued(3)
            await box.add(record)
            assert await trio.to_thread.run_sync(take_over, url, record.message_id) == len(
                MIGRATIONS
            )
            change = StatusChange(record.message_id, MailState.SENDING, 1, None, "", 1.0)
            with pytest.raises(OutboxConflict, match="lease on it lapsed"):
                await box.record(change)
        finally:
            await box.aclose()
