"""The CLI's tooling: --version, serve --help, status by id with or without <>, health 0/1,
PEM errors that name the file, and a bad relay port that says "port"."""

from __future__ import annotations

import importlib.metadata
import re
import ssl
import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
import trustme

import trio_mailer_client
from trio_mailer.cli import main
from trio_mailer.core.config import SETTINGS

from .fakes.fault_relay import Fault, FaultRelay
from .helpers import FAST, relay_and_service, relay_env, running_service, subprocess_env


async def cli(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trio_mailer", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=subprocess_env(),
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the installed distribution's version."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"trio-mailer {importlib.metadata.version('trio-mailer')}\n"


def test_serve_help_lists_every_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """serve --help has a line per MAILER_* variable: name, [default], meaning."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for setting in SETTINGS:
        line = next(line for line in out.splitlines() if line.split()[:1] == [setting.env])
        assert f"[{setting.default_text}]" in line
        assert setting.meaning.split()[0] in line


async def test_status_with_or_without_brackets_prints_the_timestamps(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """status takes the id either way and prints accepted_at/last_attempt_at/finished_at;
    health says SERVING and exits 0."""
    with trio.fail_after(120):
        async with relay_and_service(relay_tls, ca_file, tmp_path) as (relay, _service, port):
            server = f"127.0.0.1:{port}"
            async with trio_mailer_client.open_mailer(server) as mailer:
                result = await mailer.send_pass("user@example.com", "1")
                assert isinstance(result, trio_mailer_client.Accepted)
                async with aclosing(mailer.watch(result.message_id)) as changes:
                    async for _status in changes:
                        pass
            await relay.wait_for_mails(1)
            message_id = result.message_id
            shown = [
                await cli("status", text, "--server", server)
                for text in (message_id, message_id.strip("<>"))
            ]
            health = await cli("health", "--server", server)
    stamp = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"
    for one in shown:
        assert one.returncode == 0, one.stderr
        assert re.fullmatch(
            rb"state=DELIVERED attempts=1 last_reply=250 '[^']*' accepted_at=%s "
            rb"last_attempt_at=%s finished_at=%s\n" % (stamp, stamp, stamp),
            one.stdout,
        ), one.stdout
    assert shown[0].stdout == shown[1].stdout
    assert (health.returncode, health.stdout) == (0, b"SERVING\n")


async def test_health_exits_1_when_not_serving_or_unreachable(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path, free_port: int
) -> None:
    """NOT_SERVING (the relay has been refusing past the threshold) exits 1, as does an
    unknown service name and a service that is not there."""
    relay = FaultRelay(ssl_context=relay_tls)
    relay.add_fault(Fault("GREETING", reply="554 5.3.2 not now", times=-1))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            async with running_service(
                relay_port, ca_file, tmp_path, MAILER_HEALTH_DOWN_AFTER_S="0.3", **FAST
            ) as (_service, port):
                server = f"127.0.0.1:{port}"
                async with trio_mailer_client.open_mailer(server) as mailer:
                    assert (await mailer.send_pass("user@example.com", "1")).sent
                for _ in range(100):
                    down = await cli("health", "--server", server)
                    if down.stdout != b"SERVING\n":
                        break
                    await trio.sleep(0.1)
                unknown = await cli("health", "--server", server, "--service", "no.Such")
            nursery.cancel_scope.cancel()
        gone = await cli("health", "--server", f"127.0.0.1:{free_port}", "--timeout", "0.5")
    assert (down.returncode, down.stdout) == (1, b"NOT_SERVING\n")
    assert unknown.returncode == 1 and unknown.stderr.startswith(b"error: NOT_FOUND")
    # Refused connections until the timeout; the last attempt may be the one the timeout cuts.
    assert gone.returncode == 1
    assert gone.stderr.startswith((b"error: UNAVAILABLE", b"error: DEADLINE_EXCEEDED")), gone.stderr


@pytest.mark.parametrize("variable", ["MAILER_SMTP_CA_FILE", "MAILER_TLS_CERT", "MAILER_TLS_KEY"])
async def test_a_bad_pem_file_is_named(
    variable: str, ca_file: Path, tmp_path: Path, free_port: int
) -> None:
    """A PEM file that does not load: exit 2, and the message names the variable and file."""
    bad = tmp_path / "broken.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    good_cert, good_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(good_cert))
    issued.private_key_pem.write_to_path(str(good_key))
    files = {"MAILER_TLS_CERT": str(good_cert), "MAILER_TLS_KEY": str(good_key)}
    files[variable] = str(bad)
    env = relay_env(free_port, ca_file, MAILER_TOKEN_FILE="", **files)
    if variable == "MAILER_SMTP_CA_FILE":
        env = relay_env(free_port, bad)
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "serve"],
            env=subprocess_env(**env),
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert f"{variable}={bad}: cannot load it as PEM" in result.stderr.decode()


async def test_a_bad_relay_port_says_port(ca_file: Path) -> None:
    """MAILER_REMOTE_HOST=host:99999: the message says the port is wrong."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mailer", "serve"],
            env=subprocess_env(**{**relay_env(25, ca_file), "MAILER_REMOTE_HOST": "relay:99999"}),
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert "MAILER_REMOTE_HOST: expected host:port, the port a whole number from 1 to 65535" in (
        result.stderr.decode()
    )
