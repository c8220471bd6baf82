"""The pure admission rules: keys and fingerprints, rate-limit arithmetic, addresses, the
suppression classifier, the senders' pace."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core.addresses import mask, normalise
from trio_mailer.core.caller_auth import TokenSet, certificate_identity
from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.idempotency import (
    MAX_KEY_CHARS,
    payload_fingerprint,
    validate_idempotency_key,
)
from trio_mailer.core.rate_limits import (
    PACE_DEFAULT_S,
    Pace,
    RateLimit,
    SlidingWindow,
    retry_after_ms,
)
from trio_mailer.core.suppression import RelayReply, enhanced_status, is_dead_address, parse_reply


def test_an_empty_key_means_none() -> None:
    assert validate_idempotency_key("") is None


@pytest.mark.parametrize("key", ["a", "order-42/reset#1", " spaced key ", "~" * MAX_KEY_CHARS])
def test_printable_ascii_keys_up_to_256_are_taken_as_they_are(key: str) -> None:
    assert validate_idempotency_key(key) == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("x" * (MAX_KEY_CHARS + 1), "expected at most 256 characters, got 257"),
        ("ab\ncd", "expected printable ASCII characters only, got U+000A at position 2"),
        ("clé", "expected printable ASCII characters only, got U+00E9 at position 2"),
        ("\x7f", "expected printable ASCII characters only, got U+007F at position 0"),
    ],
)
def test_bad_keys_are_refused_naming_the_field(key: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_idempotency_key(key)
    assert info.value.field == "idempotency_key"
    assert info.value.message == f"idempotency_key: {problem}"


def test_the_fingerprint_tells_every_field_and_the_method_apart() -> None:
    base = payload_fingerprint("password", [("to", "a@x.example"), ("code", "1")])
    assert base == payload_fingerprint("password", [("to", "a@x.example"), ("code", "1")])
    others = {
        payload_fingerprint("retrieve", [("to", "a@x.example"), ("code", "1")]),
        payload_fingerprint("password", [("to", "b@x.example"), ("code", "1")]),
        payload_fingerprint("password", [("to", "a@x.example"), ("code", "2")]),
        # The boundaries between values count: "1" + "" is not "" + "1".
        payload_fingerprint("password", [("to", "a@x.example1"), ("code", "")]),
    }
    assert base not in others and len(others) == 4


@given(
    st.lists(st.text(max_size=5), min_size=2, max_size=2),
    st.lists(st.text(max_size=5), min_size=2, max_size=2),
)
def test_different_field_values_never_share_a_fingerprint(a: list[str], b: list[str]) -> None:
    fa = payload_fingerprint("m", [("to", a[0]), ("code", a[1])])
    fb = payload_fingerprint("m", [("to", b[0]), ("code", b[1])])
    assert (fa == fb) == (a == b)


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("5/600", RateLimit(5, 600.0)),
        (" 100 / 1 ", RateLimit(100, 1.0)),
        ("3/0.5", RateLimit(3, 0.5)),
    ],
)
def test_rate_limit_specs_parse(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit


def test_zero_turns_a_limit_off() -> None:
    assert RateLimit.parse("0") is None


@pytest.mark.parametrize("text", ["5", "0/600", "5/0", "5/-1", "a/b", "5/600/1", "5/9999999999"])
def test_bad_rate_limit_specs_say_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected COUNT/SECONDS such as 5/600"):
        RateLimit.parse(text)


def test_the_sixth_in_the_window_waits_for_the_first_to_leave_it() -> None:
    """5/600: five at t=0,10,20,30,40; at t=50 the sixth waits 550 s (the first leaves at 600)."""
    window = SlidingWindow(RateLimit(5, 600.0))
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        assert window.retry_after_s("a", t) == 0.0
        window.reserve("a", t)
    assert window.retry_after_s("a", 50.0) == 550.0
    assert window.retry_after_s("b", 50.0) == 0.0  # another subject is not affected
    assert window.retry_after_s("a", 600.0) == 0.0  # the first has left
    window.reserve("a", 600.0)
    assert window.retry_after_s("a", 600.0) == 10.0  # now the one at t=10 must go


def test_a_released_reservation_frees_its_slot_and_prune_forgets_quiet_subjects() -> None:
    window = SlidingWindow(RateLimit(1, 60.0))
    window.reserve("a", 5.0)
    assert window.retry_after_s("a", 6.0) == 59.0
    window.release("a", 5.0)
    assert window.retry_after_s("a", 6.0) == 0.0
    window.reserve("b", 5.0)
    window.reserve("c", 50.0)
    assert window.prune(70.0) == 1 and len(window) == 1  # b left; c stays until 110


def test_out_of_order_reservations_stay_sorted() -> None:
    window = SlidingWindow(RateLimit(2, 100.0))
    for t in (30.0, 10.0, 20.0):
        window.reserve("a", t)
    assert window.retry_after_s("a", 40.0) == 80.0  # the 2nd newest (20) leaves at 120


@given(st.lists(st.floats(0, 1000, allow_nan=False), max_size=30), st.floats(0, 2000))
def test_waiting_retry_after_always_makes_room(times: list[float], now: float) -> None:
    """After waiting what retry_after_s says, one more is allowed; never before."""
    window = SlidingWindow(RateLimit(3, 100.0))
    for t in sorted(times):
        window.reserve("a", t)
    wait = window.retry_after_s("a", now)
    assert wait >= 0.0
    if wait > 0.001:  # (asked in time order: the window forgets what has left it)
        assert window.retry_after_s("a", now + wait * 0.5) > 0.0
    assert window.retry_after_s("a", now + wait + 1e-9) == 0.0  # (float rounding)


def test_retry_after_rounds_up_to_whole_milliseconds() -> None:
    assert (retry_after_ms(0.0), retry_after_ms(0.0001), retry_after_ms(1.5)) == (0, 1, 1500)
    assert retry_after_ms(1e12) == 2**32 - 1


@pytest.mark.parametrize(
    ("address", "normal", "masked"),
    [
        ("Alice@Example.COM", "alice@example.com", "A***@Example.COM"),
        ("bob@example.com", "bob@example.com", "b***@example.com"),
        ("a@b.example", "a@b.example", "a***@b.example"),
        ("no-at-sign", "no-at-sign", "***"),
    ],
)
def test_addresses_normalise_and_mask(address: str, normal: str, masked: str) -> None:
    assert normalise(address) == normal
    assert mask(address) == masked


@pytest.mark.parametrize(
    ("report", "dead"),
    [
        (
            "RCPT rejected: 550 5.1.1 <x@example.com>: Recipient address rejected: User unknown",
            True,
        ),
        ("RCPT rejected: 550 5.1.2 bad destination system address", True),
        ("RCPT rejected: 553 5.1.10 null MX", True),
        ("RCPT rejected: 551 5.1.6 mailbox has moved", True),
        ("RCPT rejected: 550 no such user here", True),
        ("RCPT rejected: 550 Mailbox not found", True),
        ("RCPT rejected: 550 5.7.1 relaying denied", False),  # policy, not the address
        ("RCPT rejected: 552 5.2.2 mailbox full", False),
        ("RCPT rejected: 550 rejected", False),  # says nothing about the address
        ("RCPT rejected: 450 4.1.1 try later", False),  # not permanent
        ("MAIL rejected: 550 5.1.1 sender unknown", False),  # about us, not the recipient
        ("DOT rejected: 554 5.1.1 whatever", False),
        ("session lost at DATA", False),
        ("gave up after 8 attempts", False),
    ],
)
def test_the_classifier_suppresses_only_dead_addresses(report: str, dead: bool) -> None:
    reply = parse_reply(report)
    assert (reply is not None and is_dead_address(reply)) is dead


def test_a_report_splits_into_command_code_and_text() -> None:
    assert parse_reply("RCPT rejected: 550 5.1.1 no such user") == RelayReply(
        "RCPT", 550, "5.1.1 no such user"
    )
    assert enhanced_status("5.01.010 x") == "5.1.10"
    assert enhanced_status("no code here") is None


def test_the_pace_is_the_mean_gap_between_recent_finishes() -> None:
    pace = Pace()
    assert pace.next_place_s() == PACE_DEFAULT_S
    for t in (10.0, 10.2, 10.4, 10.6):
        pace.finished(t)
    assert pace.next_place_s() == pytest.approx(0.2)


def test_a_caller_is_identified_by_a_digest_prefix_or_its_certificate() -> None:
    tokens = TokenSet.parse("token-of-team-alpha-0001\ntoken-of-team-beta-00002\n")
    alpha = tokens.identify([("authorization", "Bearer token-of-team-alpha-0001")])
    beta = tokens.identify([("authorization", "Bearer token-of-team-beta-00002")])
    assert alpha is not None and beta is not None and alpha != beta
    assert alpha.startswith("token:") and len(alpha) == len("token:") + 16
    assert "alpha" not in alpha  # never the token itself
    assert tokens.identify([("authorization", "Bearer not-a-configured-token")]) is None
    subject = ((("commonName", "billing"),), (("organizationName", "Acme"),))
    assert certificate_identity(subject) == "cert:CN=billing,O=Acme"
    assert certificate_identity(()) is None
