"""``trio-mailer dev`` as a developer runs it: no rate limits unless asked, its ports and their
options, and an inbox that outlives a restart."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_mailer.client import open_channel
from trio_mailer.core.config import load_config
from trio_mailer.dev.environment import (
    DEV_METRICS_PORT,
    FROM_ENV,
    DevOptions,
    DevTls,
    dev_env,
    rate_limits_line,
)
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import MsgRequest

from .helpers import LISTENING, start_service, subprocess_env

TIMEOUT_S = 60
INBOX = re.compile(rb"web inbox on http://127\.0\.0\.1:(\d+)/")
TLS = DevTls(server_context=None, ca_file=Path("/ca.pem"), password="pw")  # type: ignore[arg-type]
OUTBOX = Path("/work/outbox")


@pytest.mark.parametrize(
    ("env", "options", "expected"),
    [
        ({}, DevOptions(OUTBOX), {"MAILER_RECIPIENT_LIMIT": "0", "MAILER_METRICS_PORT": "20101"}),
        (
            {"MAILER_RECIPIENT_LIMIT": "5/600"},
            DevOptions(OUTBOX),
            {"MAILER_RECIPIENT_LIMIT": "5/600"},
        ),
        ({"MAILER_SERVE_PORT": "7"}, DevOptions(OUTBOX, port=0), {"MAILER_SERVE_PORT": "0"}),
        ({"MAILER_SERVE_PORT": "7"}, DevOptions(OUTBOX), {"MAILER_SERVE_PORT": "7"}),
        (
            {"MAILER_METRICS_PORT": "9"},
            DevOptions(OUTBOX, metrics_port=0),
            {"MAILER_METRICS_PORT": "0"},
        ),
        ({"MAILER_METRICS_PORT": "9"}, DevOptions(OUTBOX), {"MAILER_METRICS_PORT": "9"}),
        (
            {"MAILER_METRICS_PORT": "9"},
            DevOptions(OUTBOX, metrics_port=None),
            {"MAILER_METRICS_PORT": None},
        ),
    ],
)
def test_dev_variables_take_the_options_then_env_then_dev_defaults(
    env: dict[str, str], options: DevOptions, expected: dict[str, str | None]
) -> None:
    """An option beats its MAILER_* variable, which beats the dev default (recipient limit off,
    metrics on 20101); ``--metrics-port off`` leaves metrics off."""
    result = dev_env(env, 2525, TLS, options)
    assert {name: result.get(name) for name in expected} == expected
    assert result["MAILER_REMOTE_HOST"] == "127.0.0.1:2525"
    assert "MAILER_CALLER_LIMIT" not in result  # off by default, as in production


def test_dev_defaults_match_the_documented_ports() -> None:
    assert DevOptions(OUTBOX).port is FROM_ENV and DEV_METRICS_PORT == 20101


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"MAILER_RECIPIENT_LIMIT": "0"},
            "no recipient or caller rate limit "
            "(MAILER_RECIPIENT_LIMIT or MAILER_CALLER_LIMIT sets one)",
        ),
        (
            {"MAILER_CALLER_LIMIT": "100/1"},
            "rate limits from MAILER_*: recipient 5/600, caller 100/1",
        ),
    ],
)
def test_the_start_up_line_says_which_rate_limits_apply(env: dict[str, str], line: str) -> None:
    required = {"MAILER_REMOTE_HOST": "relay", "MAILER_FROM": "a@example.com"}
    config = load_config({**required, "MAILER_OUTBOX": "memory", **env})
    assert rate_limits_line(config) == line


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


async def test_dev_takes_many_mails_to_one_address_and_keeps_its_inbox(tmp_path: Path) -> None:
    """Dev mode has no recipient limit (the start-up line says so): six mails to one address
    are all accepted; the .eml files of an earlier run are in the inbox at start."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "20260101T000000Z-000001.eml").write_bytes(
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: from the last run\r\n"
        b"Message-ID: <old@example.com>\r\n\r\nhello\r\n"
    )
    env = subprocess_env(MAILER_SERVE_PORT="0", MAILER_METRICS_PORT="0")
    args = ["dev", "--outbox", str(outbox), "--inbox-port", "0"]
    with trio.fail_after(TIMEOUT_S):
        async with start_service(args, env, tmp_path) as service:
            port = int((await service.read_until(LISTENING)).group(1))
            inbox = f"http://127.0.0.1:{int((await service.read_until(INBOX)).group(1))}"
            assert "dev: no recipient or caller rate limit" in service.text
            mails = await trio.to_thread.run_sync(get_json, inbox + "/api/mails")
            assert [(m["subject"], m["message_id"]) for m in mails] == [
                ("from the last run", "<old@example.com>")
            ]
            async with open_channel("127.0.0.1", port) as channel:
                stub = MailerStub(channel)
                for n in range(6):
                    reply = await stub.SendPass(MsgRequest(to="user@example.com", code=str(n)))
                    assert reply.sent, (n, reply.reason)
            service.process.send_signal(signal.SIGINT)
            assert await service.finish() == 0, service.text


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_every_taken_port_is_named_with_its_option(tmp_path: Path) -> None:
    """Three taken ports: one start, exit 2, each error naming the option that moves it."""
    taken = [listening_socket() for _ in range(3)]
    try:
        inbox_port, grpc_port, metrics_port = (sock.getsockname()[1] for sock in taken)
        args = [
            *("-m", "trio_mailer", "dev", "--outbox", str(tmp_path / "outbox")),
            *("--inbox-port", str(inbox_port), "--port", str(grpc_port)),
            *("--metrics-port", str(metrics_port)),
        ]
        with trio.fail_after(TIMEOUT_S):
            result = await trio.run_process(
                [sys.executable, *args],
                env=subprocess_env(),
                cwd=tmp_path,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        for sock in taken:
            sock.close()
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    for option, port in (
        ("--inbox-port", inbox_port),
        ("--port", grpc_port),
        ("--metrics-port", metrics_port),
    ):
        assert (
            f"trio-mailer: cannot listen on 127.0.0.1:{port}: Address already in use "
            f"(choose another with {option}, or {option} 0 for any free port)"
        ) in stderr
    assert "Traceback" not in stderr


async def test_dev_port_options(tmp_path: Path) -> None:
    """``--port`` is the gRPC port, ``--metrics-port off`` serves no metrics."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = subprocess_env(MAILER_METRICS_PORT="0")
    args = ["dev", "--outbox", str(tmp_path / "outbox"), "--inbox-port", "off"]
    args += ["--port", str(port), "--metrics-port", "off"]
    with trio.fail_after(TIMEOUT_S):
        async with start_service(args, env, tmp_path) as service:
            assert int((await service.read_until(LISTENING)).group(1)) == port
            service.process.send_signal(signal.SIGINT)
            assert await service.finish() == 0, service.text
    assert "metrics on" not in service.text and "metrics_port=off" in service.text


async def test_dev_help_lists_the_port_options(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "dev", "--help"],
            capture_stdout=True,
            check=False,
        )
    usage = result.stdout.decode()
    for option in ("--port", "--metrics-port", "--inbox-port", "--outbox"):
        assert option in usage
