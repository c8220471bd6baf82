"""grpc.health.v1.Health: HealthState on its own, then the service against the stock client."""

from __future__ import annotations

import base64

import pytest
import trio
import trio.testing
from google.protobuf import descriptor_pb2

from trio_mailer.grpc.health_service import HealthState, HealthStatistics, ServingStatus
from trio_mailer.grpc_std.health.v1 import health_pb2

from .std_services import MAILER, open_client, open_std_server, run_client, wait_until

SERVING = ServingStatus.SERVING
NOT_SERVING = ServingStatus.NOT_SERVING
UNKNOWN = ServingStatus.UNKNOWN
SERVICE_UNKNOWN = ServingStatus.SERVICE_UNKNOWN


# ---- HealthState ----


def test_the_whole_server_is_always_known() -> None:
    """ "" is known even when no service is named; other names are not."""
    state = HealthState([])
    assert state.get("") is NOT_SERVING
    assert state.get(MAILER) is None
    assert state.snapshot() == {"": NOT_SERVING}


def test_named_services_start_with_the_initial_status() -> None:
    state = HealthState([MAILER, "b"], initial=SERVING)
    assert state.snapshot() == {"": SERVING, MAILER: SERVING, "b": SERVING}


def test_set_without_a_service_sets_every_known_service() -> None:
    state = HealthState([MAILER])
    state.set(SERVING)
    assert state.snapshot() == {"": SERVING, MAILER: SERVING}


def test_set_one_service_leaves_the_others() -> None:
    state = HealthState([MAILER])
    state.set(SERVING, "")
    assert state.snapshot() == {"": SERVING, MAILER: NOT_SERVING}


def test_set_makes_a_new_service_known() -> None:
    state = HealthState([])
    state.set(UNKNOWN, "later")
    assert state.get("later") is UNKNOWN
    assert state.statistics().services == 2


SERVICE_UNKNOWN_REFUSED = "^status: expected UNKNOWN, SERVING or NOT_SERVING, got SERVICE_UNKNOWN$"


def test_service_unknown_cannot_be_set() -> None:
    """SERVICE_UNKNOWN is Watch's answer for an unknown name, never a status to store."""
    state = HealthState([])
    with pytest.raises(ValueError, match=SERVICE_UNKNOWN_REFUSED):
        state.set(SERVICE_UNKNOWN, "")
    assert state.get("") is NOT_SERVING


def test_service_unknown_cannot_be_the_initial_status() -> None:
    with pytest.raises(ValueError, match=SERVICE_UNKNOWN_REFUSED):
        HealthState([], SERVICE_UNKNOWN)


async def collect(state: HealthState, service: str, into: list[ServingStatus]) -> None:
    async for status in state.watch(service):
        into.append(status)


async def test_watch_yields_the_current_status_then_each_change() -> None:
    state = HealthState([MAILER])
    seen: list[ServingStatus] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, state, MAILER, seen)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [NOT_SERVING]
            for status in [SERVING, NOT_SERVING, UNKNOWN]:
                state.set(status, MAILER)
                await trio.testing.wait_all_tasks_blocked()
            state.set(SERVING, "")  # another service: not this watcher's business
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert seen == [NOT_SERVING, SERVING, NOT_SERVING, UNKNOWN]


async def test_watch_of_an_unknown_service_waits_for_it_to_become_known() -> None:
    state = HealthState([])
    seen: list[ServingStatus] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, state, "later", seen)
            await trio.testing.wait_all_tasks_blocked()
            state.set(NOT_SERVING)  # every *known* service: "later" is not one yet
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [SERVICE_UNKNOWN]
            state.set(SERVING, "later")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert seen == [SERVICE_UNKNOWN, SERVING]


async def test_a_slow_watcher_gets_only_the_latest_status() -> None:
    """Flips while the consumer is busy coalesce: it sees the last one, once."""
    state = HealthState([])
    with trio.fail_after(5):
        watch = state.watch("")
        assert await watch.__anext__() is NOT_SERVING
        for status in [SERVING, NOT_SERVING, UNKNOWN, SERVING]:
            state.set(status)
        assert await watch.__anext__() is SERVING
        await watch.aclose()


async def test_a_flip_back_while_busy_sends_nothing() -> None:
    """NOT_SERVING -> SERVING -> NOT_SERVING unseen: the watcher's view never went stale."""
    state = HealthState([])
    seen: list[ServingStatus] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, state, "", seen)
            await trio.testing.wait_all_tasks_blocked()
            state.set(SERVING)
            state.set(NOT_SERVING)
            state.set(NOT_SERVING)  # unchanged: a no-op
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [NOT_SERVING]
            state.set(SERVING)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert seen == [NOT_SERVING, SERVING]


async def test_closed_or_cancelled_watchers_leave_nothing_behind() -> None:
    """Watching made-up names and going away costs nothing afterwards."""
    state = HealthState([MAILER])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ["", MAILER, MAILER, "made-up-1", "made-up-2"]:
                nursery.start_soon(collect, state, name, [])
            await trio.testing.wait_all_tasks_blocked()
            assert state.statistics() == HealthStatistics(services=2, watchers=5, watched=4)
            nursery.cancel_scope.cancel()
    assert state.statistics() == HealthStatistics(services=2, watchers=0, watched=0)
    watch = state.watch("made-up-3")
    await watch.__anext__()
    await watch.aclose()
    assert state.statistics() == HealthStatistics(services=2, watchers=0, watched=0)


# ---- the service, against grpcio-health-checking's stub (in a subprocess) ----


async def test_check_answers_serving_and_not_serving() -> None:
    state = HealthState([MAILER])
    with trio.fail_after(30):
        async with open_std_server(state) as port:
            assert await run_client(str(port), "check", "", MAILER) == [
                {"service": "", "status": "NOT_SERVING"},
                {"service": MAILER, "status": "NOT_SERVING"},
            ]
            state.set(SERVING)
            state.set(NOT_SERVING, MAILER)
            assert await run_client(str(port), "check", "", MAILER) == [
                {"service": "", "status": "SERVING"},
                {"service": MAILER, "status": "NOT_SERVING"},
            ]
            state.set(SERVING, MAILER)
            assert await run_client(str(port), "check", MAILER) == [
                {"service": MAILER, "status": "SERVING"}
            ]


async def test_check_of_an_unknown_service_is_not_found() -> None:
    with trio.fail_after(30):
        async with open_std_server(HealthState([MAILER])) as port:
            assert await run_client(str(port), "check", "no.such.Service") == [
                {
                    "service": "no.such.Service",
                    "error": "NOT_FOUND",
                    "details": "service: unknown service 'no.such.Service'",
                }
            ]


async def test_list_gives_every_known_service() -> None:
    state = HealthState([MAILER])
    state.set(SERVING, "")
    with trio.fail_after(30):
        async with open_std_server(state) as port:
            assert await run_client(str(port), "list") == [{"": "SERVING", MAILER: "NOT_SERVING"}]


async def test_watch_sends_the_current_status_then_every_flip() -> None:
    state = HealthState([MAILER])
    with trio.fail_after(30):
        async with open_std_server(state) as port, open_client(str(port), "watch", MAILER) as w:
            assert await w.next_line() == {"status": "NOT_SERVING"}
            for status in [SERVING, NOT_SERVING]:
                state.set(status, MAILER)
                assert await w.next_line() == {"status": status.name}
            state.set(SERVING, "")  # the whole server, not the watched service: no message
            state.set(SERVING)  # now MAILER too
            assert await w.next_line() == {"status": "SERVING"}
            assert state.statistics().watchers == 1


async def test_watch_of_an_unknown_service_stays_open_until_it_is_known() -> None:
    state = HealthState([])
    with trio.fail_after(30):
        async with open_std_server(state) as port, open_client(str(port), "watch", "later") as w:
            assert await w.next_line() == {"status": "SERVICE_UNKNOWN"}
            state.set(SERVING, "later")
            assert await w.next_line() == {"status": "SERVING"}


async def test_a_cancelled_watch_leaves_no_watcher() -> None:
    """The client cancels (RST_STREAM) and keeps its connection: the server forgets the call."""
    state = HealthState([MAILER])
    with trio.fail_after(30):
        async with open_std_server(state) as port, open_client(str(port), "watch", MAILER) as w:
            assert await w.next_line() == {"status": "NOT_SERVING"}
            assert state.statistics().watchers == 1
            await w.send("cancel")
            assert await w.next_line() == {"ended": "CANCELLED"}
            await wait_until(lambda: state.statistics().watchers == 0)
            assert state.statistics() == HealthStatistics(services=2, watchers=0, watched=0)
            # The connection is still there and the server still answers on other calls.
            assert await run_client(str(port), "check", MAILER) == [
                {"service": MAILER, "status": "NOT_SERVING"}
            ]


async def test_a_vanished_watch_client_leaves_no_watcher() -> None:
    """The client process dies (its connection just closes): the server forgets the call."""
    state = HealthState([MAILER])
    with trio.fail_after(30):
        async with open_std_server(state) as port, open_client(str(port), "watch", MAILER) as w:
            assert await w.next_line() == {"status": "NOT_SERVING"}
            w.process.kill()
            await w.process.wait()
            await wait_until(lambda: state.statistics().watchers == 0)
            assert state.statistics().watched == 0


async def test_our_health_proto_matches_the_stock_one() -> None:
    """Same package, messages, field numbers, service and options as grpcio-health-checking."""
    with trio.fail_after(30):
        [stock] = await run_client("descriptors")
    theirs = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(stock["health"]))
    ours = descriptor_pb2.FileDescriptorProto.FromString(health_pb2.DESCRIPTOR.serialized_pb)
    assert ours.name == "trio_mailer/grpc_std/health/v1/health.proto"
    ours.ClearField("name")
    theirs.ClearField("name")
    assert ours == theirs
