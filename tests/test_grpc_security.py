"""Only trusted callers: bearer tokens, TLS and mutual TLS on the gRPC port."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import purerpc
import pytest
import trio

from trio_mailer.client import client_ssl_context
from trio_mailer.core.config import ConfigError, load_config
from trio_mailer.logs import quiet_secret_bearing_loggers
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest

from .helpers import (
    HASHED_TOKEN,
    OTHER_TOKEN,
    TOKEN,
    Pki,
    bearer,
    credentials,
    grpcio_call,
    tls_env,
)


async def test_calls_need_a_valid_bearer_token(start_harness, tokens_file: Path, caplog) -> None:
    """No token or a wrong one: UNAUTHENTICATED and nothing queued; a right one is accepted."""
    quiet_secret_bearing_loggers()  # as configure_logging does in the service
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(10):
        async with start_harness(env={"MAILER_AUTH_TOKENS_FILE": str(tokens_file)}) as h:
            request = MsgRequest(to="user@example.com", code="1")
            for metadata in (None, bearer(OTHER_TOKEN), [("authorization", TOKEN)]):
                with pytest.raises(purerpc.RpcFailedError) as info:
                    await h.stub.SendPass(request, metadata=metadata)
                assert info.value.status.status_code == purerpc.StatusCode.UNAUTHENTICATED
            assert h.app.queue.statistics().queued == 0
            ok = await h.stub.SendPass(request, metadata=bearer(TOKEN))
            hashed = await h.stub.SendRetrieve(request, metadata=bearer(HASHED_TOKEN))
            assert ok.sent and hashed.sent
            await h.wait_finished(2)
            assert len(h.relay.received) == 2
    for secret in (TOKEN, OTHER_TOKEN, HASHED_TOKEN):
        assert secret not in caplog.text


def test_health_and_reflection_stay_open_unless_configured(tokens_file: Path) -> None:
    """With tokens, health checks and reflection need none, unless MAILER_AUTH_ALL_SERVICES=1."""
    from trio_mailer.app import MailerApp

    env = {
        "MAILER_REMOTE_HOST": "relay.example:465",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_AUTH_TOKENS_FILE": str(tokens_file),
        "MAILER_OUTBOX": "memory",
    }
    app = MailerApp.from_config(load_config(env))
    assert app.authorize("grpc.health.v1.Health", "Check", [])
    assert app.authorize("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", [])
    assert not app.authorize("trio_mailer.v1.Mailer", "SendPass", [])
    assert app.authorize("trio_mailer.v1.Mailer", "SendPass", bearer(TOKEN))
    strict = MailerApp.from_config(load_config({**env, "MAILER_AUTH_ALL_SERVICES": "1"}))
    assert not strict.authorize("grpc.health.v1.Health", "Check", [])
    assert strict.authorize("grpc.health.v1.Health", "Check", bearer(TOKEN))


async def test_tls_port_serves_grpcio_and_refuses_plaintext(
    start_harness, pki: Pki, caplog
) -> None:
    """TLS with ALPN h2: grpcio connects; a plaintext client is refused, one INFO line."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(20):
        async with start_harness(
            env=tls_env(pki, mutual=False), client_ssl=client_ssl_context(pki.server_ca)
        ) as h:
            ok = await trio.to_thread.run_sync(grpcio_call, h.grpc_port, credentials(pki))
            plain = await trio.to_thread.run_sync(grpcio_call, h.grpc_port, None)
            assert isinstance(ok, MsgReply) and ok.sent
            assert plain == "UNAVAILABLE"
            through_stub = await h.stub.SendPass(MsgRequest(to="user@example.com", code="2"))
            assert through_stub.sent
            await h.wait_finished(2)
            assert len(h.relay.received) == 2
    assert "refused a gRPC connection: TLS handshake failed" in caplog.text
    assert "Traceback" not in caplog.text


async def test_mutual_tls_requires_a_trusted_unexpired_client_certificate(
    start_harness, pki: Pki
) -> None:
    """mTLS: no certificate, an expired one or a stranger's is refused; a good one works."""
    with trio.fail_after(30):
        async with start_harness(
            env=tls_env(pki, mutual=True),
            client_ssl=client_ssl_context(pki.server_ca, pki.client_cert),
        ) as h:
            results = {}
            for name, pem in [
                ("none", None),
                ("expired", pki.expired_client_cert),
                ("stranger", pki.stranger_cert),
                ("good", pki.client_cert),
            ]:
                results[name] = await trio.to_thread.run_sync(
                    grpcio_call, h.grpc_port, credentials(pki, pem)
                )
            assert results["none"] == results["expired"] == results["stranger"] == "UNAVAILABLE"
            assert isinstance(results["good"], MsgReply) and results["good"].sent
            await h.wait_finished(1)
            assert len(h.relay.received) == 1  # only the trusted caller's mail


async def test_send_command_with_token_and_tls(start_harness, pki: Pki, tokens_file: Path) -> None:
    """``trio-mailer send --ca --cert --key`` with $MAILER_TOKEN reaches an mTLS+token service."""
    env = {**tls_env(pki, mutual=True), "MAILER_AUTH_TOKENS_FILE": str(tokens_file)}
    with trio.fail_after(30):
        async with start_harness(
            env=env, client_ssl=client_ssl_context(pki.server_ca, pki.client_cert)
        ) as h:
            base = [
                sys.executable,
                "-m",
                "trio_mailer",
                "send",
                "--server",
                f"127.0.0.1:{h.grpc_port}",
                "--to",
                "user@example.com",
                "--code",
                "77",
                "--ca",
                str(pki.server_ca),
                "--cert",
                str(pki.client_cert),
                "--key",
                str(pki.client_cert),
            ]
            good = await trio.run_process(
                base,
                env={"MAILER_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            bad = await trio.run_process(
                [*base, "--token", OTHER_TOKEN],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(b"sent=true message_id=<")
    assert bad.returncode == 1
    assert bad.stderr.startswith(b"error: UNAUTHENTICATED: missing or invalid credentials")


def test_public_address_without_caller_authentication_is_refused() -> None:
    """Bound beyond loopback with neither tokens nor client certificates: start-up fails."""
    env = {
        "MAILER_REMOTE_HOST": "relay.example:465",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_SERVE_HOST": "0.0.0.0",
        "MAILER_OUTBOX": "memory",
    }
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert info.value.problems == [
        "MAILER_SERVE_HOST: 0.0.0.0 is reachable from other machines, but no caller "
        "authentication is set up: set MAILER_AUTH_TOKENS_FILE or MAILER_TLS_CLIENT_CA, or "
        "MAILER_ALLOW_UNAUTHENTICATED=1 if you mean it"
    ]
    assert load_config({**env, "MAILER_ALLOW_UNAUTHENTICATED": "1"}).allow_unauthenticated


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected at least one token, got none"),
        ("short\n", "line 1: expected a token of at least 16 characters"),
        ("# c\nsha256:abc\n", "line 2: expected sha256: and 64 hex digits"),
    ],
)
def test_bad_tokens_file_stops_start_up(tmp_path: Path, text: str, problem: str) -> None:
    """An unusable tokens file is a configuration error that never quotes the file."""
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(
            {
                "MAILER_REMOTE_HOST": "relay.example",
                "MAILER_FROM": "noreply@example.com",
                "MAILER_AUTH_TOKENS_FILE": str(path),
                "MAILER_OUTBOX": "memory",
            }
        )
    assert info.value.problems[0].startswith(f"MAILER_AUTH_TOKENS_FILE: {problem}")
