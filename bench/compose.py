"""Compose: CPU per mail of building a message, ours against the reference, side by side.

Ours is ``trio_mailer.core.message``: the message serialized directly and checked by a scan of
its bytes. The reference (bench/compose_reference.py) is how it was built before issue 16:
``email.message.EmailMessage`` with the SMTP policy, ``as_bytes``, then parsed back twice. Both
build the shipped ``password`` template in English (two quoted-printable parts) and in Russian
(two base64 parts). Measured in this process with ``time.process_time`` (the work is pure
Python, one thread), each repetition running the variants one after the other in an order that
rotates. Before measuring, both messages of each case are parsed back with the email package and
must read the same (headers, parts, bodies): a faster but different message fails the section.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import time
from collections.abc import Callable
from datetime import UTC, datetime

import attrs

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.message import MailComposer, build_message
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderedMail

from .common import MAIL_FROM, RCPT_TO, SERVICE_NAME, BenchError, Profile
from .compose_reference import reference_build_message
from .stats import Section, Target

LOCALES = ("en", "ru")
CODE = "739201"
MESSAGE_ID = "<0123456789abcdef0123456789abcdef@example.com>"
NOW = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
TARGET_RATIO = 0.1  # the "at least 10x cheaper"
REFERENCE_SHARE = 10  # the reference builds this many times fewer mails a sample (it is slower)


@attrs.frozen
class Variant:
    key: str
    what: str
    build: Callable[[], object]
    mails: int


def _rendered(templates: MailTemplates, locale: str) -> RenderedMail:
    return templates.render(
        str(MailKind.PASSWORD),
        {"code": CODE},
        locale=locale,
        builtins={"to": RCPT_TO, "service_name": SERVICE_NAME},
    )


def _build(build: Callable[..., bytes], rendered: RenderedMail) -> Callable[[], bytes]:
    def run() -> bytes:
        return build(
            rendered,
            from_address=MAIL_FROM,
            service_name=SERVICE_NAME,
            to=RCPT_TO,
            message_id=MESSAGE_ID,
            now=NOW,
        )

    return run


def _reference_compose(composer: MailComposer) -> Callable[[], bytes]:
    """``MailComposer.compose`` as it was: the same checks and rendering, the old builder."""

    def run() -> bytes:
        rendered = composer.templates.render(
            str(MailKind.PASSWORD),
            {"code": CODE},
            builtins={"to": RCPT_TO, "service_name": composer.service_name},
        )
        return reference_build_message(
            rendered,
            from_address=composer.from_address,
            service_name=composer.service_name,
            to=RCPT_TO,
            message_id=MESSAGE_ID,
            now=NOW,
        )

    return run


def _reading(data: bytes) -> list[tuple[str, ...]]:
    """What a reader sees: the headers in any order (but the boundary), each part's type and
    text."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    seen: list[tuple[str, ...]] = sorted(
        (name.lower(), str(value))
        for name, value in message.items()
        if name.lower() != "content-type"
    )
    seen.append(("type", message.get_content_type()))
    for part in message.walk():
        if not part.is_multipart():
            seen.append((part.get_content_type(), str(part.get_content()).replace("\r\n", "\n")))
    return seen


def _same_reading(ours: bytes, reference: bytes, what: str) -> None:
    if _reading(ours) != _reading(reference):
        raise BenchError(f"compose: {what}: ours and the reference read differently")


def _cpu_ms_per_mail(build: Callable[[], object], mails: int) -> float:
    started = time.process_time()
    for _ in range(mails):
        build()
    return (time.process_time() - started) / mails * 1000


def run_section(profile: Profile) -> Section:
    templates = MailTemplates.load(shipped_templates_dir())
    composer = MailComposer(templates, MAIL_FROM, SERVICE_NAME)
    n = profile.compose_mails
    n_reference = max(1, n // REFERENCE_SHARE)
    variants: list[Variant] = []
    for locale in LOCALES:
        rendered = _rendered(templates, locale)
        ours, reference = _build(build_message, rendered), _build(reference_build_message, rendered)
        _same_reading(ours(), reference(), f"build ({locale})")
        variants += [
            Variant(f"ours_{locale}", f"ours: build + check ({locale})", ours, n),
            Variant(
                f"reference_{locale}",
                f"reference: EmailMessage + parse-back ({locale})",
                reference,
                n_reference,
            ),
        ]
    variants += [
        Variant(
            "ours_compose",
            "ours: MailComposer.compose (en)",
            lambda: composer.compose(MailKind.PASSWORD, RCPT_TO, CODE, NOW),
            n,
        ),
        Variant(
            "reference_compose",
            "reference: compose (en)",
            _reference_compose(composer),
            n_reference,
        ),
    ]
    for v in variants:  # warm: caches, the From field, jinja2's first calls
        _cpu_ms_per_mail(v.build, 3)
    samples: dict[str, list[float]] = {v.key: [] for v in variants}
    for rep in range(profile.repeat):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            samples[v.key].append(_cpu_ms_per_mail(v.build, v.mails))

    section = Section(
        "compose",
        f"CPU per mail building the password mail ({n} mails a sample for ours, {n_reference} "
        f"for the reference; {profile.repeat} interleaved repetitions)",
    )
    for v in variants:
        section.add(v.what, "ms CPU/mail", samples[v.key])
    for locale in LOCALES:
        section.ratio(
            f"compose build+check ours/reference ({locale})",
            samples[f"ours_{locale}"],
            samples[f"reference_{locale}"],
            Target("<=", TARGET_RATIO),
        )
    section.ratio(
        "compose whole compose ours/reference (en)",
        samples["ours_compose"],
        samples["reference_compose"],
    )
    section.notes.append(
        "ours and the reference parse back to the same headers, parts and bodies (checked first)"
    )
    section.raw = {"samples_ms_per_mail": samples}
    return section
