"""Checks on what callers send: the recipient address and the code.

Pure. Python 3.11.7's ``email`` package lacks the fixes for CVE-2023-27043 (lenient address
parsing) and CVE-2024-6923 (header injection through refolded encoded words), so nothing here
trusts it: an address must match the plain addr-spec grammar below, and every user-supplied
value is refused when it holds CR, LF, NUL (or any control character) or the encoded-word
opener ``=?``.
"""

from __future__ import annotations

import re
import unicodedata

from trio_mailer.core.errors import InvalidRequest

MAX_ADDRESS_CHARS = 254  # RFC 5321 4.5.3.1.3 path limit, less the angle brackets
MAX_LOCAL_PART_CHARS = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN_CHARS = 253
MAX_CODE_CHARS = 128

# RFC 5322 3.2.3 atext, and a dot-atom built from it. No quoted strings, comments or
# obsolete forms: a local part such as "a@b.c"@evil.com or a list "a@b.c, c@d.e" cannot match.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# A DNS host name with at least two labels (RFC 1035 letter-digit-hyphen labels).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")


def _describe(value: str) -> str:
    """A short, log-safe rendering of a bad value for error messages."""
    shown = value if len(value) <= 40 else value[:40] + "..."
    return ascii(shown)


def reject_unsafe_header_text(field: str, value: str) -> None:
    """Refuse text that could break out of, or be refolded out of, a header.

    Raises:
        InvalidRequest: when ``value`` holds a control character (CR, LF, NUL, ...) or ``=?``.
    """
    for char in value:
        if unicodedata.category(char) == "Cc":
            raise InvalidRequest(field, f"control character {char!r} is not allowed")
        if char in "\u2028\u2029\x85":
            raise InvalidRequest(field, f"line separator {char!r} is not allowed")
    if "=?" in value:
        raise InvalidRequest(field, "'=?' (an RFC 2047 encoded-word opener) is not allowed")


def validate_address(field: str, value: str) -> str:
    """Check that ``value`` is exactly one plain ASCII addr-spec such as ``user@example.com``.

    Returns:
        The address, unchanged.

    Raises:
        InvalidRequest: naming ``field``, what was expected and what came.
    """
    if not value:
        raise InvalidRequest(field, "expected one address, got an empty string")
    reject_unsafe_header_text(field, value)
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidRequest(
            field, f"expected at most {MAX_ADDRESS_CHARS} characters, got {len(value)}"
        )
    if not value.isascii():
        raise InvalidRequest(
            field, f"expected an ASCII address (SMTPUTF8 is not supported), got {_describe(value)}"
        )
    if "," in value or ";" in value:
        count = len(re.split(r"[,;]", value))
        raise InvalidRequest(field, f"expected one address, got a list of {count}")
    if value.count("@") != 1:
        raise InvalidRequest(
            field, f"expected one address of the form local@domain, got {_describe(value)}"
        )
    local, domain = value.split("@")
    if len(local) > MAX_LOCAL_PART_CHARS:
        raise InvalidRequest(
            field,
            f"expected a local part of at most {MAX_LOCAL_PART_CHARS} characters, got {len(local)}",
        )
    if not _DOT_ATOM.fullmatch(local):
        raise InvalidRequest(
            field,
            "expected a plain local part (letters, digits and !#$%&'*+/=?^_`{|}~- separated "
            f"by single dots; no quotes, spaces or comments), got {_describe(local)}",
        )
    if len(domain) > MAX_DOMAIN_CHARS or not _DOMAIN.fullmatch(domain):
        raise InvalidRequest(
            field, f"expected a domain name such as example.com, got {_describe(domain)}"
        )
    return value


def validate_code(field: str, value: str) -> str:
    """Check the code a mail carries: 1 to ``MAX_CODE_CHARS`` printable characters.

    Raises:
        InvalidRequest: naming ``field``.
    """
    if not value:
        raise InvalidRequest(field, "expected a non-empty code, got an empty string")
    if len(value) > MAX_CODE_CHARS:
        raise InvalidRequest(
            field, f"expected at most {MAX_CODE_CHARS} characters, got {len(value)}"
        )
    reject_unsafe_header_text(field, value)
    return value
