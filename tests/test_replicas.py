"""Several replicas on one PostgreSQL outbox: each mail once, status anywhere, keys and limits
shared, a replica killed mid-send, the schema's version, a database restart."""

from __future__ import annotations

import collections
import os
import shlex
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from trio_mailer.client import open_channel
from trio_mailer.core.errors import OutboxCorrupt, OutboxError
from trio_mailer.core.mail_lifecycle import MailRecord
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rendering import MailKind
from trio_mailer.store.postgres_outbox import PostgresOutbox, mask_url
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MailStatus, MsgReply, MsgRequest, StatusRequest

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import LISTENING, Service, message_ids, relay_env, start_service, subprocess_env
from .postgres_helpers import fresh_database, server_url

TIMEOUT_S = 120  # three interpreters on a busy machine
LEASE_S = 2


@asynccontextmanager
async def replicas(
    count: int, url: str, relay_port: int, ca_file: Path, tmp_path: Path, **overrides: str
) -> AsyncIterator[list[tuple[Service, int]]]:
    """``count`` ``trio-mailer serve`` processes on the database ``url``; (service, port)."""
    env = subprocess_env(
        **relay_env(
            relay_port,
            ca_file,
            MAILER_OUTBOX=url,
            MAILER_LEASE_S=str(LEASE_S),
            MAILER_RETRY_BASE_S="0.05",
            MAILER_RETRY_MAX_S="0.2",
            MAILER_QUEUE_SIZE="200",
            **overrides,
        )
    )
    async with AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(start_service(["serve"], env, tmp_path))
            for _ in range(count)
        ]  # started together: they meet on the empty database
        ports = [int((await s.read_until(LISTENING)).group(1)) for s in services]
        try:
            yield list(zip(services, ports, strict=True))
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                for n, service in enumerate(services):  # shown when the test fails
                    if service.process.returncode is None:
                        service.process.kill()
                    await service.finish()
                    print(f"---- replica {n} ----\n{service.text}")
            raise


async def call(port: int, to: str, code: str = "123456", key: str = "") -> MsgReply:
    async with open_channel("127.0.0.1", port) as channel:
        reply: MsgReply = await MailerStub(channel).SendPass(
            MsgRequest(to=to, code=code, idempotency_key=key)
        )
        return reply


async def status(port: int, message_id: str) -> MailStatus:
    async with open_channel("127.0.0.1", port) as channel:
        answer: MailStatus = await MailerStub(channel).GetStatus(
            StatusRequest(message_id=message_id)
        )
        return answer


async def wait_delivered(relay: FaultRelay, accepted: list[str]) -> None:
    while not set(accepted) <= set(message_ids(relay)):
        await relay.wait_for_mails(relay.statistics().mails_received + 1)


async def test_three_replicas_share_mail_status_keys_and_limits(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """Mail sent to each of three replicas is delivered once; any replica answers for any
    mail; a key repeated on another replica gets the first reply; the recipient limit counts
    every replica's accepts."""
    relay = FaultRelay(ssl_context=relay_tls)
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with replicas(
                3, url, relay_port, ca_file, tmp_path, MAILER_RECIPIENT_LIMIT="3/600"
            ) as running:
                ports = [port for _, port in running]
                accepted: list[str] = []
                for n in range(30):
                    reply = await call(ports[n % 3], f"user{n}@example.com", f"{n:06d}")
                    assert reply.sent, reply
                    accepted.append(reply.message_id)
                await wait_delivered(relay, accepted)
                for n, message_id in enumerate(accepted[:6]):
                    seen = await status(ports[(n + 1) % 3], message_id)  # another replica
                    assert seen.state == MailStatus.DELIVERED, (n, seen)

                first = await call(ports[0], "keyed@example.com", key="k-1")
                again = await call(ports[1], "keyed@example.com", key="k-1")
                assert first.sent and again == first

                limited = [await call(ports[n % 3], "same@example.com") for n in range(5)]
                assert [r.sent for r in limited] == [True, True, True, False, False]
                assert {r.reason for r in limited[3:]} == {"recipient rate limited"}
                assert all(r.retry_after_ms > 0 for r in limited[3:])
                accepted += [first.message_id] + [r.message_id for r in limited[:3]]
                await wait_delivered(relay, accepted)
                for service, _ in running:
                    service.process.terminate()
                for service, _ in running:
                    assert await service.finish() == 0, service.text
                    assert "Traceback" not in service.text
            nursery.cancel_scope.cancel()
    copies = collections.Counter(message_ids(relay))
    assert set(copies) == set(accepted)
    assert max(copies.values()) == 1, copies.most_common(3)


async def test_kill_9_mid_send_the_others_deliver_within_the_lease(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """One replica is killed while it sends its mail: the other two claim it once its lease
    lapses and deliver it; only the mail the kill caught mid-attempt may arrive twice, and it
    is flagged as a possible duplicate."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("DOT", delay_s=0.05, reply="250 2.0.0 queued", times=-1))
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with replicas(3, url, relay_port, ca_file, tmp_path) as running:
                (victim, victim_port), *others = running
                accepted = []
                for n in range(40):
                    reply = await call(victim_port, f"user{n}@example.com", f"{n:06d}")
                    assert reply.sent
                    accepted.append(reply.message_id)
                await relay.wait_for_mails(3)
                victim.process.kill()
                await victim.finish()
                killed_at = trio.current_time()
                await wait_delivered(relay, accepted)
                took_s = trio.current_time() - killed_at
                copies = collections.Counter(message_ids(relay))
                for message_id, n in copies.items():
                    if n > 1:
                        seen = await status(others[0][1], message_id)
                        assert seen.possible_duplicate, seen
                texts = []
                for service, _ in others:
                    service.process.terminate()
                    assert await service.finish() == 0, service.text
                    texts.append(service.text)
                assert any("claimed" in text for text in texts), texts
            nursery.cancel_scope.cancel()
    assert set(copies) == set(accepted)
    assert sum(1 for n in copies.values() if n > 1) <= 1, copies.most_common(3)
    # The lease, a claim round (half a lease), and the sending itself, with room for load.
    assert took_s < LEASE_S * 10 + 30


async def test_replicas_starting_together_on_an_empty_database_make_one_schema() -> None:
    """Five opens at once: one creates the schema, the others wait for it; all work."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        boxes: list[PostgresOutbox] = []

        async def open_one() -> None:
            boxes.append(await PostgresOutbox.open(url, pool_size=2))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(open_one)
        for n, box in enumerate(boxes):
            await box.add(queued(n))
        assert len(await boxes[0].unfinished()) == 5
        for box in boxes:
            await box.aclose()


async def test_a_newer_schema_is_refused() -> None:
    """A database that a newer trio-mailer migrated: this one refuses to start."""
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        box = await PostgresOutbox.open(url, pool_size=2)
        await box.aclose()
        await trio.to_thread.run_sync(_set_version, url, 99)
        with pytest.raises(OutboxCorrupt, match="schema version 99 is newer"):
            await PostgresOutbox.open(url, pool_size=2)


async def test_a_newer_schema_stops_serve_with_exit_status_2(
    ca_file: Path, free_port: int, tmp_path: Path
) -> None:
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        box = await PostgresOutbox.open(url, pool_size=2)
        await box.aclose()
        await trio.to_thread.run_sync(_set_version, url, 99)
        secret_url = url.replace("://mailer@", "://mailer:s3cret@")
        env = subprocess_env(**relay_env(free_port, ca_file, MAILER_OUTBOX=secret_url))
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "serve"],
            env=env,
            cwd=tmp_path,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "schema version 99 is newer" in stderr
    assert "s3cret" not in stderr and "Traceback" not in stderr


def test_the_password_is_masked() -> None:
    assert mask_url("postgresql://u:pw@h:5/db?sslmode=require") == (
        "postgresql://u:***@h:5/db?sslmode=require"
    )
    assert mask_url("postgres://h/db?user=u&password=pw") == "postgres://h/db?user=u&password=***"


async def test_a_database_restart_loses_nothing_and_the_store_reconnects() -> None:
    """The server restarts under a live outbox: calls fail with OutboxError meanwhile (and the
    store reports itself unreachable), every stored mail is still there, and it works again
    without being reopened."""
    ctl = os.environ.get("MAILER_TEST_POSTGRES_CTL")
    server_url()
    if not ctl:
        pytest.skip("MAILER_TEST_POSTGRES_CTL is not set (.ci/postgres sets it)")
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        box = await PostgresOutbox.open(url, pool_size=3, statement_timeout_s=2.0)
        try:
            for n in range(5):
                await box.add(queued(n))
            await trio.to_thread.run_sync(
                lambda: subprocess.run([*shlex.split(ctl), "-m", "fast", "-w", "stop"], check=True)
            )
            try:
                with pytest.raises(OutboxError):
                    await box.add(queued(5))
                assert not box.reachable()
            finally:
                await trio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [
                            *shlex.split(ctl),
                            "-w",
                            "-o",
                            os.environ["MAILER_TEST_POSTGRES_OPTIONS"],
                            "start",
                        ],
                        check=True,
                    )
                )
            for n in range(6, 9):
                while True:
                    try:
                        await box.add(queued(n))
                        break
                    except OutboxError:
                        await trio.sleep(0.2)
            assert box.reachable()
            stored = {r.message_id for r in await box.unfinished()}
            assert {f"<{n}@x.example>" for n in (0, 1, 2, 3, 4, 6, 7, 8)} <= stored
        finally:
            await box.aclose()


def _set_version(url: str, version: int) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO trio_mailer_schema (version) VALUES (%s)", (version,))


def queued(n: int) -> MailRecord:
    mail = OutgoingMail(
        message_id=f"<{n}@x.example>",
        kind=MailKind.PASSWORD,
        envelope_from="mailer@x.example",
        envelope_to=f"user{n}@y.example",
        data=f"Subject: code\r\n\r\ncode {n:06d}\r\n".encode(),
    )
    return MailRecord.accepted(mail, 1_790_000_000.0 + n)


async def test_watch_status_on_one_replica_follows_a_mail_another_sends(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """A WatchStatus stream on replica B sees the changes replica A stores for its mail, woken
    by NOTIFY (the stream does not poll), and ends at DELIVERED."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("DOT", delay_s=2.0, reply="250 2.0.0 queued", times=1))
    with fresh_database() as url, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with replicas(2, url, relay_port, ca_file, tmp_path) as running:
                (_, port_a), (_, port_b) = running
                reply = await call(port_a, "watched@example.com")
                assert reply.sent
                seen = []
                async with open_channel("127.0.0.1", port_b) as channel:
                    stream = MailerStub(channel).WatchStatus(
                        StatusRequest(message_id=reply.message_id)
                    )
                    async for change in stream:
                        seen.append(change.state)
                for service, _ in running:
                    service.process.terminate()
                    assert await service.finish() == 0, service.text
            nursery.cancel_scope.cancel()
    assert seen[0] != MailStatus.DELIVERED, seen
    assert seen[-1] == MailStatus.DELIVERED, seen
