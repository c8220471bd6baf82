"""The dev web inbox in a real browser: Debian's Chromium, headless, driven by Playwright.

``trio-mailer dev`` runs as a subprocess (its own relay, service and inbox, all on free ports);
the page is opened, a mail is sent through gRPC and must appear without a reload; opened, its
html part is rendered in the sandboxed iframe, and a script the mail carries must not have run.
Then the developer's day: search, a deep link, the service's status of a mail, deleting one,
and relay faults set from the page (chaos) seen through to the mail's second attempt; at
1280 px and at 400 px, with no page scrollbar. Screenshots go to ``test-artifacts/``.

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
from typing import TYPE_CHECKING, Any

import attrs
import grpc
import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.v1.mailer_pb2 import MsgReply, SendRequest

from .helpers import subprocess_env

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

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
            MAILER_RETRY_BASE_S="0.2",  # the retry after a chaos refusal comes soon
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

    def send(
        self, template: str, code: str, locale: str = "", to: str = "user@example.com"
    ) -> MsgReply:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            call = channel.unary_unary(
                "/trio_mailer.v1.Mailer/Send",
                request_serializer=SendRequest.SerializeToString,
                response_deserializer=MsgReply.FromString,
            )
            request = SendRequest(to=to, template=template, vars={"code": code}, locale=locale)
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


@pytest.fixture
def browser() -> Iterator[Browser]:
    _browser_available()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
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
            yield chromium
        finally:
            chromium.close()


MAIL_FRAME = re.compile(r"/api/mails/\d+/html$")


@attrs.define
class Opened:
    page: Page
    errors: list[str]  # the page's script errors and failed loads (a 404 favicon would be one)
    blocked: list[str]  # what the browser refused a mail's html part (its scripts, images)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            url = message.location.get("url", "")
            (self.blocked if MAIL_FRAME.search(url) else self.errors).append(
                f"{url}: {message.text}"
            )


def open_inbox(browser: Browser, url: str, width: int = 1280, height: int = 900) -> Opened:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    opened = Opened(page, [], [])
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.on("console", lambda message: opened.on_console(message))
    page.goto(url)
    from playwright.sync_api import expect

    expect(page.locator("#live")).to_have_text("live")
    return opened


def assert_fits(page: Page) -> None:
    """No page scrollbar either way: the panes scroll, never the page."""
    size = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.scrollHeight,"
        " window.innerWidth, window.innerHeight]"
    )
    assert size[0] <= size[2] and size[1] <= size[3], size


def api(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as reply:
        return json.load(reply)


def test_inbox_in_chromium_shows_mail_live_and_runs_no_script(
    dev_process: DevProcess, browser: Browser
) -> None:
    """Open the inbox, send through gRPC, see the mail appear live, open it: the html part is
    rendered in the sandboxed iframe and none of its scripts ran."""
    from playwright.sync_api import expect

    base = f"http://127.0.0.1:{dev_process.inbox_port}"
    opened = open_inbox(browser, base + "/", height=860)
    page = opened.page
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
    expect(page.locator("#status")).to_contain_text("DELIVERED")
    assert_fits(page)
    page.screenshot(path=str(ARTIFACTS / "dev-inbox.png"))

    # Had the hostile mail's fetch run, the inbox would be empty by now.
    assert len(api(base, "/api/mails")) == 2

    page.locator("#clear").click()
    expect(page.locator("#mails li")).to_have_count(0)
    assert opened.errors == [], "\n".join(opened.errors)
    assert any("Blocked script execution" in line for line in opened.blocked), opened.blocked


def test_search_deep_link_delete_and_chaos_in_chromium(
    dev_process: DevProcess, browser: Browser
) -> None:
    """Search narrows the list; a selection is a deep link (/#/mails/{id}) that opens the mail
    in a fresh page, with the service's status; a mail is deleted from the page; relay faults
    set from the page refuse the next mail once, which the page shows delivered on its second
    attempt. At 1280 and 400 px wide the page never scrolls."""
    from playwright.sync_api import expect

    base = f"http://127.0.0.1:{dev_process.inbox_port}"
    assert dev_process.send("password", "111111", to="alice@example.com").sent
    assert dev_process.send("retrieve", "222222", to="bob@example.com").sent
    opened = open_inbox(browser, base + "/")
    page = opened.page
    mails = page.locator("#mails li")
    expect(mails).to_have_count(2)

    page.locator("#search").fill("BOB@example")
    expect(mails).to_have_count(1)
    expect(mails.first).to_contain_text("bob@example.com")
    page.locator("#search").fill("")
    expect(mails).to_have_count(2)

    # The URL follows the selection; the link opens the same mail in a page of its own.
    mails.filter(has_text="alice@example.com").locator("a").click()
    alice = next(m for m in api(base, "/api/mails") if m["to"] == "alice@example.com")
    expect(page).to_have_url(f"{base}/#/mails/{alice['id']}")
    linked = open_inbox(browser, f"{base}/#/mails/{alice['id']}")
    expect(linked.page.locator("#subject")).to_have_text(alice["subject"])
    expect(linked.page.locator("#status")).to_contain_text("DELIVERED")
    expect(linked.page.locator("#status")).to_contain_text("1 attempt")
    assert_fits(linked.page)
    linked.page.close()

    # Delete the one shown: gone from the list, the file and the URL.
    page.locator("#delete").click()
    expect(mails).to_have_count(1)
    expect(page).to_have_url(f"{base}/#/")
    assert [m["to"] for m in api(base, "/api/mails")] == ["bob@example.com"]

    # Chaos from the page: the next mail is refused once at RCPT, then delivered.
    page.locator("#chaos-summary").click()
    page.locator("#chaos-stage").select_option("rcpt")
    page.locator("#chaos-reply").fill("451 4.3.0 try again later")
    page.locator("#chaos-count").fill("1")
    page.locator("#chaos-apply").click()
    expect(page.locator("#chaos-summary")).to_contain_text("rcpt: 451 4.3.0 try again later")
    assert api(base, "/api/chaos") == {
        "stage": "rcpt",
        "reply": "451 4.3.0 try again later",
        "count": 1,
    }
    page.locator("#chaos-count").fill("x")
    page.locator("#chaos-apply").click()
    expect(page.locator("#chaos-error")).to_contain_text("count: expected a whole number")
    reply = dev_process.send("password", "333333", to="carol@example.com")
    assert reply.sent
    expect(page.locator("#chaos-summary")).to_contain_text("off")
    carol = mails.filter(has_text="carol@example.com")
    expect(carol).to_contain_text("DELIVERED")
    carol.locator("a").click()
    expect(page.locator("#status")).to_contain_text("2 attempts")
    expect(page.locator("#meta")).to_contain_text(reply.message_id)
    assert_fits(page)
    page.screenshot(path=str(ARTIFACTS / "dev-inbox-chaos.png"))

    # 400 px wide: the list, then the mail with a way back; still no page scrollbar.
    narrow = open_inbox(browser, base + "/", width=400, height=800)
    expect(narrow.page.locator("#mails li")).to_have_count(2)
    assert_fits(narrow.page)
    narrow.page.locator("#mails li").first.locator("a").click()
    expect(narrow.page.locator("#subject")).to_be_visible()
    expect(narrow.page.locator("#mails")).to_be_hidden()
    assert_fits(narrow.page)
    narrow.page.screenshot(path=str(ARTIFACTS / "dev-inbox-400.png"))
    narrow.page.locator("#back").click()
    expect(narrow.page.locator("#mails")).to_be_visible()
    assert linked.errors == narrow.errors == []
    [refused] = opened.errors  # the browser logs the 400 the bad count got, and nothing else
    assert refused.endswith(
        "/api/chaos: Failed to load resource: the server responded with a status of "
        "400 (Bad Request)"
    )
