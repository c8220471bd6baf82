"""trio_mailer_client.testing.FakeMailer: its own behaviour on the mock clock, and the same
scripted cases run against it and against the real service (a subprocess), with one result."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_mailer_client
from trio_mailer_client import Accepted, MailerError, MailKind, MailState, Refused
from trio_mailer_client.testing import FakeMailer, SentMail

from .helpers import relay_and_service

# ---- the fake on its own, on the mock clock ------------------------------------------------------


async def test_records_every_mail(autojump_clock: trio.testing.MockClock) -> None:
    """Each accepted mail is recorded with to, kind, code and key."""
    fake = FakeMailer()
    first = await fake.send_pass("user@example.com", "111", idempotency_key="k1")
    second = await fake.send_retrieve("other@example.com", "222")
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert fake.mails == [
        SentMail("user@example.com", "password", {"code": "111"}, "", "k1", first.message_id),
        SentMail(
            "other@example.com",
            "retrieve",
            {"code": "222"},
            "",
            second.idempotency_key,
            second.message_id,
        ),
    ]
    assert [(mail.kind, mail.code) for mail in fake.mails] == [
        (MailKind.PASSWORD, "111"),
        (MailKind.RETRIEVE, "222"),
    ]


async def test_send_takes_the_templates_the_fake_was_given(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """send(to, template, vars, locale=...) with a template of one's own and its declared
    variables; a variable it does not declare is INVALID_ARGUMENT naming it."""
    fake = FakeMailer(templates={"welcome": ["name", "link"]})
    variables = {"name": "Ann", "link": "https://example.com/a"}
    result = await fake.send("ann@example.com", "welcome", variables, locale="ru")
    assert isinstance(result, Accepted)
    [mail] = fake.mails
    assert (mail.template, mail.vars, mail.locale, mail.kind) == ("welcome", variables, "ru", None)
    with pytest.raises(MailerError) as info:
        await fake.send("ann@example.com", "welcome", {"name": "Ann"})
    assert (info.value.code, info.value.details) == (
        "INVALID_ARGUMENT",
        "vars.link: template 'welcome' requires it, got nothing",
    )
    with pytest.raises(MailerError) as unknown:
        await fake.send("ann@example.com", "goodbye", {})
    assert unknown.value.details == (
        "template: unknown template 'goodbye' (known: password, retrieve, welcome)"
    )
    assert (await fake.send_pass("ann@example.com", "1", locale="pt-BR")).sent
    assert fake.mails[-1].locale == "pt-BR"


@pytest.mark.parametrize(
    ("code", "detail"),
    [
        ("1" * 129, "code: expected at most 128 characters, got 129"),
        ("12\n34", "code: control character '\\n' is not allowed"),
        ("=?x", "code: '=?' (an RFC 2047 encoded-word opener) is not allowed"),
    ],
)
async def test_codes_the_service_refuses_are_refused(
    code: str, detail: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The issue's codes: over 128 characters, a line break, an encoded-word opener."""
    with pytest.raises(MailerError) as info:
        await FakeMailer().send_pass("user@example.com", code)
    assert (info.value.code, info.value.details) == ("INVALID_ARGUMENT", detail)


@pytest.mark.parametrize(
    "templates",
    [
        {"Welcome": ["name"]},
        {"welcome": ["to"]},
        {"welcome": ["1st"]},
        {"x": [f"v{n}" for n in range(33)]},
    ],
)
def test_a_template_the_service_would_refuse_is_refused(templates: dict[str, list[str]]) -> None:
    """A name or a declaration the service would not load: ValueError at construction."""
    with pytest.raises(ValueError, match="template"):
        FakeMailer(templates=templates)


async def test_same_key_same_mail_answers_the_first_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A repeat with the key sends nothing; another mail with it is FAILED_PRECONDITION."""
    fake = FakeMailer()
    first = await fake.send_pass("user@example.com", "1", idempotency_key="key")
    assert await fake.send_pass("user@example.com", "1", idempotency_key="key") == first
    with pytest.raises(MailerError) as info:
        await fake.send_pass("user@example.com", "2", idempotency_key="key")
    assert info.value.code == "FAILED_PRECONDITION"
    assert "idempotency_key" in info.value.details
    assert len(fake.mails) == 1


async def test_a_refused_call_does_not_use_up_its_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """refuse_next: a Refused with retry_after; the same key is accepted afterwards."""
    fake = FakeMailer()
    fake.refuse_next(reason="queue full", retry_after=2.0)
    refused = await fake.send_pass("user@example.com", "1", idempotency_key="key")
    assert refused == Refused("queue full", 2.0, "key")
    assert (await fake.send_pass("user@example.com", "1", idempotency_key="key")).sent
    assert len(fake.mails) == 1


async def test_recipient_limit_refuses_the_sixth_and_accepts_after_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """5 per 600 s per normalised address; the sixth says when, and is accepted then."""
    fake = FakeMailer()
    for n in range(5):
        assert (await fake.send_pass("User@Example.COM", str(n))).sent
        await trio.sleep(10)
    sixth = await fake.send_retrieve("user@example.com", "6")
    assert isinstance(sixth, Refused) and sixth.reason == "recipient rate limited"
    assert sixth.retry_after == pytest.approx(600 - 50)
    assert sixth.retry_after is not None
    await trio.sleep(sixth.retry_after - 1)
    assert not (await fake.send_pass("user@example.com", "7")).sent
    await trio.sleep(1)
    assert (await fake.send_pass("user@example.com", "8")).sent


async def test_unavailable_is_retried_with_the_same_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two UNAVAILABLE attempts, then accepted: one mail, three attempts, one key."""
    fake = FakeMailer()
    fake.fail_next(2, code="UNAVAILABLE")
    result = await fake.send_pass("user@example.com", "1")
    assert result.sent
    assert fake.attempts == 3
    assert [mail.idempotency_key for mail in fake.mails] == [result.idempotency_key]


async def test_failures_that_outlast_the_timeout_raise_the_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """UNAVAILABLE until the timeout is used up: the error, after about ``timeout``."""
    fake = FakeMailer()
    fake.fail_next(1000, code="UNAVAILABLE")
    start = trio.current_time()
    with pytest.raises(MailerError) as info:
        await fake.send_pass("user@example.com", "1", timeout=5.0)
    assert info.value.code == "UNAVAILABLE"
    assert info.value.attempts > 3
    assert 4.0 <= trio.current_time() - start <= 5.0
    assert fake.mails == []


async def test_a_final_status_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    """fail_next with UNAUTHENTICATED: raised at once, one attempt."""
    fake = FakeMailer()
    fake.fail_next(code="UNAUTHENTICATED", details="missing token")
    with pytest.raises(MailerError) as info:
        await fake.send_pass("user@example.com", "1")
    assert (info.value.code, info.value.details, info.value.attempts) == (
        "UNAUTHENTICATED",
        "missing token",
        1,
    )


async def test_watch_follows_the_mail_until_the_test_delivers_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """watch yields QUEUED, then DELIVERED when the test says so, then ends."""
    fake = FakeMailer()
    result = await fake.send_pass("user@example.com", "1")
    assert isinstance(result, Accepted)
    seen: list[MailState] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            async with aclosing(fake.watch(result.message_id)) as changes:
                async for status in changes:
                    seen.append(status.state)

        nursery.start_soon(watch)
        await trio.sleep(1)
        fake.deliver(result.message_id)
    assert seen == [MailState.QUEUED, MailState.DELIVERED]
    status = await fake.status(idempotency_key=result.idempotency_key)
    assert status.finished_at is not None


# ---- the same script against the fake and the service -------------------------------------------


def outcome(result: Any) -> tuple[str, ...]:
    """What a caller's code branches on: accepted, refused with a reason, or an error code."""
    if isinstance(result, Accepted):
        return ("accepted",)
    if isinstance(result, Refused):
        return ("refused", result.reason, "advice" if result.retry_after else "no advice")
    if isinstance(result, MailerError):
        return ("error", result.code)
    if isinstance(result, trio_mailer_client.MailStatus):
        return ("status", "known")
    raise AssertionError(result)


async def run(step: Awaitable[Any]) -> tuple[str, ...]:
    try:
        return outcome(await step)
    except MailerError as exc:
        return outcome(exc)


Backend = Callable[[], Any]


@pytest.fixture(params=["fake", "service"])
def open_backend(
    request: pytest.FixtureRequest, relay_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> Callable[[], Any]:
    """``async with open_backend() as mailer``: a FakeMailer, or a client to the real service."""

    @asynccontextmanager
    async def open_it() -> AsyncIterator[Any]:
        if request.param == "fake":
            yield FakeMailer()
            return
        outbox = str(tmp_path / "outbox.sqlite3")
        # The service's default limit (the tests' relay_env turns it off).
        limit = {"MAILER_RECIPIENT_LIMIT": "5/600"}
        async with relay_and_service(
            relay_tls, ca_file, tmp_path, MAILER_OUTBOX=outbox, **limit
        ) as (
            _relay,
            _service,
            port,
        ):
            async with trio_mailer_client.open_mailer(f"127.0.0.1:{port}") as mailer:
                yield mailer

    return open_it


async def test_fake_and_service_agree_on_sends_errors_and_status(open_backend) -> None:
    """Accepted, INVALID_ARGUMENT for a list or an empty code, status by id without brackets,
    NOT_FOUND for an unknown id."""
    with trio.fail_after(60):
        async with open_backend() as mailer:
            accepted = await mailer.send_pass("user@example.com", "1")
            got = [
                outcome(accepted),
                await run(mailer.send_pass("a@example.com, b@example.com", "1")),
                await run(mailer.send_retrieve("user@example.com", "")),
                await run(mailer.status(accepted.message_id.strip("<>"))),
                await run(mailer.status("<nobody@example.com>")),
            ]
    assert got == [
        ("accepted",),
        ("error", "INVALID_ARGUMENT"),
        ("error", "INVALID_ARGUMENT"),
        ("status", "known"),
        ("error", "NOT_FOUND"),
    ]


async def test_fake_and_service_agree_on_keys_and_the_recipient_limit(open_backend) -> None:
    """The same key twice is one mail; a key reused for another mail is FAILED_PRECONDITION;
    the sixth mail to one address in 600 s is refused with advice."""
    with trio.fail_after(60):
        async with open_backend() as mailer:
            first = await mailer.send_pass("limit@example.com", "1", idempotency_key="k-1")
            again = await mailer.send_pass("limit@example.com", "1", idempotency_key="k-1")
            got = [
                await run(mailer.send_pass("limit@example.com", "2", idempotency_key="k-1")),
                *[await run(mailer.send_pass("Limit@example.com", str(n))) for n in range(4)],
                await run(mailer.send_retrieve("limit@EXAMPLE.com", "9")),
            ]
    assert again == first
    assert got == [
        ("error", "FAILED_PRECONDITION"),
        ("accepted",),
        ("accepted",),
        ("accepted",),
        ("accepted",),
        ("refused", "recipient rate limited", "advice"),
    ]
