"""Health and reflection on the real service: the status follows the relay, and the drain."""

from __future__ import annotations

import trio

from .fakes.fault_relay import Fault
from .helpers import FAST, send_pass
from .std_services import open_client, run_client

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
    """A relay that refuses our password: the start-up relay check keeps health NOT_SERVING
    (issue 10, item 10), while mail is still accepted and stored."""
    env = {**FAST, "MAILER_USER": "bot", "MAILER_PASSWORD": "wrong"}
    with trio.fail_after(30):
        async with start_harness(env=env, credentials=("bot", "right")) as h:
            async with open_client(str(h.grpc_port), "watch", MAILER) as watch:
                assert await watch.next_line() == {"status": "NOT_SERVING"}
                assert await send_pass(h)  # accepted meanwhile
                await watch.send("cancel")
            [after] = await run_client(str(h.grpc_port), "check", MAILER)
            assert after == {"service": MAILER, "status": "NOT_SERVING"}


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


async def test_a_relay_host_that_does_not_resolve_keeps_health_not_serving(caplog) -> None:
    """Issue 10 item 10: a typo in MAILER_REMOTE_HOST is noticed at start-up: ERROR with the
    reason, NOT_SERVING, and SERVING once a session succeeds."""
    import logging

    from trio_mailer.app import MailerApp
    from trio_mailer.core.config import Config, shipped_templates_dir
    from trio_mailer.core.rendering import MailTemplates
    from trio_mailer.delivery.smtp_session import ConnectFailed
    from trio_mailer.grpc.health_service import ServingStatus
    from trio_mailer.store.outbox import MemoryOutbox

    caplog.set_level(logging.INFO, "trio_mailer")
    resolvable = False

    class Session:
        relay = "smtp.example.com:465"

        async def close(self, *, quit: bool) -> None:
            await trio.lowlevel.checkpoint()

    async def connect() -> Session:
        await trio.lowlevel.checkpoint()
        if not resolvable:
            raise ConnectFailed("cannot connect to smtp.exmaple.com:465: Name or service not known")
        return Session()

    config = Config(
        relay_host="smtp.exmaple.com",
        relay_port=465,
        mail_from="noreply@example.com",
        retry_base_s=0.05,
        retry_max_s=0.1,
    )
    app = MailerApp(config, MailTemplates.load(shipped_templates_dir()), connect)  # type: ignore[arg-type]
    app.build_use_cases(MemoryOutbox())  # what run does once the outbox is open
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app._check_relay)
            await app.relay_checked.wait()
            app._update_health()
            assert app.health.get(MAILER) is ServingStatus.NOT_SERVING
            resolvable = True  # the check, retried with the backoff, now succeeds and returns
        assert app.relay_verified
        assert app.health.get(MAILER) is ServingStatus.SERVING
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage().startswith(
        "relay check failed: cannot connect to smtp.exmaple.com:465: Name or service not known"
    )
