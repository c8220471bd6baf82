"""Mail templates: load them once at start-up, check them, render subject and body.

Pure. A template is a Jinja2 file ``mail/<kind>.msg`` with two blocks, ``subject`` and
``body``; the variables are ``code``, ``to`` and ``service_name``. ``StrictUndefined`` turns a
misspelt variable into an error, and every template is rendered once with sample values at
load time so that a broken template stops start-up instead of failing the first request.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path

import attrs
import jinja2

REQUIRED_BLOCKS = ("subject", "body")
MAX_SUBJECT_CHARS = 200
_SAMPLE = {"code": "123456", "to": "user@example.com", "service_name": "trio-mailer"}


class MailKind(enum.Enum):
    """Which mail a request asks for; the value names the template file."""

    PASSWORD = "password"
    RETRIEVE = "retrieve"

    @property
    def template_name(self) -> str:
        return f"mail/{self.value}.msg"


class TemplateError(Exception):
    """A template is missing or broken; raised at start-up, listing every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "mail templates are not usable:\n" + "\n".join(f"  - {p}" for p in problems)
        )
        self.problems = problems


class RenderError(Exception):
    """Rendering failed for this request's values (the caller maps it, without detail)."""


@attrs.frozen
class RenderedMail:
    subject: str
    body: str


@attrs.frozen
class MailTemplates:
    """The loaded, checked templates of every ``MailKind``."""

    directory: Path
    _templates: Mapping[MailKind, jinja2.Template] = attrs.field(repr=False)

    @classmethod
    def load(cls, directory: Path) -> MailTemplates:
        """Load and check ``directory/mail/<kind>.msg`` for every kind.

        Raises:
            TemplateError: listing every missing or broken template.
        """
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(directory)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # plain-text mail, not HTML
            keep_trailing_newline=True,
        )
        problems: list[str] = []
        templates: dict[MailKind, jinja2.Template] = {}
        for kind in MailKind:
            path = directory / kind.template_name
            try:
                template = env.get_template(kind.template_name)
            except jinja2.TemplateNotFound:
                problems.append(f"{path}: not found")
                continue
            except jinja2.TemplateSyntaxError as exc:
                problems.append(f"{path}:{exc.lineno}: syntax error: {exc.message}")
                continue
            missing = [b for b in REQUIRED_BLOCKS if b not in template.blocks]
            if missing:
                problems.append(f"{path}: missing block(s) {', '.join(missing)}")
                continue
            try:
                _render(template, _SAMPLE)
            except (jinja2.TemplateError, RenderError) as exc:
                problems.append(f"{path}: does not render with sample values: {exc}")
                continue
            templates[kind] = template
        if problems:
            raise TemplateError(problems)
        return cls(directory, templates)

    def render(self, kind: MailKind, variables: Mapping[str, str]) -> RenderedMail:
        """Render ``kind`` with ``variables``.

        Raises:
            RenderError: the template failed for these values, or the subject came out empty,
                too long, or spanning lines.
        """
        try:
            return _render(self._templates[kind], variables)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{kind.template_name}: {exc}") from exc


def _render(template: jinja2.Template, variables: Mapping[str, str]) -> RenderedMail:
    context = template.new_context(dict(variables))
    subject = "".join(template.blocks["subject"](context)).strip()
    body = "".join(template.blocks["body"](context))
    if not subject:
        raise RenderError("the subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise RenderError(f"the subject is {len(subject)} characters, over {MAX_SUBJECT_CHARS}")
    if any(c in subject for c in "\r\n\x00"):
        raise RenderError("the subject spans more than one line")
    # One leading newline after "{% block body %}" is layout, not content.
    body = body.removeprefix("\n")
    if not body.endswith("\n"):
        body += "\n"
    return RenderedMail(subject=subject, body=body)
