"""Addresses as the limits and the suppression list count them, and as the logs show them.

Pure. ``normalise`` gives one spelling per mailbox: the domain lower-cased (DNS names are case
insensitive) and the local part lower-cased too. RFC 5321 lets a server treat the local part as
case sensitive, but practically none does, and an attacker must not get five more mails through
by writing ``Alice@`` instead of ``alice@``. ``mask`` keeps the first character of the local
part and the domain: enough to tell a support ticket which address it was, not enough to harvest.
"""

from __future__ import annotations


def normalise(address: str) -> str:
    """``Alice@Example.COM`` -> ``alice@example.com`` (an address without @: lower-cased)."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    return f"{local.lower()}@{domain.lower()}"


def mask(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``; no @ at all: ``***``."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain}"
