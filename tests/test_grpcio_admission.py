"""A stock grpcio client uses every field and method the admission work added: the
idempotency_key, retry_after_ms, GetStatus by key, and the MailerAdmin service."""

from __future__ import annotations

import grpc
import pytest
import trio

from tests.fakes.fault_relay import Fault
from trio_mailer.v1.mailer_pb2 import (
    ListSuppressedReply,
    ListSuppressedRequest,
    MailStatus,
    MsgReply,
    MsgRequest,
    RemoveSuppressedReply,
    RemoveSuppressedRequest,
    StatusRequest,
)

from .helpers import DEAD, ON


def session(port: int) -> dict[str, object]:
    """What another team's grpcio service would do, blocking, in one channel."""
    out: dict[str, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        send = channel.unary_unary(
            "/trio_mailer.v1.Mailer/SendPass",
            request_serializer=MsgRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        status = channel.unary_unary(
            "/trio_mailer.v1.Mailer/GetStatus",
            request_serializer=StatusRequest.SerializeToString,
            response_deserializer=MailStatus.FromString,
        )
        out["first"] = send(
            MsgRequest(to="u@example.com", code="1", idempotency_key="k1"), timeout=5
        )
        out["repeat"] = send(
            MsgRequest(to="u@example.com", code="1", idempotency_key="k1"), timeout=5
        )
        out["limited"] = send(MsgRequest(to="U@Example.com", code="2"), timeout=5)
        out["status"] = status(StatusRequest(idempotency_key="k1"), timeout=5)
        try:
            send(MsgRequest(to="u@example.com", code="9", idempotency_key="k1"), timeout=5)
        except grpc.RpcError as exc:
            out["conflict"] = (exc.code(), exc.details())
    return out


def admin(port: int, address: str) -> tuple[ListSuppressedReply, RemoveSuppressedReply]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        listed = channel.unary_unary(
            "/trio_mailer.v1.MailerAdmin/ListSuppressed",
            request_serializer=ListSuppressedRequest.SerializeToString,
            response_deserializer=ListSuppressedReply.FromString,
        )(ListSuppressedRequest(), timeout=5)
        removed = channel.unary_unary(
            "/trio_mailer.v1.MailerAdmin/RemoveSuppressed",
            request_serializer=RemoveSuppressedRequest.SerializeToString,
            response_deserializer=RemoveSuppressedReply.FromString,
        )(RemoveSuppressedRequest(address=address), timeout=5)
    return listed, removed


async def test_grpcio_uses_keys_retry_after_status_by_key_and_the_admin_service(
    start_harness,
) -> None:
    with trio.fail_after(60):
        async with start_harness(env={**ON, "MAILER_RECIPIENT_LIMIT": "1/600"}) as h:
            out = await trio.to_thread.run_sync(session, h.grpc_port)
            await h.wait_finished(1)  # u@example.com's mail has had its RCPT: the fault is not its
            h.relay.add_fault(Fault("RCPT", reply=DEAD))
            reply = await h.stub.SendPass(MsgRequest(to="gone@example.com", code="1"))
            assert reply.sent
            await h.wait_finished(2)
            listed, removed = await trio.to_thread.run_sync(admin, h.grpc_port, "gone@example.com")
    first, repeat, limited = out["first"], out["repeat"], out["limited"]
    assert isinstance(first, MsgReply) and first.sent and repeat == first
    assert isinstance(limited, MsgReply) and limited.reason == "recipient rate limited"
    assert 0 < limited.retry_after_ms <= 600_000  # (exact values: tests/test_rate_limits.py)
    assert isinstance(out["status"], MailStatus) and out["status"].message_id == first.message_id
    code, details = out["conflict"]  # type: ignore[misc]
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("idempotency_key: ")
    assert [(e.address, e.reply_code, e.message_id) for e in listed.addresses] == [
        ("gone@example.com", 550, reply.message_id)
    ]
    assert listed.addresses[0].until.seconds - listed.addresses[0].since.seconds == 604800
    assert removed.removed


@pytest.mark.parametrize("kind", ["SendPass"])
async def test_grpcio_sees_an_invalid_key_as_invalid_argument(start_harness, kind: str) -> None:
    def call(port: int) -> grpc.RpcError:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary(
                f"/trio_mailer.v1.Mailer/{kind}",
                request_serializer=MsgRequest.SerializeToString,
                response_deserializer=MsgReply.FromString,
            )
            try:
                method(MsgRequest(to="u@example.com", code="1", idempotency_key="é"), timeout=5)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("accepted")

    with trio.fail_after(30):
        async with start_harness() as h:
            error = await trio.to_thread.run_sync(call, h.grpc_port)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.details().startswith("idempotency_key: expected printable ASCII")  # type: ignore[attr-defined]
