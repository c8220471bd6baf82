"""What trio-mailer refuses in a send, in its own words: the rules ``FakeMailer`` applies.

Pure: no trio, no grpc. The service's rules live in ``trio_mailer/core`` (``validation``,
``rendering``, ``idempotency``) and its gRPC front (the request size), which this distribution
cannot import: it installs without the service. ``tests/test_fake_mailer_rules.py`` runs random
requests through these rules and through the service and fails on any difference in the
outcome or the detail, so a test that passes on the fake does not fail in production.

Theory of operation: each field's check is a generator of ``(broken, detail)`` pairs, in the
order in which the service tries them; the first broken pair is the refusal. A pair is made only
once every pair before it held, so a later check may rely on an earlier one (the domain is split
off only after the ``@`` was counted).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping

Checks = Iterator[tuple[bool, str]]

# The service's limits: characters, except where the name says otherwise.
MAX_REQUEST_BYTES = 4 * 1024  # a serialized request message (RESOURCE_EXHAUSTED beyond it)
MAX_ADDRESS_CHARS = 254  # RFC 5321: the path, less its angle brackets
MAX_LOCAL_PART_CHARS = 64
MAX_DOMAIN_CHARS = 253
MAX_CODE_CHARS = 128
MAX_LOCALE_CHARS = 35
MAX_VALUE_CHARS = 1000
MAX_VARIABLES = 32

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")  # a dot-atom: no quotes, no comments
DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")  # a host name with two labels or more
LOCALE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_LIST_SEPARATOR = re.compile(r"[,;]")
_LINE_SEPARATORS = "\u2028\u2029\x85"
_ENCODED_WORD = "'=?' (an RFC 2047 encoded-word opener) is not allowed"
BUILTIN_VARIABLES = frozenset({"to", "service_name"})  # the service fills them in itself

# The templates the service ships (and requires): name -> declared variables.
SHIPPED_TEMPLATES: Mapping[str, frozenset[str]] = {
    "password": frozenset({"code"}),
    "retrieve": frozenset({"code"}),
}

KEY_CONFLICT = (
    "idempotency_key: already used for a mail with another to, code or kind; "
    "use a new key for a new mail"
)


def too_large(request_bytes: int) -> str | None:
    """The RESOURCE_EXHAUSTED detail for a serialized request of ``request_bytes``, or None."""
    if request_bytes <= MAX_REQUEST_BYTES:
        return None
    return f"request message larger than {MAX_REQUEST_BYTES} bytes (declared {request_bytes})"


def refusal(
    method: str,
    to: str,
    template: str,
    values: Mapping[str, str],
    locale: str,
    templates: Mapping[str, frozenset[str]],
) -> str | None:
    """The INVALID_ARGUMENT detail the service answers this send with, or None if it is valid.

    Args:
        method: "Send", or "SendPass"/"SendRetrieve" (whose ``values`` are ``{"code": ...}``).
        templates: the service's templates, name -> declared variables.
    """

    def checks() -> Checks:
        yield from _address(to)
        if method != "Send":
            yield from _code(values["code"])
        yield from _locale(locale)
        yield from _variables(template, values, templates)

    return next((detail for broken, detail in checks() if broken), None)


def declared_templates(templates: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """The shipped templates with ``templates`` (name -> declared variables) over them.

    Raises:
        ValueError: a name or a declaration the service would refuse at start-up.
    """
    merged = {**SHIPPED_TEMPLATES, **{name: frozenset(names) for name, names in templates.items()}}
    for name, names in merged.items():
        bad = sorted(n for n in names if n in BUILTIN_VARIABLES or not VARIABLE_NAME.fullmatch(n))
        if not TEMPLATE_NAME.fullmatch(name) or bad or len(names) > MAX_VARIABLES:
            raise ValueError(
                f"template {name!r}: expected a name of a-z, 0-9, '-' and '_' declaring at most "
                f"{MAX_VARIABLES} variable names (not to or service_name), got {sorted(names)}"
            )
    return merged


def normalise_address(address: str) -> str:
    """One spelling per mailbox, as the service's limits count it: lower case."""
    local, at, domain = address.strip().rpartition("@")
    return f"{local.lower()}@{domain.lower()}" if at else address.strip().lower()


def _shown(text: str) -> str:
    return ascii(text if len(text) <= 40 else text[:40] + "...")


def _bad_character(text: str) -> str | None:
    return next((c for c in text if unicodedata.category(c) == "Cc" or c in _LINE_SEPARATORS), None)


def _header_text(field: str, value: str) -> Checks:
    char = _bad_character(value)
    what = "line separator" if char and unicodedata.category(char) != "Cc" else "control character"
    yield char is not None, f"{field}: {what} {char!r} is not allowed"
    yield "=?" in value, f"{field}: {_ENCODED_WORD}"


def _address(to: str) -> Checks:
    yield not to, "to: expected one address, got an empty string"
    yield from _header_text("to", to)
    yield (
        len(to) > MAX_ADDRESS_CHARS,
        f"to: expected at most {MAX_ADDRESS_CHARS} characters, got {len(to)}",
    )
    yield (
        not to.isascii(),
        f"to: expected an ASCII address (SMTPUTF8 is not supported), got {_shown(to)}",
    )
    parts = _LIST_SEPARATOR.split(to)
    yield len(parts) > 1, f"to: expected one address, got a list of {len(parts)}"
    yield (
        to.count("@") != 1,
        f"to: expected one address of the form local@domain, got {_shown(to)}",
    )
    local, _, domain = to.partition("@")
    yield (
        len(local) > MAX_LOCAL_PART_CHARS,
        f"to: expected a local part of at most {MAX_LOCAL_PART_CHARS} characters, got {len(local)}",
    )
    yield (
        not LOCAL_PART.fullmatch(local),
        "to: expected a plain local part (letters, digits and !#$%&'*+/=?^_`{|}~- separated by "
        f"single dots; no quotes, spaces or comments), got {_shown(local)}",
    )
    yield (
        len(domain) > MAX_DOMAIN_CHARS or not DOMAIN.fullmatch(domain),
        f"to: expected a domain name such as example.com, got {_shown(domain)}",
    )


def _code(code: str) -> Checks:
    yield not code, "code: expected a non-empty code, got an empty string"
    yield (
        len(code) > MAX_CODE_CHARS,
        f"code: expected at most {MAX_CODE_CHARS} characters, got {len(code)}",
    )
    yield from _header_text("code", code)


def _locale(locale: str) -> Checks:
    yield (
        len(locale) > MAX_LOCALE_CHARS,
        f"locale: expected at most {MAX_LOCALE_CHARS} characters, got {len(locale)}",
    )
    yield (
        bool(locale) and not LOCALE.fullmatch(locale.replace("_", "-")),
        f"locale: expected a language tag such as en, ru or pt-BR, got {locale[:40]!a}",
    )


def _variables(
    template: str, values: Mapping[str, str], templates: Mapping[str, frozenset[str]]
) -> Checks:
    declared = templates.get(template)
    if declared is None:
        shown = template if TEMPLATE_NAME.fullmatch(template) else ascii(template[:40])
        known = ", ".join(sorted(templates)[:20])
        yield True, f"template: unknown template {shown!r} (known: {known})"
        return
    of = f"template {template!r}"
    yield (
        len(values) > MAX_VARIABLES,
        f"vars: {of}: expected at most {MAX_VARIABLES}, got {len(values)}",
    )
    requires = ", ".join(sorted(declared)) or "nothing"
    for name in sorted(values):
        yield not VARIABLE_NAME.fullmatch(name), f"vars: {of}: {name[:40]!a} is not a variable name"
        yield (
            name not in declared,
            f"vars.{name}: {of} does not take this variable (it requires: {requires})",
        )
    for name in sorted(declared):
        yield name not in values, f"vars.{name}: {of} requires it, got nothing"
        value = values[name]
        yield (
            len(value) > MAX_VALUE_CHARS,
            f"vars.{name}: {of}: expected at most {MAX_VALUE_CHARS} characters, got {len(value)}",
        )
        char = _bad_character(value)
        yield char is not None, f"vars.{name}: {of}: control character {char!r} is not allowed"
        yield "=?" in value, f"vars.{name}: {of}: {_ENCODED_WORD}"
