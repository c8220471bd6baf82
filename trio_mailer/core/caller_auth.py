"""Who may call: bearer tokens, compared in constant time, and the loopback rule.

Pure. Tokens come from ``MAILER_AUTH_TOKENS_FILE``: one per line, either the token itself or
``sha256:<64 hex digits>`` (so the file need not hold the secret). Only SHA-256 digests are
kept in memory; a presented token is hashed and compared with every configured digest using
``hmac.compare_digest``, so neither the match nor its position leaks through timing. Tokens are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence

import attrs

_SHA256_LINE = re.compile(r"sha256:([0-9a-fA-F]{64})")
MIN_TOKEN_CHARS = 16
TOKEN_ID_HEX_DIGITS = 16  # a caller's identity: this much of its token's digest
# Why a caller was refused (the ``reason`` of ``trio_mailer_auth_failures_total``).
MISSING = "missing"  # no authorization header
BAD_SCHEME = "bad_scheme"  # not "Bearer <token>" (Basic, an empty token, ...)
UNKNOWN_TOKEN = "unknown_token"  # a bearer token that is not configured
BAD_CLIENT_CERTIFICATE = "bad_client_certificate"  # refused in the TLS handshake (mTLS)
REFUSAL_REASONS = (MISSING, BAD_SCHEME, UNKNOWN_TOKEN, BAD_CLIENT_CERTIFICATE)
# Short names for the attributes of a certificate subject.
_SUBJECT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@attrs.frozen
class TokenSet:
    digests: frozenset[bytes] = attrs.field(repr=False)

    @classmethod
    def parse(cls, text: str) -> TokenSet:
        """Parse a tokens file.

        Raises:
            ValueError: naming the first bad line (by number, never by content).
        """
        digests = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                match = _SHA256_LINE.fullmatch(line)
                if match is None:
                    raise ValueError(f"line {number}: expected sha256: and 64 hex digits")
                digests.add(bytes.fromhex(match.group(1)))
                continue
            if len(line) < MIN_TOKEN_CHARS or any(c.isspace() for c in line):
                raise ValueError(
                    f"line {number}: expected a token of at least {MIN_TOKEN_CHARS} characters "
                    "without spaces, or sha256:<hex>"
                )
            digests.add(_digest(line))
        if not digests:
            raise ValueError("expected at least one token, got none")
        return cls(frozenset(digests))

    def allows(self, metadata: Iterable[tuple[str, str]]) -> bool:
        """True when ``metadata`` carries ``authorization: Bearer <a configured token>``."""
        return self._match(metadata) is not None

    def refusal(self, metadata: Sequence[tuple[str, str]]) -> str | None:
        """None when ``metadata`` carries a configured token, else why not: ``MISSING``,
        ``BAD_SCHEME`` or ``UNKNOWN_TOKEN``."""
        if self._match(metadata) is not None:
            return None
        for name, value in metadata:
            if name.lower() == "authorization":
                scheme, _, token = value.partition(" ")
                return UNKNOWN_TOKEN if scheme.lower() == "bearer" and token else BAD_SCHEME
        return MISSING

    def identify(self, metadata: Iterable[tuple[str, str]]) -> str | None:
        """The caller's identity when ``metadata`` carries a configured token:
        ``token:`` and the first 16 hex digits of its SHA-256 (never the token), else None."""
        digest = self._match(metadata)
        return None if digest is None else f"token:{digest.hex()[:TOKEN_ID_HEX_DIGITS]}"

    def _match(self, metadata: Iterable[tuple[str, str]]) -> bytes | None:
        presented = None
        for name, value in metadata:
            if name.lower() == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    presented = _digest(token.strip())
                break
        if presented is None:
            return None
        matched = False
        for digest in self.digests:  # no early exit: every digest is compared
            matched |= hmac.compare_digest(presented, digest)
        return presented if matched else None


def is_loopback(host: str) -> bool:
    """True for an address (or "localhost") that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def certificate_identity(subject: Iterable[Iterable[tuple[str, str]]]) -> str | None:
    """``cert:CN=billing,O=Acme`` from ``ssl.getpeercert()["subject"]``; None when empty."""
    parts = [f"{_SUBJECT_NAMES.get(name, name)}={value}" for rdn in subject for name, value in rdn]
    return f"cert:{','.join(parts)}" if parts else None
