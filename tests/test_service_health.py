"""Health and reflection on the real service: the status follows the relay, and the drain."""

from __future__ import annotations

import trio

from trio_mailer.dev.capture_relay import Fault

from .std_services import open_client, run_client
from .test_faults import FAST, send_pass

MAILER = "trio_mailer.v1.Mailer"


async def test_watch_sees_the_relay_go_down_and_come_back(start_harness) -> None:
    """SERVING with a session; NOT_SERVING once the relay has been unreachable past the
    threshold; SERVING again when it is back; NOT_SERVING from the first moment of the drain."""
    env = {**FAST, "MAILER_HEALTH_DOWN_AFTER_S": "0.3", "MAILER_SHUTDOWN_GRACE_S": "5"}
    with trio.fail_after(30):
        async with start_harness(env=env) as h:
            await send_pass(h, code="1")
            await h.wait_finished(1)
            async with open_client(str(h.grpc_port), "watch", MAILER) as watch:
                assert await watch.next_line() == {"status": "SERVING"}
                # The relay stops answering: every new connection gets 554 at the greeting.
                h.relay.add_fault(Fault("GREETING", reply="554 5.3.2 not now", times=-1))
                await h.relay.drop_sessions()
                await send_pass(h, code="2")
                assert await watch.next_line() == {"status": "NOT_SERVING"}
                [check] = await run_client(str(h.grpc_port), "check", "")
                assert check == {"service": "", "status": "NOT_SERVING"}
                h.relay.faults.clear()  # back
                assert await watch.next_line() == {"status": "SERVING"}
                finished = await h.wait_finished(2)
                assert finished[1].delivered
                h.app.request_shutdown()
                assert await watch.next_line() == {"status": "NOT_SERVING"}
                await watch.send("cancel")


async def test_bad_credentials_are_not_serving(start_harness) -> None:
    """A relay that refuses our password: NOT_SERVING at once (no threshold to wait for)."""
    env = {**FAST, "MAILER_USER": "bot", "MAILER_PASSWORD": "wrong"}
    with trio.fail_after(30):
        async with start_harness(env=env, credentials=("bot", "right")) as h:
            [before] = await run_client(str(h.grpc_port), "check", MAILER)
            assert before == {"service": MAILER, "status": "SERVING"}
            async with open_client(str(h.grpc_port), "watch", MAILER) as watch:
                assert await watch.next_line() == {"status": "SERVING"}
                await send_pass(h)
                assert await watch.next_line() == {"status": "NOT_SERVING"}
                await watch.send("cancel")


async def test_reflection_lists_the_services_of_the_running_service(start_harness) -> None:
    """grpcurl-style discovery works against the real service, with no .proto at hand."""
    with trio.fail_after(30):
        async with start_harness() as h:
            [reflected] = await run_client(str(h.grpc_port), "reflect")
    assert set(reflected["services"]) == {
        MAILER,
        "trio_mailer.v1.MailerAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert reflected["send_pass_input"] == "trio_mailer.v1.MsgRequest"
    assert reflected["send_pass_output"] == "trio_mailer.v1.MsgReply"
