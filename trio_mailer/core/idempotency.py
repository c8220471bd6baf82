"""Idempotency keys: what a valid key is, and the fingerprint that tells a repeat from a misuse.

Pure. A caller that retries a call sends the same ``idempotency_key``; the service answers the
repeat with the first call's reply. A key is scoped by the caller's identity (see
``caller_auth``), so two callers never collide. The fingerprint is a SHA-256 over the method and
the request's fields, each length-prefixed, so "ab"+"c" and "a"+"bc" never meet; the same key
with another fingerprint is a misuse (FAILED_PRECONDITION), not a repeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from trio_mailer.core.errors import GrpcStatus, InvalidRequest, MailerError

MAX_KEY_CHARS = 256
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))  # printable ASCII, space included


def validate_idempotency_key(key: str) -> str | None:
    """The key, or None when the call has none (empty).

    Raises:
        InvalidRequest: naming ``idempotency_key`` (too long, or not printable ASCII).
    """
    if not key:
        return None
    if len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(
            "idempotency_key", f"expected at most {MAX_KEY_CHARS} characters, got {len(key)}"
        )
    bad = next((c for c in key if c not in _PRINTABLE), None)
    if bad is not None:
        raise InvalidRequest(
            "idempotency_key",
            f"expected printable ASCII characters only, got U+{ord(bad):04X} "
            f"at position {key.index(bad)}",
        )
    return key


def payload_fingerprint(method: str, fields: Iterable[tuple[str, str]]) -> str:
    """A hex SHA-256 of ``method`` and the ``(name, value)`` pairs, in the order given."""
    digest = hashlib.sha256()
    for part in (method, *(item for pair in fields for item in pair)):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(4, "big"))
        digest.update(data)
    return digest.hexdigest()


class KeyConflict(MailerError):
    """The key was used before for another payload: FAILED_PRECONDITION naming the field."""

    grpc_status = GrpcStatus.FAILED_PRECONDITION

    def __init__(self) -> None:
        super().__init__(
            "idempotency_key: already used for a mail with another to, code or kind; "
            "use a new key for a new mail"
        )


class KeyBusy(MailerError):
    """A repeat waited for the first call with its key longer than it may: ABORTED."""

    grpc_status = GrpcStatus.ABORTED

    def __init__(self) -> None:
        super().__init__(
            "idempotency_key: the first call with this key is still being handled; "
            "retry with the same key"
        )
