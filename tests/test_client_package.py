"""trio_mailer_client against the real service: send, status, watch, restart, deadline, cancel."""

from __future__ import annotations

import re
import ssl
from contextlib import aclosing
from pathlib import Path

import grpc
import pytest
import trio

import trio_mailer_client
from trio_mailer_client import Accepted, MailerError, MailState, Refused
from trio_mailer_client._bridge import await_future
from trio_mailer_client._generated import mailer_pb2

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import relay_and_service, running_service, silent_server

ROOT = Path(__file__).resolve().parent.parent


def test_policy_is_shared_with_the_cli() -> None:
    """The CLI's retry rules are the client package's, the same text."""
    assert (ROOT / "trio_mailer/core/call_policy.py").read_text() == (
        ROOT / "client/trio_mailer_client/_policy.py"
    ).read_text(), "copy client/trio_mailer_client/_policy.py to trio_mailer/core/call_policy.py"


async def test_send_status_and_watch_against_the_service(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """send_pass is accepted, the relay gets it, status takes the id without brackets, watch
    follows it to DELIVERED with the timestamps."""
    with trio.fail_after(60):
        async with relay_and_service(relay_tls, ca_file, tmp_path) as (relay, _service, port):
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                result = await mailer.send_pass("user@example.com", "424242")
                assert isinstance(result, Accepted)
                assert result.message_id.startswith("<")
                assert len(result.idempotency_key) >= 16
                async with aclosing(mailer.watch(result.message_id)) as changes:
                    states = [status.state async for status in changes]
                assert states[-1] is MailState.DELIVERED
                await relay.wait_for_mails(1)
                status = await mailer.status(result.message_id.strip("<>"))
                assert status.state is MailState.DELIVERED
                assert status.accepted_at is not None and status.finished_at is not None
                assert status.accepted_at <= status.finished_at
                retrieve = await mailer.send_retrieve("user@example.com", "1")
                assert retrieve.sent
                await relay.wait_for_mails(2)
    assert b"424242" in relay.received[0].data


async def test_send_takes_a_template_and_every_send_a_locale(start_harness) -> None:
    """send(to, template, vars, locale=...) is the service's Send; send_pass and send_retrieve
    take locale= too: the relay gets each mail in the language asked for (or its fallback)."""
    with trio.fail_after(60):
        async with start_harness() as h:
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{h.grpc_port}") as mailer:
                results = [
                    await mailer.send("user@example.com", "password", {"code": "1"}, locale="ru"),
                    await mailer.send_pass("user@example.com", "2", locale="ru"),
                    await mailer.send_retrieve("user@example.com", "3", locale="pt-BR"),
                    await mailer.send("user@example.com", "retrieve", {"code": "4"}),
                ]
                with pytest.raises(MailerError) as info:
                    await mailer.send("user@example.com", "password", {"name": "x"})
                await h.relay.wait_for_mails(4)
    assert all(isinstance(result, Accepted) for result in results)
    languages = [
        re.search(rb"Content-Language: (\S+)", mail.data).group(1)  # type: ignore[union-attr]
        for mail in h.relay.received
    ]
    assert languages == [b"ru", b"ru", b"en", b"en"]
    assert (info.value.code, info.value.details) == (
        "INVALID_ARGUMENT",
        "vars.name: template 'password' does not take this variable (it requires: code)",
    )


async def test_errors_carry_the_grpc_status(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """INVALID_ARGUMENT names the field and is not retried; NOT_FOUND for an unknown id."""
    with trio.fail_after(60):
        async with relay_and_service(relay_tls, ca_file, tmp_path) as (_relay, _service, port):
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                with pytest.raises(MailerError) as info:
                    await mailer.send_pass("a@example.com, b@example.com", "1")
                assert (info.value.code, info.value.attempts) == ("INVALID_ARGUMENT", 1)
                assert info.value.details == "to: expected one address, got a list of 2"
                with pytest.raises(MailerError) as missing:
                    await mailer.status("nobody@example.com")
                assert missing.value.code == "NOT_FOUND"


async def test_the_client_waits_out_a_restart_and_the_relay_gets_one_mail(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """The service goes away and comes back on the same port while a send is retrying: the
    same channel reconnects, the call succeeds within its timeout, and one mail goes out."""
    relay = FaultRelay(ssl_context=relay_tls)
    outbox = str(tmp_path / "outbox.sqlite3")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with running_service(relay_port, ca_file, tmp_path, MAILER_OUTBOX=outbox) as (
                first,
                port,
            ):
                async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                    assert (await mailer.send_pass("before@example.com", "1")).sent
                    first.process.kill()
                    await first.process.wait()
                    results: list[trio_mailer_client.SendResult] = []

                    async def send_during_restart() -> None:
                        results.append(
                            await mailer.send_pass("during@example.com", "2", timeout=30)
                        )

                    nursery.start_soon(send_during_restart)
                    await trio.sleep(1.0)  # the send is failing with UNAVAILABLE, retrying
                    assert results == []
                    async with running_service(
                        relay_port,
                        ca_file,
                        tmp_path,
                        MAILER_OUTBOX=outbox,
                        MAILER_SERVE_PORT=str(port),
                    ):
                        while not results:  # noqa: ASYNC110 (set by another task, no event to wait on)
                            await trio.sleep(0.05)
                        await relay.wait_for_mails(2)
            nursery.cancel_scope.cancel()
    [result] = results
    assert result.sent
    assert sorted(mail.rcpt_to[0] for mail in relay.received) == [
        "before@example.com",
        "during@example.com",
    ]


async def test_a_repeat_with_the_same_key_after_a_restart_sends_nothing_new(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """The caller's retry with the key of an accepted send, after a restart: the first reply
    comes back and the relay gets one mail."""
    relay = FaultRelay(ssl_context=relay_tls)
    outbox = str(tmp_path / "outbox.sqlite3")
    key = trio_mailer_client.new_idempotency_key()
    replies = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            for _ in range(2):
                async with running_service(relay_port, ca_file, tmp_path, MAILER_OUTBOX=outbox) as (
                    _service,
                    port,
                ):
                    async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                        replies.append(
                            await mailer.send_pass("user@example.com", "7", idempotency_key=key)
                        )
                        await relay.wait_for_mails(1)
            nursery.cancel_scope.cancel()
    assert replies[0] == replies[1]
    assert len(relay.received) == 1


async def test_a_silent_service_ends_in_deadline_exceeded_within_the_timeout() -> None:
    """No answer: the call ends with DEADLINE_EXCEEDED after its timeout, not a hang."""
    with trio.fail_after(30):
        async with silent_server() as port:
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                start = trio.current_time()
                with pytest.raises(MailerError) as info:
                    await mailer.send_pass("user@example.com", "1", timeout=1.0)
                elapsed = trio.current_time() - start
    assert info.value.code in {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert 0.9 <= elapsed < 10


async def test_an_unreachable_service_is_retried_then_unavailable(free_port: int) -> None:
    """Connection refused: several attempts with backoff, then UNAVAILABLE within the timeout."""
    with trio.fail_after(30):
        async with trio_mailer_client.open_mailer(f"127.0.0.1:{free_port}") as mailer:
            with pytest.raises(MailerError) as info:
                await mailer.send_pass("user@example.com", "1", timeout=1.5)
    assert info.value.code == "UNAVAILABLE"
    assert info.value.attempts >= 3


async def test_cancelling_the_trio_task_cancels_the_grpc_call() -> None:
    """A cancelled await leaves no call running: the grpcio future is cancelled."""
    with trio.fail_after(30):
        async with silent_server() as port:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                method = channel.unary_unary(
                    "/trio_mailer.v1.Mailer/SendPass",
                    request_serializer=mailer_pb2.MsgRequest.SerializeToString,
                    response_deserializer=mailer_pb2.MsgReply.FromString,
                )
                future = method.future(mailer_pb2.MsgRequest(to="a@example.com"), timeout=20)
                with trio.move_on_after(0.5) as scope:
                    await await_future(future)
                assert scope.cancelled_caught
                assert future.cancelled()


async def test_cancelling_a_watch_is_seen_by_the_service(start_harness) -> None:
    """The service's WatchStatus handler goes away when the watching Trio task is cancelled."""
    with trio.fail_after(30):
        async with start_harness() as h:
            h.relay.add_fault(Fault("DOT", delay_s=20, times=1))
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{h.grpc_port}") as mailer:
                result = await mailer.send_pass("user@example.com", "1")
                assert isinstance(result, Accepted)
                seen: list[MailState] = []
                first = trio.Event()
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        async with aclosing(mailer.watch(result.message_id)) as changes:
                            async for status in changes:
                                seen.append(status.state)
                                first.set()

                    nursery.start_soon(watch)
                    await first.wait()
                    while h.app.board.watchers() == 0:  # noqa: ASYNC110 (the service's counter)
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
                while h.app.board.watchers() != 0:  # noqa: ASYNC110 (the service's counter)
                    await trio.sleep(0.01)
            h.app.request_shutdown(force=True)
    assert seen and seen[0] in {MailState.QUEUED, MailState.SENDING}


async def test_queue_full_is_a_refusal_not_an_error(start_harness) -> None:
    """A full queue answers Refused("queue full") with retry advice."""
    with trio.fail_after(30):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "1"}) as h:
            h.relay.add_fault(Fault("DOT", delay_s=20, times=-1))
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{h.grpc_port}") as mailer:
                results = [await mailer.send_pass(f"u{n}@example.com", "1") for n in range(4)]
            h.app.request_shutdown(force=True)
    refused = [r for r in results if isinstance(r, Refused)]
    assert refused and refused[0].reason == "queue full"
    assert refused[0].retry_after is not None and refused[0].retry_after > 0
