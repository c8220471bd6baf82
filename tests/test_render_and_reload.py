"""``trio-mailer render`` prints a mail without sending it; SIGHUP reloads the templates."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_mailer.client import open_channel
from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.dev.capture_relay import CaptureSMTPServer
from trio_mailer.v1.mailer_grpc import MailerStub
from trio_mailer.v1.mailer_pb2 import SendRequest

from .helpers import LISTENING, relay_env, start_service, subprocess_env

TIMEOUT_S = 60


def render(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "trio_mailer", "render", *args],
        env=subprocess_env(**env),
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_render_text_and_html_parts() -> None:
    """--text prints the text part verbatim, --html the escaped html part, in the locale."""
    text = render("password", "--locale", "ru", "--var", "code=<42>", "--text")
    assert text.returncode == 0, text.stderr
    assert "    <42>\n" in text.stdout.decode()
    assert text.stdout.decode().startswith("Здравствуйте!\n")
    html = render("password", "--var", "code=<42>", "--html", MAILER_SERVICENAME="Acme")
    assert html.returncode == 0, html.stderr
    assert ">&lt;42&gt;</code>" in html.stdout.decode()
    assert "<42>" not in html.stdout.decode()


def test_render_eml_is_the_message_the_service_would_send() -> None:
    """--eml prints the whole message; missing variables get sample values (said on stderr)."""
    result = render("retrieve", "--locale", "pt-BR", "--eml")
    assert result.returncode == 0, result.stderr
    assert "code not given, using '123456'" in result.stderr.decode()
    message = email.message_from_bytes(result.stdout, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message.get_content_type() == "multipart/alternative"
    assert str(message["Content-Language"]) == "en"  # pt-BR -> pt -> the default
    assert str(message["Auto-Submitted"]) == "auto-generated"


def test_render_summary_by_default() -> None:
    result = render("password", "--var", "code=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(
        "Template: password (locale en)\nSubject: Your trio-mailer password code\n"
        "Parts: text + html\n\nHello,\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "trio-mailer render: template: unknown template 'nope'"),
        (["password", "--var", "x=1"], "trio-mailer render: vars.x: template 'password' does not"),
        (["password", "--var", "novalue"], "--var: expected NAME=VALUE, got 'novalue'"),
    ],
)
def test_render_refuses_bad_input(args: list[str], message: str) -> None:
    result = render(*args)
    assert result.returncode != 0
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_render_with_broken_templates_names_file_and_line(tmp_path: Path) -> None:
    """A broken template set stops render (as it stops start-up), naming file and line."""
    templates = tmp_path / "templates"
    shutil.copytree(shipped_templates_dir(), templates)
    (templates / "mail" / "retrieve.ru.msg").write_text(
        "{# requires: code #}\n\n{% block subject %}{% if %}{% endblock %}"
    )
    result = render("password", MAILER_TEMPLATES_DIR=str(templates))
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert f"{templates / 'mail' / 'retrieve.ru.msg'}:3: syntax error" in stderr


async def test_sighup_reloads_the_templates_and_refuses_a_broken_set(
    relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    """SIGHUP: a new template becomes sendable; a broken set is logged at ERROR and refused."""
    templates = tmp_path / "templates"
    shutil.copytree(shipped_templates_dir(), templates)
    relay = CaptureSMTPServer(ssl_context=relay_tls)
    request = SendRequest(to="user@example.com", template="welcome", vars={"name": "Ann"})
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve, "127.0.0.1", 0)
            env = subprocess_env(
                **relay_env(relay_port, ca_file, MAILER_TEMPLATES_DIR=str(templates))
            )
            async with start_service(["serve"], env, tmp_path) as service:
                port = int((await service.read_until(LISTENING)).group(1))
                (templates / "mail" / "welcome.msg").write_text(
                    "{# requires: name #}{% block subject %}Welcome, {{ name }}{% endblock %}"
                    "{% block text %}Hello {{ name }}{% endblock %}"
                )
                service.process.send_signal(signal.SIGHUP)
                await service.read_until(re.compile(rb"templates reloaded from .*welcome \(en\)"))
                (templates / "mail" / "welcome.msg").write_text("{% block subject %}{{ x ")
                service.process.send_signal(signal.SIGHUP)
                await service.read_until(
                    re.compile(rb"ERROR .*templates not reloaded, keeping the running ones")
                )
                async with open_channel("127.0.0.1", port) as channel:
                    reply = await MailerStub(channel).Send(request)
                    assert reply.sent
                await relay.wait_for_mails(1)
                service.process.send_signal(signal.SIGTERM)
                assert await service.finish() == 0, service.text
            nursery.cancel_scope.cancel()
    assert b"Subject: Welcome, Ann" in relay.received[0].data
    assert "welcome.msg:1: syntax error" in service.text
