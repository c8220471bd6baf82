"""How the client commands end, as a user sees it: Ctrl-C, a watch's final state, a refusal's
advice, a missing token, and a misspelt ``MAILER_*`` variable at start-up."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .fakes.fault_relay import Fault
from .helpers import (
    DEAD,
    FAST,
    TOKEN,
    relay_env,
    send_pass,
    serve_until_it_exits,
    silent_server,
    subprocess_env,
)

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


async def cli(*args: str, **env: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trio_mailer", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=subprocess_env(**env),
    )


async def interrupt(
    args: list[str], started: trio.Event, *, after_a_line: bool = False
) -> tuple[int, str, str]:
    """Run the CLI, press Ctrl-C (SIGINT) once ``started`` is set (and, with ``after_a_line``,
    once it has printed a whole line); its status and output."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_mailer", *args],
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        out, err = bytearray(), bytearray()
        printed = trio.Event()
        async with trio.open_nursery() as nursery:

            async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
                while chunk := await stream.receive_some():
                    into += chunk
                    if b"\n" in out:
                        printed.set()

            nursery.start_soon(drain, process.stdout, out)
            nursery.start_soon(drain, process.stderr, err)
            await started.wait()
            if after_a_line:
                await printed.wait()
            process.send_signal(signal.SIGINT)
        return await process.wait(), out.decode(), err.decode()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()


def assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert len(stderr.splitlines()) == 1, stderr


@pytest.mark.parametrize(
    "command",
    [
        ["send", "--to", "user@example.com", "--code", "1", "--idempotency-key", "key-1"],
        ["status", "<x@example.com>"],
        ["health"],
        ["suppressed", "list"],
    ],
)
async def test_ctrl_c_in_a_waiting_call_exits_130_with_one_line(command: list[str]) -> None:
    """Ctrl-C while the service does not answer: exit 130 and one line on stderr, no
    traceback; ``send`` says the key that makes a repeat safe."""
    connected = trio.Event()
    with trio.fail_after(60):
        async with silent_server(connected) as port:
            server = ["--server", f"127.0.0.1:{port}", "--timeout-s", "60"]
            status, out, err = await interrupt([*command, *server], connected)
    assert (status, out) == (INTERRUPTED, ""), err
    assert_one_line(err)
    assert err.startswith(f"trio-mailer {command[0]}: interrupted")
    if command[0] == "send":
        assert "--idempotency-key key-1" in err


async def test_ctrl_c_in_status_watch_exits_130_with_one_line(start_harness) -> None:
    """``status --watch`` on a mail still being sent: Ctrl-C after the first status line exits
    130 with one line, not an exception group."""
    with trio.fail_after(60):
        async with start_harness() as h:
            h.relay.add_fault(Fault("DOT", delay_s=30, times=1))
            message_id = await send_pass(h)
            first_line = trio.Event()
            watch = ["status", message_id, "--watch", "--server", f"127.0.0.1:{h.grpc_port}"]
            async with trio.open_nursery() as nursery:

                async def press_after_the_first_line() -> None:
                    while h.app.board.watchers() == 0:  # noqa: ASYNC110 (the service's counter)
                        await trio.sleep(0.01)
                    first_line.set()

                nursery.start_soon(press_after_the_first_line)
                status, out, err = await interrupt(watch, first_line, after_a_line=True)
            h.app.request_shutdown(force=True)
    assert status == INTERRUPTED, err
    assert out.startswith("state=")
    assert_one_line(err)
    assert err == "trio-mailer status: interrupted\n"


@pytest.mark.parametrize(
    ("faults", "env", "final", "exit_status"),
    [
        ([], {}, "DELIVERED", 0),
        ([Fault("RCPT", reply=DEAD)], {}, "FAILED", 1),
        (
            [Fault("MAIL", reply="451 4.3.0 try again later", times=-1)],
            {**FAST, "MAILER_MESSAGE_TTL_S": "0.5"},
            "EXPIRED",
            1,
        ),
    ],
)
async def test_status_watch_exits_by_the_final_state(
    start_harness, faults: list[Fault], env: dict[str, str], final: str, exit_status: int
) -> None:
    """``status --watch``: exit 0 when the mail is DELIVERED, 1 when it FAILED or EXPIRED."""
    with trio.fail_after(60):
        async with start_harness(env=env) as h:
            for fault in faults:
                h.relay.add_fault(fault)
            message_id = await send_pass(h)
            watched = await cli(
                "status", message_id, "--watch", "--server", f"127.0.0.1:{h.grpc_port}"
            )
    last = watched.stdout.decode().splitlines()[-1]
    assert last.startswith(f"state={final} "), watched.stdout
    assert watched.returncode == exit_status, watched.stderr


async def test_unauthenticated_says_how_to_pass_a_token(start_harness, tokens_file: Path) -> None:
    """No token, or a wrong one: exit 1, and the message says --token / MAILER_TOKEN."""
    with trio.fail_after(60):
        async with start_harness(env={"MAILER_AUTH_TOKENS_FILE": str(tokens_file)}) as h:
            server = ["--server", f"127.0.0.1:{h.grpc_port}"]
            send = ["send", "--to", "user@example.com", "--code", "1", *server]
            missing = await cli(*send)
            wrong = await cli(*send, "--token", "not-the-token")
            right = await cli(*send, MAILER_TOKEN=TOKEN)
    for refused in (missing, wrong):
        assert refused.returncode == 1
        [line] = refused.stderr.decode().splitlines()
        assert line.startswith("error: UNAUTHENTICATED: "), line
        assert "--token" in line and "MAILER_TOKEN" in line, line
    assert "refused" in wrong.stderr.decode()
    assert right.returncode == 0, right.stderr


async def test_a_refusal_prints_retry_after_in_seconds(start_harness) -> None:
    """``sent=false``: the service's retry_after_ms is printed as retry_after_s, in seconds."""
    with trio.fail_after(60):
        async with start_harness(env={"MAILER_RECIPIENT_LIMIT": "1/600"}) as h:
            send = ["send", "--to", "user@example.com", "--code", "1"]
            server = ["--server", f"127.0.0.1:{h.grpc_port}"]
            assert (await cli(*send, *server)).returncode == 0
            refused = await cli(*send, *server)
    assert refused.returncode == 1
    match = re.fullmatch(
        rb"sent=false reason=recipient rate limited retry_after_s=(\d+(?:\.\d{1,3})?)\n",
        refused.stdout,
    )
    assert match is not None, refused.stdout
    assert 590 < float(match.group(1)) <= 600


async def test_a_misspelt_variable_is_warned_about_at_start_up(
    ca_file: Path, free_port: int, tmp_path: Path
) -> None:
    """``serve`` with MAILER_FORM instead of MAILER_FROM: the start-up error for the missing
    MAILER_FROM comes with a warning that names MAILER_FORM and suggests MAILER_FROM."""
    env = relay_env(free_port, ca_file)
    env["MAILER_FORM"] = env.pop("MAILER_FROM")
    status, stderr = await serve_until_it_exits(subprocess_env(**env), tmp_path)
    assert status == 2, stderr
    assert (
        "trio-mailer: warning: MAILER_FORM is not a trio-mailer setting "
        "(did you mean MAILER_FROM?); it is ignored\n"
    ) in stderr
    assert "MAILER_FROM: required" in stderr
