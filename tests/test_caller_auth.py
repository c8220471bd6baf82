"""The token checks and the loopback rule (core/caller_auth.py): plain, synchronous, exact."""

from __future__ import annotations

import hashlib

import pytest

from trio_mailer.core.caller_auth import (
    MIN_TOKEN_CHARS,
    TokenSet,
    certificate_identity,
    is_loopback,
)

TOKEN = "s3cret-token-for-tests"  # 22 characters
OTHER = "another-token-0123456789"


def sha256_line(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_a_plain_token_line_allows_exactly_that_token() -> None:
    tokens = TokenSet.parse(TOKEN + "\n")
    assert tokens.allows(bearer(TOKEN))
    assert not tokens.allows(bearer(OTHER))
    assert not tokens.allows(bearer(TOKEN + "x"))


def test_a_sha256_line_allows_the_token_whose_digest_it_is() -> None:
    tokens = TokenSet.parse(sha256_line(TOKEN))
    assert tokens.allows(bearer(TOKEN))
    assert not tokens.allows(bearer(OTHER))


def test_presenting_the_sha256_line_itself_is_refused() -> None:
    """The file's digest line is not a password: sending "sha256:<hex>" as the token fails."""
    line = sha256_line(TOKEN)
    tokens = TokenSet.parse(line)
    assert not tokens.allows(bearer(line))
    assert not tokens.allows(bearer(line.removeprefix("sha256:")))


def test_upper_case_hex_digests_are_accepted() -> None:
    tokens = TokenSet.parse(sha256_line(TOKEN).upper().replace("SHA256:", "sha256:"))
    assert tokens.allows(bearer(TOKEN))


def test_a_token_that_starts_like_a_digest_line_must_be_one() -> None:
    """A line starting "sha256:" is a digest or an error, never a plain token."""
    with pytest.raises(ValueError, match=r"^line 1: expected sha256: and 64 hex digits$"):
        TokenSet.parse("sha256:this-is-not-hex-but-long-enough")
    with pytest.raises(ValueError, match=r"^line 2: expected sha256: and 64 hex digits$"):
        TokenSet.parse(f"{TOKEN}\n{sha256_line(TOKEN)}0\n")


def test_comments_and_blank_lines_are_skipped_and_lines_are_stripped() -> None:
    tokens = TokenSet.parse(f"# the team's token\n\n   \n  {TOKEN}  \n\t{sha256_line(OTHER)}\n")
    assert tokens.allows(bearer(TOKEN))
    assert tokens.allows(bearer(OTHER))
    assert len(tokens.digests) == 2


def test_every_configured_token_is_allowed() -> None:
    """Not only the first or the last: each line counts."""
    third = "third-token-abcdefghij"
    tokens = TokenSet.parse(f"{TOKEN}\n{OTHER}\n{third}\n")
    assert all(tokens.allows(bearer(t)) for t in (TOKEN, OTHER, third))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected at least one token, got none"),
        ("# only a comment\n\n", "expected at least one token, got none"),
        (
            "x" * (MIN_TOKEN_CHARS - 1),
            f"line 1: expected a token of at least {MIN_TOKEN_CHARS} characters without spaces, "
            "or sha256:<hex>",
        ),
        (
            f"{TOKEN}\n# ok\nhas a space in it, long enough",
            f"line 3: expected a token of at least {MIN_TOKEN_CHARS} characters without spaces, "
            "or sha256:<hex>",
        ),
    ],
)
def test_bad_token_files_are_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        TokenSet.parse(text)
    assert str(caught.value) == message


def test_the_shortest_token_allowed_is_min_token_chars() -> None:
    """16 characters pass, 15 do not (the boundary, both sides)."""
    assert MIN_TOKEN_CHARS == 16
    exact = "k" * MIN_TOKEN_CHARS
    assert TokenSet.parse(exact).allows(bearer(exact))
    with pytest.raises(ValueError, match=r"^line 1: "):
        TokenSet.parse(exact[:-1])


def test_the_error_never_shows_the_line() -> None:
    """A bad line is named by number: its text (maybe a secret) is not in the message."""
    secret = "short secret"
    with pytest.raises(ValueError) as caught:
        TokenSet.parse(secret)
    assert secret not in str(caught.value)
    assert secret not in repr(TokenSet.parse(TOKEN))
    assert TOKEN not in repr(TokenSet.parse(TOKEN))


def test_the_repr_shows_no_digest() -> None:
    """A digest of a weak token can be brute-forced: it stays out of reprs and logs."""
    tokens = TokenSet.parse(TOKEN)
    [digest] = tokens.digests
    assert repr(digest) not in repr(tokens)
    assert digest.hex() not in repr(tokens)
    assert "digests" not in repr(tokens)


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("x-other", f"Bearer {TOKEN}")],
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", TOKEN)],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", f"Token {TOKEN}")],
    ],
    ids=["none", "other-header", "basic", "no-scheme", "bearer-alone", "bearer-empty", "token"],
)
def test_without_a_bearer_header_carrying_a_token_the_caller_is_refused(
    metadata: list[tuple[str, str]],
) -> None:
    """`authorization: Basic <valid token>` and the like do not pass."""
    assert not TokenSet.parse(TOKEN).allows(metadata)


def test_the_header_name_and_scheme_are_case_insensitive_the_token_is_not() -> None:
    tokens = TokenSet.parse(TOKEN)
    assert tokens.allows([("Authorization", f"bearer {TOKEN}")])
    assert tokens.allows([("AUTHORIZATION", f"BEARER {TOKEN}")])
    assert not tokens.allows(bearer(TOKEN.upper()))


def test_surrounding_spaces_around_the_token_are_ignored() -> None:
    assert TokenSet.parse(TOKEN).allows(bearer(f"  {TOKEN}  "))


def test_only_the_first_authorization_header_counts() -> None:
    """A second header cannot rescue a bad first one (nor spoil a good one)."""
    tokens = TokenSet.parse(TOKEN)
    assert not tokens.allows([("authorization", "Bearer wrong"), *bearer(TOKEN)])
    assert tokens.allows([*bearer(TOKEN), ("authorization", "Bearer wrong")])
    assert tokens.allows([("x-request-id", "1"), *bearer(TOKEN)])


def test_allows_returns_a_bool() -> None:
    tokens = TokenSet.parse(TOKEN)
    assert tokens.allows(bearer(TOKEN)) is True
    assert tokens.allows(bearer(OTHER)) is False
    assert tokens.allows([]) is False


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("::", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_a_token_identity_is_a_prefix_of_its_digest_never_the_token() -> None:
    """identify(): "token:" and 16 hex digits of the presented token's SHA-256; None otherwise."""
    tokens = TokenSet.parse(f"{TOKEN}\n{sha256_line(OTHER)}\n")
    expected = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
    assert tokens.identify(bearer(TOKEN)) == expected
    assert (
        tokens.identify(bearer(OTHER)) == "token:" + hashlib.sha256(OTHER.encode()).hexdigest()[:16]
    )
    assert tokens.identify(bearer("not-a-configured-token")) is None
    assert tokens.identify([]) is None
    assert TOKEN not in expected


def test_a_certificate_identity_names_every_subject_attribute_in_order() -> None:
    """certificate_identity(): short names for the usual attributes, others as they come."""
    subject = (
        (("commonName", "billing"),),
        (("organizationName", "Acme"),),
        (("organizationalUnitName", "Payments"),),
        (("countryName", "DE"),),
        (("stateOrProvinceName", "Berlin"),),
        (("localityName", "Berlin"),),
        (("emailAddress", "ops@acme.example"),),
        (("serialNumber", "42"),),
    )
    assert certificate_identity(subject) == (
        "cert:CN=billing,O=Acme,OU=Payments,C=DE,ST=Berlin,L=Berlin,"
        "emailAddress=ops@acme.example,serialNumber=42"
    )
    assert certificate_identity(()) is None


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "missing"),
        ([("x-other", "Bearer " + TOKEN)], "missing"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "bad_scheme"),
        ([("authorization", "Bearer")], "bad_scheme"),
        ([("authorization", "Bearer ")], "bad_scheme"),
        ([("authorization", TOKEN)], "bad_scheme"),
        ([("authorization", "Bearer not-the-configured-token")], "unknown_token"),
        ([("Authorization", "bearer not-the-configured-token")], "unknown_token"),
        ([("authorization", "Basic x"), ("authorization", "Bearer " + TOKEN)], "bad_scheme"),
        ([("authorization", "Bearer " + TOKEN)], None),
        ([("x-other", "1"), ("AUTHORIZATION", "BEARER " + TOKEN)], None),
    ],
)
def test_refusal_names_why_a_caller_is_refused(
    metadata: list[tuple[str, str]], reason: str | None
) -> None:
    """None for a configured token, else missing, bad_scheme or unknown_token (the first
    authorization header decides, as for ``allows``)."""
    assert TokenSet.parse(TOKEN + "\n").refusal(metadata) == reason


def test_the_refusal_reasons_are_the_metric_labels() -> None:
    from trio_mailer.core import caller_auth

    assert caller_auth.REFUSAL_REASONS == (
        "missing", "bad_scheme", "unknown_token", "bad_client_certificate",
    )  # fmt: skip
