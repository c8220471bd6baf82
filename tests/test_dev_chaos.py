"""Relay faults on demand (``PUT /api/chaos``): the body's checks and the countdown, no I/O."""

from __future__ import annotations

import pytest

from trio_mailer.dev.chaos import OFF, Chaos, ChaosError, parse_chaos

TRY_LATER = "451 4.3.0 try again later"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"stage": "rcpt", "reply": "451 4.3.0 try again later", "count": 3}',
            Chaos("rcpt", TRY_LATER, 3),
        ),
        (
            b'{"stage": "connect", "reply": "421 4.3.2 going down"}',
            Chaos("connect", "421 4.3.2 going down", 1),
        ),
        (
            b'{"stage": "data", "reply": "554 5.7.1 spam", "count": 1000}',
            Chaos("data", "554 5.7.1 spam", 1000),
        ),
        (b'{"stage": "mail", "reply": "550 5.7.1 no"}', Chaos("mail", "550 5.7.1 no", 1)),
        (b'{"count": 0}', OFF),
        (b'{"stage": "rcpt", "reply": "451 4.3.0 x", "count": 0}', OFF),
    ],
)
def test_a_valid_body_is_the_chaos_it_names(body: bytes, expected: Chaos) -> None:
    assert parse_chaos(body) == expected


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "body: expected a JSON object, got invalid JSON"),
        (b"[1]", "body: expected a JSON object, got an array"),
        (b"", "body: expected a JSON object, got invalid JSON"),
        (
            b'{"stage": "helo", "reply": "451 x"}',
            'stage: expected one of connect, mail, rcpt, data, got "helo"',
        ),
        (b'{"reply": "451 x", "count": 2}', "stage: required when count is above 0"),
        (b'{"stage": "rcpt", "count": 2}', "reply: required when count is above 0"),
        (
            b'{"stage": "rcpt", "reply": "250 2.0.0 ok"}',
            'reply: expected a 4xx or 5xx reply such as "451 4.3.0 try again later", '
            'got "250 2.0.0 ok"',
        ),
        (
            b'{"stage": "rcpt", "reply": "451"}',
            'reply: expected a 4xx or 5xx reply such as "451 4.3.0 try again later", got "451"',
        ),
        (
            b'{"stage": "rcpt", "reply": "451 a\\r\\n250 ok"}',
            "reply: expected one line of printable ASCII, got a control character",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 caf\\u00e9"}',
            "reply: expected one line of printable ASCII, got a non-ASCII character",
        ),
        (
            b'{"stage": "rcpt", "reply": 451}',
            'reply: expected a string such as "451 4.3.0 try again later", got 451',
        ),
        (
            b'{"stage": "rcpt", "reply": "451 ' + b"x" * 600 + b'"}',
            "reply: expected at most 512 characters, got 604",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "count": -1}',
            "count: expected a whole number from 0 to 1000, got -1",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "count": 1001}',
            "count: expected a whole number from 0 to 1000, got 1001",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "count": "3"}',
            'count: expected a whole number from 0 to 1000, got "3"',
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "count": true}',
            "count: expected a whole number from 0 to 1000, got true",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "count": 1.5}',
            "count: expected a whole number from 0 to 1000, got 1.5",
        ),
        (
            b'{"stage": "rcpt", "reply": "451 x", "times": 2}',
            "times: unknown field (known: stage, reply, count)",
        ),
    ],
)
def test_a_bad_body_is_refused_naming_the_field(body: bytes, error: str) -> None:
    with pytest.raises(ChaosError) as caught:
        parse_chaos(body)
    assert str(caught.value).startswith(error), str(caught.value)


def test_chaos_answers_only_its_stage_and_counts_down_to_off() -> None:
    """Each answer at its stage uses one of the count; at 0 it is off; other stages pass."""
    chaos = Chaos("rcpt", TRY_LATER, 2)
    assert chaos.take("MAIL") == (None, chaos)
    assert chaos.take("DOT") == (None, chaos)
    reply, chaos = chaos.take("RCPT")
    assert (reply, chaos) == (TRY_LATER, Chaos("rcpt", TRY_LATER, 1))
    reply, chaos = chaos.take("RCPT")
    assert (reply, chaos) == (TRY_LATER, OFF)
    assert OFF.take("RCPT") == (None, OFF)


@pytest.mark.parametrize(
    ("stage", "command"),
    [("connect", "GREETING"), ("mail", "MAIL"), ("rcpt", "RCPT"), ("data", "DOT")],
)
def test_each_stage_is_one_relay_reply(stage: str, command: str) -> None:
    """connect: the greeting; mail, rcpt: those commands; data: the reply after the final "."."""
    assert Chaos(stage, TRY_LATER, 1).take(command) == (TRY_LATER, OFF)


def test_chaos_as_json() -> None:
    assert Chaos("data", TRY_LATER, 2).to_json() == {
        "stage": "data",
        "reply": TRY_LATER,
        "count": 2,
    }
    assert OFF.to_json() == {"stage": None, "reply": None, "count": 0}
