"""A stock grpcio client talks to the purerpc server: success, queue-full and error statuses."""

from __future__ import annotations

import grpc
import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .helpers import Harness


def grpcio_call(port: int, method: str, request: MsgRequest) -> MsgReply:
    """One blocking grpcio unary call, as another team's service would make it."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"/trio_mailer.v1.Mailer/{method}",
            request_serializer=MsgRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        reply: MsgReply = call(request, timeout=5)
        return reply


async def call(h: Harness, method: str, to: str, code: str) -> MsgReply:
    return await trio.to_thread.run_sync(
        grpcio_call, h.grpc_port, method, MsgRequest(to=to, code=code)
    )


async def test_grpcio_client_gets_a_message_id_and_the_mail_arrives(start_harness) -> None:
    """SendPass and SendRetrieve over grpcio: sent=true, and both mails reach the relay."""
    with trio.fail_after(20):
        async with start_harness() as h:
            first = await call(h, "SendPass", "user@example.com", "1")
            second = await call(h, "SendRetrieve", "user@example.com", "2")
            assert first.sent and second.sent
            assert first.message_id.startswith("<") and first.message_id.endswith(">")
            await h.relay.wait_for_mails(2)
            assert len(h.relay.received) == 2


async def test_grpcio_client_sees_invalid_argument_with_the_field(start_harness) -> None:
    """A bad field reaches a grpcio client as INVALID_ARGUMENT with a readable detail."""
    with trio.fail_after(20):
        async with start_harness() as h:
            with pytest.raises(grpc.RpcError) as info:
                await call(h, "SendPass", "a@example.com, b@example.com", "1")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "to: expected one address, got a list of 2"


async def test_grpcio_client_sees_unavailable_while_draining(start_harness) -> None:
    """During shutdown a grpcio client's calls are served until the drain has closed the port
    (a call on its way is answered: issue 22), then told UNAVAILABLE (retryable), never
    another error or a crash."""
    with trio.fail_after(20):
        async with start_harness() as h:
            h.app.request_shutdown()
            for _ in range(200):  # each a connection of its own: bounded by the drain
                try:
                    reply = await call(h, "SendPass", "user@example.com", "1")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    break
                assert reply.sent, reply
            else:
                raise AssertionError("the drain never closed the port")


async def test_unknown_method_is_unimplemented(start_harness) -> None:
    """A method the service does not have answers UNIMPLEMENTED."""
    with trio.fail_after(20):
        async with start_harness() as h:
            with pytest.raises(grpc.RpcError) as info:
                await call(h, "SendNothing", "user@example.com", "1")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _call_on(channel: grpc.Channel, code: str) -> MsgReply:
    call = channel.unary_unary(
        "/trio_mailer.v1.Mailer/SendPass",
        request_serializer=MsgRequest.SerializeToString,
        response_deserializer=MsgReply.FromString,
    )
    reply: MsgReply = call(MsgRequest(to="user@example.com", code=code), timeout=5)
    return reply


def oversized_between_good_calls(port: int) -> tuple[MsgReply, grpc.StatusCode, MsgReply]:
    """A good client, then a client sending 100 KiB, then the good client again."""
    own_pool = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=own_pool) as good:
        before = _call_on(good, "1")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=own_pool) as bad:
            try:
                _call_on(bad, "x" * 100_000)
            except grpc.RpcError as exc:
                status = exc.code()
            else:
                raise AssertionError("an oversized request was accepted")
        after = _call_on(good, "2")
    return before, status, after


async def test_oversized_request_is_refused_without_hurting_other_clients(
    start_harness, caplog
) -> None:
    """100 KiB (limit 4 KiB): RESOURCE_EXHAUSTED on that call; other clients keep working."""
    with trio.fail_after(20):
        async with start_harness(env={"MAILER_QUEUE_SIZE": "5"}) as h:
            before, status, after = await trio.to_thread.run_sync(
                oversized_between_good_calls, h.grpc_port
            )
            await h.relay.wait_for_mails(2)
    assert before.sent and after.sent
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(h.relay.received) == 2  # nothing from the oversized request
