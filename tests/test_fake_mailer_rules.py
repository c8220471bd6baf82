"""FakeMailer refuses exactly what the service refuses, with the same status and detail.

Random sends (``Send``, ``SendPass``, ``SendRetrieve``: any ``to``, code, template, variables,
locale, idempotency key) go through a ``FakeMailer`` and through the service, and the outcomes
must be equal, details included: many against the service's pure core (``MailComposer``, the
checks its handlers run), and a sample against the running service in-process (gRPC, the
request size limit, admission, idempotency keys), through the real client.
"""

from __future__ import annotations

import shutil
import uuid
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import trio_mailer_client
from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.http2_limits import MAX_MESSAGE_BYTES
from trio_mailer.core.message import MailComposer
from trio_mailer.core.rendering import MailKind, MailTemplates
from trio_mailer.v1.mailer_pb2 import MsgRequest, SendRequest
from trio_mailer_client import MailerError, Refused
from trio_mailer_client.testing import FakeMailer

from .helpers import NOW
from .strategies import ADDRESS, CODE, PLAIN_ADDRESS, TEXT

WELCOME = """{# requires: name #}
{% block subject %}Welcome{% endblock %}
{% block text %}Hello {{ name }}{% endblock %}
"""
FAKE_TEMPLATES = {"welcome": ["name"]}  # the shipped ones, and this: as in templates_dir


@attrs.frozen
class Request:
    """One send as a caller makes it."""

    method: str  # "Send", "SendPass" or "SendRetrieve"
    to: str
    template: str  # SendPass/SendRetrieve: their template, with vars {"code": ...}
    vars: dict[str, str]
    locale: str

    async def send(self, mailer: trio_mailer_client.Mailer | FakeMailer, key: str | None) -> object:
        options = {"locale": self.locale or None, "idempotency_key": key}
        if self.method == "Send":
            return await mailer.send(self.to, self.template, self.vars, **options)
        send_code = mailer.send_pass if self.method == "SendPass" else mailer.send_retrieve
        return await send_code(self.to, self.vars["code"], **options)

    def message(self) -> SendRequest | MsgRequest:
        """The request message the service decodes (with a key as long as the client's)."""
        key = "k" * 22
        if self.method == "Send":
            return SendRequest(
                to=self.to,
                template=self.template,
                vars=self.vars,
                locale=self.locale,
                idempotency_key=key,
            )
        return MsgRequest(
            to=self.to, code=self.vars["code"], locale=self.locale, idempotency_key=key
        )


def code_request(method: str, to: str, code: str, locale: str) -> Request:
    return Request(
        method, to, "password" if method == "SendPass" else "retrieve", {"code": code}, locale
    )


LONG_VALUE = st.sampled_from([127, 128, 129, 999, 1000, 1001]).map(lambda n: "x" * n)
VALUE = st.one_of(CODE, LONG_VALUE, st.just("😀" * 1000))
VAR_NAME = st.one_of(
    st.sampled_from(["code", "name", "to", "service_name", "_x", "x1", "1x", "a" * 65]), TEXT
)
VARS = st.one_of(
    st.dictionaries(VAR_NAME, VALUE, max_size=4),
    st.integers(31, 34).map(lambda n: {f"v{i}": "1" for i in range(n)}),
)
TEMPLATE = st.one_of(
    st.sampled_from(["password", "retrieve", "welcome", "no-such", "Password", "", "a" * 70]), TEXT
)
LOCALE = st.one_of(
    st.sampled_from(
        ["", "en", "ru", "pt-BR", "pt_br", "x", "../x", "de-CH-1901", "zz-" + "a" * 33]
    ),
    TEXT,
)
REQUEST = st.one_of(
    st.builds(code_request, st.sampled_from(["SendPass", "SendRetrieve"]), ADDRESS, CODE, LOCALE),
    st.builds(Request, st.just("Send"), ADDRESS, TEMPLATE, VARS, LOCALE),
    # Sends that are valid but for one field at most, so that acceptance is explored too.
    st.builds(
        lambda to, code, locale: Request("Send", to, "password", {"code": code}, locale),
        PLAIN_ADDRESS,
        VALUE,
        LOCALE,
    ),
    st.builds(
        lambda to, name: Request("Send", to, "welcome", {"name": name}, "ru"), PLAIN_ADDRESS, VALUE
    ),
)
# The issue's cases: codes the fake took and the service refused; an address worded otherwise.
ISSUE_CASES = [
    code_request("SendPass", "user@example.com", "1" * 129, ""),
    code_request("SendPass", "user@example.com", "12\n34", ""),
    code_request("SendRetrieve", "user@example.com", "=?x", ""),
    code_request("SendPass", "user@localhost", "1", ""),
    code_request("SendPass", "a@example.com; b@example.com; c@example.com", "1", ""),
    Request("Send", "user@example.com", "welcome", {"name": "Ann", "code": "1"}, ""),
    Request("Send", "user@example.com", "password", {}, "../x"),
    code_request("SendPass", "x" * 41, "1", ""),  # shown cut at 40 characters
]


async def outcome(
    mailer: trio_mailer_client.Mailer | FakeMailer, request: Request, key: str | None = None
) -> tuple[str, ...]:
    """What a caller sees: accepted, refused with a reason, or an error with its detail."""
    try:
        result = await request.send(mailer, key)
    except MailerError as exc:
        return ("error", exc.code, exc.details)
    return ("refused", result.reason) if isinstance(result, Refused) else ("accepted",)


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped templates and ``welcome`` (requires: name)."""
    root = tmp_path_factory.mktemp("templates")
    shutil.copytree(shipped_templates_dir(), root, dirs_exist_ok=True)
    (root / "mail" / "welcome.msg").write_text(WELCOME)
    return root


@pytest.fixture(scope="module")
def composer(templates_dir: Path) -> MailComposer:
    return MailComposer(MailTemplates.load(templates_dir), "noreply@example.com", "Acme")


def core_outcome(composer: MailComposer, request: Request) -> tuple[str, ...]:
    """What the service's handlers answer a request its front let through."""
    try:
        if request.method == "Send":
            composer.compose_template(
                request.template, request.to, request.vars, NOW, locale=request.locale
            )
        else:
            kind = MailKind(request.template)
            composer.compose(kind, request.to, request.vars["code"], NOW, locale=request.locale)
    except InvalidRequest as exc:
        return ("error", "INVALID_ARGUMENT", exc.message)
    return ("accepted",)


@settings(max_examples=600, deadline=None)
@given(request=REQUEST)
@example(request=ISSUE_CASES[0])
@example(request=ISSUE_CASES[1])
@example(request=ISSUE_CASES[2])
@example(request=ISSUE_CASES[3])
@example(request=ISSUE_CASES[4])
@example(request=ISSUE_CASES[5])
@example(request=ISSUE_CASES[6])
@example(request=ISSUE_CASES[7])
def test_the_fake_answers_as_the_service_core(composer: MailComposer, request: Request) -> None:
    """Accepted by both, or refused by both with the same INVALID_ARGUMENT detail."""
    # The request size limit is the gRPC front's: the running service's test covers it.
    assume(request.message().ByteSize() <= MAX_MESSAGE_BYTES - 64)
    fake = FakeMailer(templates=FAKE_TEMPLATES, recipient_limit=0)
    assert trio.run(outcome, fake, request) == core_outcome(composer, request)


CALLS = st.lists(
    st.tuples(st.one_of(REQUEST, st.sampled_from(ISSUE_CASES)), st.sampled_from([None, "a", "b"])),
    min_size=1,
    max_size=4,
)
REQUEST_OK = code_request("SendPass", "user@example.com", "123456", "")
TOO_LARGE = Request("Send", "user@example.com", "password", {"code": "😀" * 1000}, "")


def compare_with_the_service(mailer: trio_mailer_client.Mailer) -> None:
    """Hypothesis in a worker thread; each example's calls run in the test's Trio loop."""

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(calls=CALLS)
    @example(calls=[(TOO_LARGE, None)])
    @example(calls=[(ISSUE_CASES[0], "a"), (ISSUE_CASES[0], "a")])
    @example(calls=[(ISSUE_CASES[5], "a"), (REQUEST_OK, "a"), (REQUEST_OK, "a")])
    @example(calls=[(REQUEST_OK, "a"), (attrs.evolve(REQUEST_OK, locale="ru"), "a")])
    def check(calls: list[tuple[Request, str | None]]) -> None:
        prefix = uuid.uuid4().hex  # keys of this example only: the service keeps them all
        keyed = [(request, None if key is None else f"{prefix}-{key}") for request, key in calls]
        fake = FakeMailer(templates=FAKE_TEMPLATES, recipient_limit=0)
        for request, key in keyed:
            answers = trio.from_thread.run(_both, fake, mailer, request, key)
            assert answers[0] == answers[1], request

    check()


async def _both(
    fake: FakeMailer, mailer: trio_mailer_client.Mailer, request: Request, key: str | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return await outcome(fake, request, key), await outcome(mailer, request, key)


async def test_the_fake_answers_as_the_running_service(start_harness, templates_dir: Path) -> None:
    """A sample of random sends, repeats and key reuses through the real client: the same
    outcome and detail from the fake and the service."""
    env = {"MAILER_TEMPLATES_DIR": str(templates_dir), "MAILER_QUEUE_SIZE": "1000"}
    with trio.fail_after(600):
        async with start_harness(env=env) as h:
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{h.grpc_port}") as mailer:
                await trio.to_thread.run_sync(partial(compare_with_the_service, mailer))
