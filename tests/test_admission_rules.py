"""The pure admission rules: keys and fingerprints, rate-limit arithmetic, addresses, the
suppression classifier, the senders' pace."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mailer.core.addresses import mask, normalise
from trio_mailer.core.caller_auth import TokenSet, certificate_identity
from trio_mailer.core.errors import GrpcStatus, InvalidRequest
from trio_mailer.core.idempotency import (
    MAX_KEY_CHARS,
    KeyBusy,
    KeyConflict,
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
        ("a\x1fb", "expected printable ASCII characters only, got U+001F at position 1"),
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


def test_the_fingerprint_of_a_payload_never_changes() -> None:
    """Fingerprints are stored with their keys (admission_tables): a retry after an upgrade must
    still match. Golden: SHA-256 over each part as a 4-byte big-endian length and its UTF-8."""
    assert payload_fingerprint("password", [("to", "a@x.example"), ("code", "1")]) == (
        "617676d5476f6bf1201382150bb00f7138c3a0c56b12540a337d63945acb1590"
    )
    assert payload_fingerprint("", []) == (
        "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
    )


def test_the_fingerprint_keeps_the_boundary_between_name_and_value() -> None:
    """Without the length prefixes "ab"+"c" and "a"+"bc" would be the same bytes."""
    assert payload_fingerprint("m", [("ab", "c")]) != payload_fingerprint("m", [("a", "bc")])
    assert payload_fingerprint("mx", [("a", "")]) != payload_fingerprint("m", [("xa", "")])


def test_the_fingerprint_takes_any_string_even_a_lone_surrogate() -> None:
    """A value that is not valid UTF-8 text still gets a fingerprint, never an exception."""
    lone = payload_fingerprint("m", [("to", "\ud800")])
    assert lone == "cbb2de46400702c9180b9722682f463fa935f6f8b779485061ed518c32bfd0d4"
    assert lone != payload_fingerprint("m", [("to", "\ud801")])


def test_key_misuse_and_a_busy_key_name_the_field_with_their_status() -> None:
    conflict, busy = KeyConflict(), KeyBusy()
    assert conflict.grpc_status is GrpcStatus.FAILED_PRECONDITION
    assert (
        conflict.message
        == str(conflict)
        == (
            "idempotency_key: already used for a mail with another to, code or kind; "
            "use a new key for a new mail"
        )
    )
    assert busy.grpc_status is GrpcStatus.ABORTED
    assert (
        busy.message
        == str(busy)
        == (
            "idempotency_key: the first call with this key is still being handled; "
            "retry with the same key"
        )
    )


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
        ("@example.com", "@example.com", "***"),  # no local part: nothing to show
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
    assert parse_reply("DOT rejected: 554") == RelayReply("DOT", 554, "")  # a bare code
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


# ---- rate limits: the boundaries of each rule ----


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("1/600", RateLimit(1, 600.0)),  # the least count
        ("1/2592000", RateLimit(1, 2_592_000.0)),  # the longest period: 30 days exactly
        ("999999999/60", RateLimit(999_999_999, 60.0)),  # nine digits
    ],
)
def test_rate_limit_specs_parse_at_their_bounds(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit


@pytest.mark.parametrize("text", ["1/2592000.5", "1/2678400", "1000000000/60", ""])
def test_rate_limit_specs_past_their_bounds_are_refused(text: str) -> None:
    """A period over 30 days, a count of ten digits, nothing at all."""
    with pytest.raises(ValueError, match=r"at most 2\.592e\+06\), or 0 for off"):
        RateLimit.parse(text)


def test_a_rate_limit_prints_as_it_is_written() -> None:
    assert [str(RateLimit(5, 600.0)), str(RateLimit(3, 0.5))] == ["5/600", "3/0.5"]
    assert RateLimit.parse(str(RateLimit(3, 0.5))) == RateLimit(3, 0.5)


def test_a_slot_frees_exactly_when_its_time_leaves_the_window() -> None:
    """1/60, reserved at 0: 0.5 s to wait at 59.5, nothing at 60 (the period is half-open)."""
    window = SlidingWindow(RateLimit(1, 60.0))
    window.reserve("a", 0.0)
    assert window.retry_after_s("a", 59.5) == 0.5
    assert window.retry_after_s("a", 60.0) == 0.0


def test_the_window_forgets_the_times_that_have_left_it() -> None:
    """Memory follows the last period only: a subject busy for hours keeps at most N times
    (plus the one being reserved), never the whole history."""
    window = SlidingWindow(RateLimit(2, 10.0))
    for step in range(1000):
        now = step * 5.0
        assert window.retry_after_s("a", now) == 0.0
        window.reserve("a", now)
        assert len(window._times["a"]) <= 3
    # A time exactly one period old has left: asking at 4995 + 10 keeps only what is newer.
    assert window.retry_after_s("a", 5005.0) == 0.0
    assert list(window._times["a"]) == []


def test_a_reservation_older_than_the_newest_is_put_in_order() -> None:
    """Loaded from the store out of order (10, 30, then 20): counted as 10, 20, 30."""
    window = SlidingWindow(RateLimit(2, 100.0))
    for t in (10.0, 30.0, 20.0):
        window.reserve("a", t)
    assert window.retry_after_s("a", 40.0) == 80.0  # 20 is the 2nd newest: it leaves at 120
    assert list(window._times["a"]) == [10.0, 20.0, 30.0]


def test_prune_forgets_exactly_the_subjects_whose_newest_time_has_left() -> None:
    """1/60 at now=70 (the period starts at 10): b (5) and e (exactly 10) go; c (50) stays, and
    so does d, whose oldest (5) has left but whose newest (50) has not."""
    window = SlidingWindow(RateLimit(1, 60.0))
    window.reserve("b", 5.0)
    window.reserve("e", 10.0)
    window.reserve("c", 50.0)
    window.reserve("d", 5.0)
    window.reserve("d", 50.0)
    assert window.prune(70.0) == 2 and len(window) == 2
    assert window.retry_after_s("c", 70.0) == 40.0  # still counted
    assert window.retry_after_s("d", 70.0) == 40.0
    assert window.retry_after_s("b", 70.0) == 0.0
    assert window.prune(70.0) == 0


def test_release_of_an_unknown_reservation_changes_nothing() -> None:
    window = SlidingWindow(RateLimit(1, 60.0))
    window.release("nobody", 1.0)
    window.reserve("a", 5.0)
    window.release("a", 6.0)  # not a time it holds
    assert window.retry_after_s("a", 6.0) == 59.0 and len(window) == 1
    window.release("a", 5.0)
    assert len(window) == 0  # its last time released: the subject goes too


def test_retry_after_ms_is_never_negative() -> None:
    assert retry_after_ms(-0.5) == 0


def test_the_pace_guesses_one_second_until_two_mails_finished() -> None:
    pace = Pace()
    assert pace.next_place_s() == 1.0
    pace.finished(10.0)
    assert pace.next_place_s() == 1.0  # one finish gives no gap yet
    pace.finished(10.5)
    assert pace.next_place_s() == 0.5


def test_the_pace_stays_within_its_bounds() -> None:
    slow, fast = Pace(), Pace()
    for t in (0.0, 1000.0):
        slow.finished(t)
    for t in (0.0, 0.001):
        fast.finished(t)
    assert (slow.next_place_s(), fast.next_place_s()) == (60.0, 0.01)


def test_the_pace_is_taken_over_the_last_32_finishes() -> None:
    """Gaps that grow: the mean of the last 32 finishes is not that of 31 or 33."""
    pace = Pace()
    times = [i * i / 100 for i in range(40)]
    for t in times:
        pace.finished(t)
    assert pace.next_place_s() == pytest.approx((times[-1] - times[-32]) / 31)
    assert len(pace._finished) == 32
