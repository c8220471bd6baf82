"""The dev web inbox in a real browser: Debian's Chromium, headless, driven by Playwright.

``trio-mailer dev`` runs as a subprocess (its own relay, service and inbox, all on free ports);
the page is opened, a mail is sent through gRPC and must appear without a reload; opened, its
html part is rendered in the sandboxed iframe, and a script the mail carries must not have run.
A screenshot goes to ``test-artifacts/dev-inbox.png``.

Nothing downloads a browser: Playwright is pointed at ``/usr/bin/chromium`` (``.ci/run`` installs
it with apt). Without it the test is skipped, except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.v1.mailer_pb2 import MsgReply, SendRequest

from .helpers import subprocess_env

CHROMIUM = os.environ.get("MAILER_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
START_TIMEOUT_S = 60.0
BROWSER_TIMEOUT_MS = 30_000

# A template whose html block carries scripts of every kind; none may run in the inbox.
HOSTILE = """{# requires: code #}
{% block subject %}Hostile mail {{ code }}{% endblock %}
{% block text %}
Plain text {{ code }}
{% endblock %}
{% block html %}
<html><body>
<p id="visible">Rendered html part {{ code }}</p>
<script>document.body.setAttribute("data-script-ran", "yes");
fetch("/api/mails", {method: "DELETE"});</script>
<img src="x" onerror="document.body.setAttribute('data-onerror-ran', 'yes')" alt="">
<img src="http://192.0.2.1/remote.png" alt="remote image">
</body></html>
{% endblock %}
"""


def _browser_available() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run should have installed chromium")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")


class DevProcess:
    """``trio-mailer dev`` in a subprocess, with the ports read from its log."""

    def __init__(self, tmp_path: Path) -> None:
        templates = tmp_path / "templates"
        shutil.copytree(shipped_templates_dir(), templates)
        (templates / "mail" / "hostile.msg").write_text(HOSTILE, encoding="utf-8")
        env = subprocess_env(
            MAILER_SERVE_PORT="0",
            MAILER_METRICS_PORT="0",
            MAILER_TEMPLATES_DIR=str(templates),
            MAILER_SERVICENAME="Acme",
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_mailer",
                "dev",
                "--outbox",
                str(tmp_path / "outbox"),
                "--inbox-port",
                "0",
            ],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.grpc_port = 0
        self.inbox_port = 0
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.grpc_port and self.inbox_port):
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail("trio-mailer dev did not start:\n" + "".join(self.log))
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                self.grpc_port = int(match[1])
            if match := re.search(r"web inbox on http://127\.0\.0\.1:(\d+)/", line):
                self.inbox_port = int(match[1])

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)

    def send(self, template: str, code: str, locale: str = "") -> MsgReply:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            call = channel.unary_unary(
                "/trio_mailer.v1.Mailer/Send",
                request_serializer=SendRequest.SerializeToString,
                response_deserializer=MsgReply.FromString,
            )
            request = SendRequest(
                to="user@example.com", template=template, vars={"code": code}, locale=locale
            )
            reply: MsgReply = call(request, timeout=10)
            return reply

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[DevProcess]:
    process = DevProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()


def test_inbox_in_chromium_shows_mail_live_and_runs_no_script(dev_process: DevProcess) -> None:
    """Open the inbox, send through gRPC, see the mail appear live, open it: the html part is
    rendered in the sandboxed iframe and none of its scripts ran."""
    _browser_available()
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    base = f"http://127.0.0.1:{dev_process.inbox_port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(base + "/")
            expect(page.locator("#live")).to_have_text("live")
            expect(page.locator("#mails li")).to_have_count(0)

            # Sent after the page loaded: it must arrive by the event stream, no reload.
            assert dev_process.send("hostile", "<b>7</b>").sent
            assert dev_process.send("password", "739201", locale="ru").sent
            expect(page.locator("#mails li")).to_have_count(2)
            first = page.locator("#mails li").first
            expect(first).to_contain_text("Код для входа в Acme")  # newest first

            page.locator("#mails li", has_text="Hostile mail").locator("a").click()
            expect(page.locator("#subject")).to_have_text("Hostile mail <b>7</b>")
            frame_element = page.locator("#html-frame")
            expect(frame_element).to_have_attribute("sandbox", "")
            frame = page.frame_locator("#html-frame")
            expect(frame.locator("#visible")).to_have_text("Rendered html part <b>7</b>")
            body = frame.locator("body")
            expect(body).not_to_have_attribute("data-script-ran", "yes")
            expect(body).not_to_have_attribute("data-onerror-ran", "yes")

            page.locator("#tab-text").click()
            expect(page.locator("#text")).to_contain_text("Plain text <b>7</b>")
            page.locator("#tab-raw").click()
            expect(page.locator("#raw")).to_contain_text("Auto-Submitted: auto-generated")

            # The russian mail, for the screenshot and the README.
            page.locator("#mails li").first.locator("a").click()
            page.locator("#tab-html").click()
            expect(frame.locator("code")).to_have_text("739201")
            page.screenshot(path=str(ARTIFACTS / "dev-inbox.png"))

            # Had the hostile mail's fetch run, the inbox would be empty by now.
            with urllib.request.urlopen(base + "/api/mails", timeout=10) as reply:
                assert len(json.load(reply)) == 2

            page.locator("#clear").click()
            expect(page.locator("#mails li")).to_have_count(0)
            assert page_errors == []
        finally:
            browser.close()
