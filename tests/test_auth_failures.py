"""Failed authentication is counted by reason and logged with the peer, never the token, at
most once per peer host a minute with a count of the rest (issue 25)."""

from __future__ import annotations

import logging
from pathlib import Path

import purerpc
import pytest
import trio

from trio_mailer.auth_events import AuthFailures, peer_host
from trio_mailer.client import client_ssl_context
from trio_mailer.metrics import Metrics
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .helpers import TOKEN, Pki, credentials, grpcio_call, scrape, tls_env, value

FAILURES = "trio_mailer_auth_failures_total"
WRONG_TOKEN = "not-the-token-but-long-enough-0123"


def test_one_line_per_peer_host_a_minute_with_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five failures from one host in a minute (new ports each): one line; the next after the
    minute says 4 more; another host has its own line; every failure is counted."""
    caplog.set_level(logging.WARNING, "trio_mailer.auth_events")
    now = [100.0]
    metrics = Metrics()
    failures = AuthFailures(metrics, lambda: now[0])
    for port in range(5):
        failures.failed("unknown_token", f"10.0.0.7:{5000 + port}")
        now[0] += 10
    failures.failed("missing", "10.0.0.8:6000")
    now[0] = 160.0
    failures.failed("bad_scheme", "10.0.0.7:7000")
    assert [r.getMessage() for r in caplog.records] == [
        "failed authentication from 10.0.0.7:5000: unknown bearer token",
        "failed authentication from 10.0.0.8:6000: no authorization header",
        "failed authentication from 10.0.0.7:7000: authorization is not 'Bearer <token>' "
        "(and 4 more from 10.0.0.7 not logged since the last line)",
    ]
    assert {r.levelname for r in caplog.records} == {"WARNING"}
    assert metrics.auth_failures.labels("unknown_token")._value.get() == 5
    assert metrics.auth_failures.labels("bad_scheme")._value.get() == 1


def test_the_peer_host_leaves_out_the_port() -> None:
    assert peer_host("10.0.0.7:5000") == "10.0.0.7"
    assert peer_host("::1:5000") == "::1"
    assert peer_host("?") == "?"


async def test_refused_calls_are_counted_by_reason_and_logged_without_the_token(
    start_harness, tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No token, a wrong one, Basic: each counted under its reason (0 before); one WARNING
    line names the peer; the wrong token appears nowhere in the log."""
    caplog.set_level(logging.DEBUG, "trio_mailer")
    env = {"MAILER_AUTH_TOKENS_FILE": str(tokens_file), "MAILER_METRICS_PORT": "0"}
    with trio.fail_after(20):
        async with start_harness(env=env) as h:
            before = await scrape(h)
            for metadata in (
                [],
                [("authorization", f"Bearer {WRONG_TOKEN}")],
                [("authorization", f"Basic {WRONG_TOKEN}")],
            ):
                with pytest.raises(purerpc.RpcFailedError):
                    await h.stub.SendPass(
                        MsgRequest(to="user@example.com", code="1"), metadata=metadata
                    )
            ok = await h.stub.SendPass(
                MsgRequest(to="user@example.com", code="1"),
                metadata=[("authorization", f"Bearer {TOKEN}")],
            )
            assert ok.sent
            after = await scrape(h)
    for reason in ("missing", "unknown_token", "bad_scheme", "bad_client_certificate"):
        assert (FAILURES, (("reason", reason),)) in before
        assert value(before, FAILURES, reason=reason) == 0
    assert value(after, FAILURES, reason="missing") == 1
    assert value(after, FAILURES, reason="unknown_token") == 1
    assert value(after, FAILURES, reason="bad_scheme") == 1
    lines = [r for r in caplog.records if r.getMessage().startswith("failed authentication")]
    assert len(lines) == 1
    assert lines[0].levelname == "WARNING"
    assert lines[0].getMessage().startswith("failed authentication from 127.0.0.1:")
    assert WRONG_TOKEN not in caplog.text


async def test_a_refused_client_certificate_is_counted_and_logged(
    start_harness, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """mTLS: a stranger's certificate fails the handshake: counted as bad_client_certificate,
    and a WARNING line names the peer."""
    caplog.set_level(logging.INFO, "trio_mailer")
    with trio.fail_after(30):
        async with start_harness(
            env={**tls_env(pki, mutual=True), "MAILER_METRICS_PORT": "0"},
            client_ssl=client_ssl_context(pki.server_ca, pki.client_cert),
        ) as h:
            refused = await trio.to_thread.run_sync(
                grpcio_call, h.grpc_port, credentials(pki, pki.stranger_cert)
            )
            assert refused == "UNAVAILABLE"
            after = await scrape(h)
    assert value(after, FAILURES, reason="bad_client_certificate") >= 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.getMessage().startswith("failed authentication")
    ]
    assert warnings
    assert warnings[0].startswith("failed authentication from 127.0.0.1:")
    assert "client certificate refused" in warnings[0]
