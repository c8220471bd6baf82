"""Issue 22 with the project's own CLI: an oversized request is refused at once."""

from __future__ import annotations

import sys

import trio

from .helpers import subprocess_env

CLI_TIMEOUT_S = 10  # --timeout-s: a refusal that waited for it would show in the run time


async def test_cli_send_with_a_9000_character_code_gets_resource_exhausted_at_once(
    start_harness,
) -> None:
    """``trio-mailer send --code <9,000 characters>`` (over the 4 KiB message limit): the CLI
    prints RESOURCE_EXHAUSTED and exits 1 long before its timeout; no DEADLINE_EXCEEDED."""
    async with start_harness() as h:
        started = trio.current_time()
        with trio.fail_after(CLI_TIMEOUT_S * 2):
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "trio_mailer",
                    "send",
                    "--to",
                    "user@example.com",
                    "--code",
                    "x" * 9000,
                    "--server",
                    f"127.0.0.1:{h.grpc_port}",
                    "--timeout-s",
                    str(CLI_TIMEOUT_S),
                ],
                env=subprocess_env(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        elapsed_s = trio.current_time() - started
    stderr = result.stderr.decode()
    observed = {
        "exit": result.returncode,
        "status": stderr.partition(":")[2].split(":")[0].strip(),
        "stdout": result.stdout.decode(),
        "before_timeout": elapsed_s < CLI_TIMEOUT_S / 2,
    }
    assert observed == {
        "exit": 1,
        "status": "RESOURCE_EXHAUSTED",
        "stdout": "",
        "before_timeout": True,
    }, stderr
    assert "larger than 4096 bytes" in stderr
