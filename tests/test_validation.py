"""Request checks: the recipient address and the code."""

from __future__ import annotations

import pytest

from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.validation import MAX_CODE_CHARS, validate_address, validate_code


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "first.last@sub.example.co.uk",
        "a+tag@example.com",
        "o'brien@example.com",
        "x@a-b.example",
        "!#$%&'*+/?=^_`{|}~-@example.com",
        "a" * 64 + "@example.com",
    ],
)
def test_accepts_plain_addr_specs(address: str) -> None:
    """A plain dot-atom local part at a domain name is accepted unchanged."""
    assert validate_address("to", address) == address


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "to: expected one address, got an empty string"),
        ("a@b.c, c@d.e", "to: expected one address, got a list of 2"),
        ("a@b.com;c@d.com;e@f.com", "to: expected one address, got a list of 3"),
        ('"a@b.c"@evil.com', "to: expected one address of the form local@domain"),
        ('"quoted"@example.com', "to: expected a plain local part"),
        ("Name <a@example.com>", "to: expected a plain local part"),
        ("a(comment)@example.com", "to: expected a plain local part"),
        ("a..b@example.com", "to: expected a plain local part"),
        (".a@example.com", "to: expected a plain local part"),
        ("a.@example.com", "to: expected a plain local part"),
        ("a" * 65 + "@example.com", "to: expected a local part of at most 64 characters, got 65"),
        ("user@localhost", "to: expected a domain name such as example.com"),
        ("user@-bad.example.com", "to: expected a domain name such as example.com"),
        ("user@[127.0.0.1]", "to: expected a domain name such as example.com"),
        ("user@example.com.", "to: expected a domain name such as example.com"),
        ("userexample.com", "to: expected one address of the form local@domain"),
        ("a@b@example.com", "to: expected one address of the form local@domain"),
        ("user@exämple.com", "to: expected an ASCII address (SMTPUTF8 is not supported)"),
        ("ü@example.com", "to: expected an ASCII address"),
        ("a@example.com\r\nBcc: x@evil.com", "to: control character '\\r' is not allowed"),
        ("a\n@example.com", "to: control character '\\n' is not allowed"),
        ("a\x00@example.com", "to: control character '\\x00' is not allowed"),
        ("a\u2028@example.com", "to: line separator '\\u2028' is not allowed"),
        ("=?utf-8?q?a?=@example.com", "to: '=?' (an RFC 2047 encoded-word opener) is not allowed"),
        ("a" * 250 + "@example.com", "to: expected at most 254 characters, got 262"),
    ],
)
def test_rejects_everything_but_one_plain_address(address: str, problem: str) -> None:
    """Lists, quoting tricks, comments, control characters and oversize input are refused."""
    with pytest.raises(InvalidRequest) as info:
        validate_address("to", address)
    assert info.value.field == "to"
    assert info.value.message.startswith(problem)


@pytest.mark.parametrize("code", ["123456", "a-b_C", "código ✓", "x" * MAX_CODE_CHARS])
def test_accepts_printable_codes(code: str) -> None:
    """Printable codes up to the limit pass."""
    assert validate_code("code", code) == code


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("", "code: expected a non-empty code, got an empty string"),
        ("x" * (MAX_CODE_CHARS + 1), "code: expected at most 128 characters, got 129"),
        ("12\r\n34", "code: control character '\\r' is not allowed"),
        ("12\x0034", "code: control character '\\x00' is not allowed"),
        ("12\t34", "code: control character '\\t' is not allowed"),
        ("=?utf-8?b?SGk=?=", "code: '=?' (an RFC 2047 encoded-word opener) is not allowed"),
    ],
)
def test_rejects_bad_codes(code: str, problem: str) -> None:
    """Empty, oversize, control characters and encoded-word openers are refused."""
    with pytest.raises(InvalidRequest, match=None) as info:
        validate_code("code", code)
    assert info.value.message == problem


def test_the_length_limits_accept_their_exact_maximum() -> None:
    """254 characters in all and 64 in the local part are accepted; one more is not."""
    label = "d" * 63
    domain = ".".join([label, label, label, "d" * 60])  # 252: the most a 254 address leaves
    assert len("a@" + domain) == 254
    assert validate_address("to", "a@" + domain) == "a@" + domain
    with pytest.raises(InvalidRequest, match="expected at most 254 characters, got 255"):
        validate_address("to", "ab@" + domain)
    local = "l" * 64
    assert validate_address("to", local + "@example.com") == local + "@example.com"


def test_a_label_may_have_63_characters_not_64() -> None:
    assert validate_address("to", f"a@{'d' * 63}.com")
    with pytest.raises(InvalidRequest, match="expected a domain name"):
        validate_address("to", f"a@{'d' * 64}.com")


@pytest.mark.parametrize(
    ("char", "kind"), [("\u2029", "line separator"), ("\x85", "control character")]
)
def test_other_line_separators_are_refused(char: str, kind: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_code("code", f"12{char}34")
    assert str(caught.value) == f"code: {kind} {char!r} is not allowed"


def test_long_bad_values_are_shown_shortened() -> None:
    """At most 40 characters of a bad value reach the message, then "..."."""
    forty = "a" * 40
    with pytest.raises(InvalidRequest) as caught:
        validate_address("to", forty)
    assert str(caught.value) == f"to: expected one address of the form local@domain, got '{forty}'"
    with pytest.raises(InvalidRequest) as caught:
        validate_address("to", forty + "b")
    assert str(caught.value) == (
        f"to: expected one address of the form local@domain, got '{forty}...'"
    )


def test_a_list_is_counted_by_commas_and_semicolons() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_address("to", "a@b.com,c@d.com;e@f.com,g@h.com")
    assert str(caught.value) == "to: expected one address, got a list of 4"
