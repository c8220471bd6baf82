"""The ``trio-mailer`` command as a user runs it: a subprocess, signals, exit statuses."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import sys
from pathlib import Path

import trio

from trio_mailer.client import open_channel
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import (
    LISTENING,
    relay_env,
    serve_until_it_exits,
    silent_server,
    start_service,
    subprocess_env,
)


def assert_quiet_shutdown(text: str) -> None:
    assert "Traceback" not in text
    assert "dispatch loop" not in text
    assert "Got exception" not in text


async def test_sigterm_drains_the_queue_and_exits_0(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """SIGTERM: queued mail is delivered within the grace period, QUIT, exit 0, no traceback."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("DOT", delay_s=0.2, reply="250 2.0.0 queued", times=-1))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            env = subprocess_env(**relay_env(relay_port, ca_file))
            async with start_service(["serve"], env, tmp_path) as service:
                port = int((await service.read_until(LISTENING)).group(1))
                async with open_channel("127.0.0.1", port) as channel:
                    stub = MailerStub(channel)
                    ids = []
                    for n in range(4):
                        request = MsgRequest(to="user@example.com", code=str(n))
                        reply = await stub.SendPass(request)
                        assert reply.sent
                        ids.append(reply.message_id)
                service.process.send_signal(signal.SIGTERM)
                assert await service.finish() == 0, service.text
            nursery.cancel_scope.cancel()
    assert len(relay.received) == 4
    assert all(
        message_id.encode() in m.data for message_id, m in zip(ids, relay.received, strict=True)
    )
    assert relay.commands[-1][1] == "QUIT"
    assert "received SIGTERM" in service.text
    assert_quiet_shutdown(service.text)


async def test_bad_configuration_exits_2_listing_every_problem(tmp_path: Path) -> None:
    """Missing and invalid variables: exit 2, one message naming each, no traceback."""
    env = subprocess_env(MAILER_SERVE_PORT="http", MAILER_SMTP_TLS="tls")
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "serve"],
            env=env,
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "trio-mailer: invalid configuration:" in stderr
    for name in ("MAILER_REMOTE_HOST", "MAILER_FROM", "MAILER_SERVE_PORT", "MAILER_SMTP_TLS"):
        assert f"  - {name}: " in stderr
    assert "Traceback" not in stderr


async def test_port_taken_exits_2(ca_file: Path, free_port: int, tmp_path: Path) -> None:
    """A port another process listens on: exit 2 with a clear error, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = subprocess_env(**relay_env(free_port, ca_file, MAILER_SERVE_PORT=str(port)))
        returncode, stderr = await serve_until_it_exits(env, tmp_path)
    assert returncode == 2, stderr
    assert f"trio-mailer: cannot listen on 127.0.0.1:{port}: Address already in use" in stderr
    assert "Traceback" not in stderr


async def test_dev_captures_mail_sent_with_the_send_command(tmp_path: Path) -> None:
    """``dev`` + ``send``: the mail lands as an .eml file; bad input is refused; SIGINT exits 0."""
    outbox = tmp_path / "captured"
    with trio.fail_after(60):
        env = subprocess_env(MAILER_SERVE_PORT="0", MAILER_METRICS_PORT="0")
        dev_args = ["dev", "--outbox", str(outbox), "--inbox-port", "0"]
        async with start_service(dev_args, env, tmp_path) as service:
            port = int((await service.read_until(LISTENING)).group(1))
            send = [sys.executable, "-m", "trio_mailer", "send", "--server", f"127.0.0.1:{port}"]
            ok = await trio.run_process(
                [*send, "--to", "user@example.com", "--code", "424242", "--kind", "retrieve"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert ok.returncode == 0, ok.stderr
            match = re.fullmatch(rb"sent=true message_id=(<[^>]+>)\n", ok.stdout)
            assert match is not None, ok.stdout
            await service.read_until(re.compile(re.escape(b"delivered " + match.group(1))))
            for extra in ([], ["--watch"]):
                shown = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "trio_mailer",
                        "status",
                        match.group(1).decode(),
                        "--server",
                        f"127.0.0.1:{port}",
                        *extra,
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert shown.returncode == 0, shown.stderr
                assert shown.stdout.startswith(b"state=DELIVERED attempts=1 last_reply=250 ")

            bad = await trio.run_process(
                [*send, "--to", "a@example.com, b@example.com", "--code", "1"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert bad.returncode == 1
            assert (
                bad.stderr
                == b"error: INVALID_ARGUMENT: to: expected one address, got a list of 2\n"
            )

            service.process.send_signal(signal.SIGINT)
            assert await service.finish() == 0, service.text
    [eml] = outbox.glob("*.eml")
    data = eml.read_bytes()
    assert b"Message-ID: " + match.group(1) in data
    assert b"Subject: Recover your trio-mailer account" in data
    assert b"424242" in data
    assert_quiet_shutdown(service.text)


async def test_send_to_nothing_listening_fails_clearly(free_port: int) -> None:
    """``send`` to a port with no service: exit 1 and UNAVAILABLE, no traceback."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "trio_mailer",
                "send",
                "--server",
                f"127.0.0.1:{free_port}",
                "--to",
                "user@example.com",
                "--code",
                "1",
            ],
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.decode().startswith(
        f"error: UNAVAILABLE: cannot reach 127.0.0.1:{free_port}"
    )


async def test_json_logs_of_a_full_run_hold_no_secrets(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """MAILER_LOG_FORMAT=json: every line is one JSON object; the password and code never appear."""
    password, code = "relay-Pa55-word-Xy9", "CODE-918273"
    relay = FaultRelay(ssl_context=relay_tls, credentials=("bot", password), require_auth=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            env = subprocess_env(
                **relay_env(relay_port, ca_file),
                MAILER_LOG_FORMAT="json",
                MAILER_USER="bot",
                MAILER_PASSWORD=password,
            )
            async with start_service(["serve"], env, tmp_path) as service:
                port = int(
                    (
                        await service.read_until(re.compile(rb"listening on 127\.0\.0\.1:(\d+)"))
                    ).group(1)
                )
                async with open_channel("127.0.0.1", port) as channel:
                    reply = await MailerStub(channel).SendPass(
                        MsgRequest(to="user@example.com", code=code)
                    )
                await service.read_until(
                    re.compile(re.escape(f"delivered {reply.message_id}".encode()))
                )
                service.process.send_signal(signal.SIGTERM)
                assert await service.finish() == 0, service.text
            nursery.cancel_scope.cancel()
    records = [json.loads(line) for line in service.text.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    delivered = [r for r in records if r["message"].startswith("delivered ")]
    assert delivered[0]["message_id"] == reply.message_id
    assert password not in service.text and code not in service.text
    assert len(relay.received) == 1 and code.encode() in relay.received[0].data


async def test_send_and_status_to_a_port_that_never_speaks_time_out_with_exit_1() -> None:
    """Issue 10 item 9: `send` and `status` against a silent port: a clear DEADLINE_EXCEEDED and
    a non-zero exit after --timeout-s, instead of waiting forever."""
    with trio.fail_after(60):
        async with silent_server() as port:
            for command in (
                ["send", "--to", "user@example.com", "--code", "1"],
                ["status", "<x@example.com>"],
            ):
                result = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "trio_mailer",
                        command[0],
                        "--server",
                        f"127.0.0.1:{port}",
                        "--timeout-s",
                        "0.5",
                        *command[1:],
                    ],
                    capture_stderr=True,
                    check=False,
                )
                assert result.returncode == 1, result.stderr
                assert result.stderr.decode() == (
                    f"error: DEADLINE_EXCEEDED: no reply from 127.0.0.1:{port} within 0.5s\n"
                )
