"""A stock grpcio client talks to the purerpc server: success, queue-full and error statuses."""

from __future__ import annotations

import grpc
import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .conftest import Harness


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
    """During shutdown a grpcio client is told UNAVAILABLE (retryable), not a crash."""
    with trio.fail_after(20):
        async with start_harness() as h:
            h.app.request_shutdown()
            with pytest.raises(grpc.RpcError) as info:
                await call(h, "SendPass", "user@example.com", "1")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unknown_method_is_unimplemented(start_harness) -> None:
    """A method the service does not have answers UNIMPLEMENTED."""
    with trio.fail_after(20):
        async with start_harness() as h:
            with pytest.raises(grpc.RpcError) as info:
                await call(h, "SendNothing", "user@example.com", "1")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
