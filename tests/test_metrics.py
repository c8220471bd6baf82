"""The Prometheus endpoint: standard text format over HTTP, and numbers that move."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import aclosing
from pathlib import Path

import purerpc
import pytest
import trio

from trio_mailer.v1.mailer_pb2 import MsgRequest, StatusRequest

from .fakes.fault_relay import Fault
from .helpers import http_get, scrape, value

TOKEN = "metrics-test-token-123456"


async def test_metrics_count_requests_deliveries_retries_and_latency(
    start_harness, tmp_path: Path
) -> None:
    """Scrapes before and after traffic: every counter and gauge moves as it should."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    env = {
        "MAILER_METRICS_PORT": "0",
        "MAILER_AUTH_TOKENS_FILE": str(tokens),
        "MAILER_RETRY_BASE_S": "0.05",
        "MAILER_RETRY_MAX_S": "0.1",
        "MAILER_QUEUE_SIZE": "5",
    }
    auth = [("authorization", f"Bearer {TOKEN}")]
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            before = await scrape(h)
            assert value(before, "trio_mailer_mails_total", outcome="delivered") == 0
            h.relay.add_fault(Fault("RCPT", reply="451 4.7.1 later"))
            for n in range(3):
                reply = await h.stub.SendPass(
                    MsgRequest(to="user@example.com", code=str(n)), metadata=auth
                )
                assert reply.sent
            with pytest.raises(purerpc.RpcFailedError):
                await h.stub.SendPass(MsgRequest(to="bad", code="1"), metadata=auth)
            with pytest.raises(purerpc.RpcFailedError):
                await h.stub.SendRetrieve(MsgRequest(to="user@example.com", code="1"))
            await h.wait_finished(3)
            after = await scrape(h)
            status, _, _ = await http_get(h.app.metrics_port or 0, "/other")
    assert status == "HTTP/1.1 404 Not Found"
    requests = "trio_mailer_requests_total"
    assert value(after, requests, method="SendPass", outcome="accepted") == 3
    assert value(after, requests, method="SendPass", outcome="invalid") == 1
    assert value(after, requests, method="SendRetrieve", outcome="unauthenticated") == 1
    assert value(after, "trio_mailer_mails_total", outcome="delivered") == 3
    assert value(after, "trio_mailer_retries_total") == 1
    assert value(after, "trio_mailer_smtp_replies_total", code_class="2xx") == 3
    assert value(after, "trio_mailer_smtp_replies_total", code_class="4xx") == 1
    assert value(after, "trio_mailer_smtp_connects_total", result="ok") == 1
    assert value(after, "trio_mailer_accept_to_delivery_seconds_count") == 3
    assert value(after, "trio_mailer_smtp_send_seconds_count") == 4
    assert value(after, "trio_mailer_smtp_sessions_up") == 1
    assert value(after, "trio_mailer_queue_depth") == 0


async def test_queue_full_and_failures_are_counted(start_harness, free_port: int) -> None:
    """With the relay down: queue depth rises, refusals are counted as queue_full."""
    env = {
        "MAILER_METRICS_PORT": "0",
        "MAILER_QUEUE_SIZE": "2",
        "MAILER_REMOTE_HOST": f"127.0.0.1:{free_port}",
        "MAILER_SHUTDOWN_GRACE_S": "0",
    }
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            for n in range(6):
                await h.stub.SendPass(MsgRequest(to="user@example.com", code=str(n)))
            samples = await scrape(h)
    refused = value(samples, "trio_mailer_requests_total", method="SendPass", outcome="queue_full")
    accepted = value(samples, "trio_mailer_requests_total", method="SendPass", outcome="accepted")
    assert accepted + refused == 6 and refused >= 3
    assert value(samples, "trio_mailer_queue_depth") == 2
    assert value(samples, "trio_mailer_smtp_connects_total", result="failed") >= 1
    assert value(samples, "trio_mailer_smtp_sessions_up") == 0


async def test_metrics_follow_prometheus_conventions(start_harness) -> None:
    """process_*/python_* present, no *_created, labelled series at 0 from the start,
    build_info, gRPC counters by code, GetStatus/WatchStatus counted, outbox gauges, and the
    accept histogram's buckets below 10 ms."""
    with trio.fail_after(30):
        async with start_harness(env={"MAILER_METRICS_PORT": "0"}) as h:
            before = await scrape(h)
            h.relay.add_fault(Fault("DOT", delay_s=1.0))
            reply = await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"))
            await trio.sleep(0.2)
            during = await scrape(h)
            await h.stub.GetStatus(StatusRequest(message_id=reply.message_id))
            with pytest.raises(purerpc.RpcFailedError):
                await h.stub.GetStatus(StatusRequest(message_id="<nobody@example.com>"))
            async with aclosing(
                h.stub.WatchStatus(StatusRequest(message_id=reply.message_id))
            ) as changes:
                async for _status in changes:
                    pass
            after = await scrape(h)
    names = {name for name, _labels in after}
    assert any(name.startswith("process_") for name in names)
    assert any(name.startswith("python_") for name in names)
    assert not [name for name in names if name.endswith("_created")]
    for method in ("SendPass", "SendRetrieve", "GetStatus", "WatchStatus"):
        for code in ("OK", "INVALID_ARGUMENT", "UNAVAILABLE"):
            key = ("grpc_server_handled_total", _labels_of(method, grpc_code=code))
            assert before[key] == 0
    assert before[("trio_mailer_requests_total", (("method", "GetStatus"), ("outcome", "ok")))] == 0
    assert before[("trio_mailer_mails_total", (("outcome", "expired"),))] == 0
    [build] = [labels for name, labels in after if name == "trio_mailer_build_info"]
    assert after[("trio_mailer_build_info", build)] == 1
    assert dict(build)["version"]
    handled = "grpc_server_handled_total"
    assert after[(handled, _labels_of("SendPass", grpc_code="OK"))] == 1
    assert after[(handled, _labels_of("GetStatus", grpc_code="OK"))] == 1
    assert after[(handled, _labels_of("GetStatus", grpc_code="NOT_FOUND"))] == 1
    assert after[(handled, _labels_of("WatchStatus", grpc_code="OK"))] == 1
    assert after[("grpc_server_started_total", _labels_of("WatchStatus"))] == 1
    requests = "trio_mailer_requests_total"
    assert value(after, requests, method="GetStatus", outcome="ok") == 1
    assert value(after, requests, method="GetStatus", outcome="not_found") == 1
    assert value(after, requests, method="WatchStatus", outcome="ok") == 1
    assert value(during, "trio_mailer_outbox_unfinished") == 1
    assert value(during, "trio_mailer_outbox_oldest_unfinished_age_seconds") > 0
    assert value(after, "trio_mailer_outbox_unfinished") == 0
    assert value(after, "trio_mailer_outbox_oldest_unfinished_age_seconds") == 0
    assert value(after, "trio_mailer_accept_seconds_bucket", le="0.001") <= 1
    assert value(after, "trio_mailer_accept_seconds_count") == 1


def _labels_of(method: str, **extra: str) -> tuple[tuple[str, str], ...]:
    grpc_type = "server_stream" if method == "WatchStatus" else "unary"
    labels = {
        "grpc_type": grpc_type,
        "grpc_service": "trio_mailer.v1.Mailer",
        "grpc_method": method,
        **extra,
    }
    return tuple(sorted(labels.items()))


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("TRIO_MAILER_TEST_REQUIRE_PROMTOOL"),
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run does)",
)
async def test_promtool_accepts_the_exposition(start_harness) -> None:
    """``promtool check metrics`` finds no problem in a scrape after some traffic."""
    assert PROMTOOL is not None, "TRIO_MAILER_TEST_REQUIRE_PROMTOOL is set but promtool is missing"
    with trio.fail_after(30):
        async with start_harness(env={"MAILER_METRICS_PORT": "0"}) as h:
            await h.stub.SendPass(MsgRequest(to="user@example.com", code="1"))
            await h.wait_finished(1)
            assert h.app.metrics_port is not None
            _status, _headers, body = await http_get(h.app.metrics_port, "/metrics")
        result = await trio.run_process(
            [PROMTOOL, "check", "metrics"],
            stdin=body.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


def test_every_outcome_the_service_counts_is_pre_created() -> None:
    """The outcome labels the acceptance use case can use are all in metrics.SEND_OUTCOMES."""
    from trio_mailer.metrics import SEND_OUTCOMES
    from trio_mailer.service import accept_mail

    used = {
        "accepted",
        "repeat",
        "internal",
        "unauthenticated",
        "deadline_exceeded",
        "cancelled",
        *accept_mail.ERROR_OUTCOMES.values(),
        *accept_mail.REFUSAL_OUTCOMES.values(),
    }
    assert used <= set(SEND_OUTCOMES)
