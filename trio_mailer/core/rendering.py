"""Mail templates: load and check them all at start-up, pick a locale, render the parts.

Pure: no trio, smtplib, purerpc or sqlite3 here.

Theory of operation
-------------------
A template is a Jinja2 file in ``<templates dir>/mail/``: ``<name>.msg`` in the default locale
(``MAILER_DEFAULT_LOCALE``, ``en`` unless set) and ``<name>.<locale>.msg`` for the others
(``password.ru.msg``, ``password.pt-BR.msg``). Each has the blocks ``subject`` (one line),
``text`` (the text/plain part) and, optionally, ``html`` (a text/html alternative). Its first line
declares the variables a caller must send::

    {# requires: code, ttl_minutes #}

The service adds ``to`` (the recipient) and ``service_name`` itself; a caller may send exactly
the declared variables, no fewer and no more. Every variant of a template declares the same set.

The same file is compiled twice: once with autoescaping off (``subject`` and ``text``: plain text
needs no escaping, and ``&lt;`` in a text mail would be a bug), once with autoescaping on (``html``:
every ``{{ value }}`` is HTML-escaped, so a caller's ``<script>`` arrives as text).
``StrictUndefined`` turns a misspelt or undeclared variable into an error. At load time every
template and locale is rendered with sample values, so a broken one stops start-up with its file
and line.

A requested locale falls back from the most specific tag to the least, then to the default:
``pt-BR`` tries ``pt-BR``, ``pt``, then the default locale's chain, then ``<name>.msg``. Tags
compare case-insensitively (``pt-br`` finds ``pt-BR.msg``) and ``_`` counts as ``-``. An unknown
locale is not an error: it just falls back. The locale actually used is the mail's
``Content-Language``.
"""

from __future__ import annotations

import enum
import re
import types
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import jinja2

from trio_mailer.core.errors import InvalidRequest

LEGACY_TEXT_BLOCK = "body"  # templates written before the html part called the text block so
REQUIRED_TEMPLATES = ("password", "retrieve")  # what SendPass and SendRetrieve send
BUILTIN_VARIABLES = frozenset({"to", "service_name"})  # filled in by the service
MAX_SUBJECT_CHARS = 200
MAX_VARIABLE_CHARS = 1000  # one caller-supplied value, after which INVALID_ARGUMENT
MAX_VARIABLES = 32  # how many a template may declare (and so how many a caller may send)
MAX_TEMPLATE_NAME_CHARS = 64
MAX_LOCALE_CHARS = 35  # RFC 5646 section 4.4.1: 35 characters covers every useful tag
DEFAULT_LOCALE = "en"
SAMPLE_VALUE = "123456"  # what every declared variable holds in the start-up check
SAMPLE_BUILTINS = {"to": "user@example.com", "service_name": "trio-mailer"}

TEMPLATE_NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_TEMPLATE_NAME_CHARS - 1}}}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# An RFC 5646 language tag in its common shapes: a 2-3 letter language, then subtags.
LOCALE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")
_REQUIRES = re.compile(r"\{#-?\s*requires:(?P<names>[^#]*?)-?#\}")
# What a template's own expressions raise (`{{ code + 1 }}`, `{{ n // 0 }}`, `{{ d["x"] }}`),
# beside Jinja's errors: a problem of the template, never a crash of the service.
_EXPRESSION_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError)


class MailKind(enum.StrEnum):
    """The two mails with their own gRPC methods; the value is the template name."""

    PASSWORD = "password"
    RETRIEVE = "retrieve"

    @property
    def template_name(self) -> str:
        return f"mail/{self.value}.msg"


class TemplateError(Exception):
    """Templates are missing or broken; raised at start-up (and on reload), listing every one."""

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
    text: str
    html: str | None
    locale: str  # the locale of the variant used: the Content-Language
    template: str = ""

    @property
    def body(self) -> str:
        """The text part (the name templates used before there was an html part)."""
        return self.text


@attrs.frozen
class _Variant:
    """One file: a template in one locale, compiled for text and (when it has one) for html."""

    name: str
    locale: str  # as the file name spells it, or the default locale for ``<name>.msg``
    path: Path
    requires: frozenset[str]
    text_block: str  # "text", or "body" in an old template
    plain: jinja2.Template = attrs.field(repr=False)
    escaped: jinja2.Template | None = attrs.field(repr=False)


def normalize_locale(tag: str) -> str:
    """The lookup key of a locale tag: lower case, ``-`` separated."""
    return tag.replace("_", "-").lower()


def locale_chain(tag: str) -> list[str]:
    """``pt-BR`` -> ``["pt-br", "pt"]``: the tag, then each shorter prefix (lookup keys)."""
    key = normalize_locale(tag)
    parts = key.split("-") if key else []
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


def validate_locale(field: str, value: str) -> str:
    """Check a requested locale's shape (an unknown but well-formed one is fine).

    Raises:
        InvalidRequest: naming ``field``.
    """
    if len(value) > MAX_LOCALE_CHARS:
        raise InvalidRequest(
            field, f"expected at most {MAX_LOCALE_CHARS} characters, got {len(value)}"
        )
    if value and not LOCALE_TAG.fullmatch(value.replace("_", "-")):
        raise InvalidRequest(
            field, f"expected a language tag such as en, ru or pt-BR, got {value[:40]!a}"
        )
    return value


def _line_of(exc: BaseException, templates: Iterable[jinja2.Template | None]) -> int | None:
    """The template line a rendering error came from.

    Blocks are called directly (not through ``Template.render``), so Jinja does not rewrite the
    traceback: the frames are the compiled module's, and its debug info maps them back.
    """
    line = None
    tb: types.TracebackType | None = exc.__traceback__
    while tb is not None:
        for template in templates:
            if template is not None and tb.tb_frame.f_globals.get("blocks") is template.blocks:
                line = template.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _parse_requires(source: str) -> frozenset[str] | None:
    match = _REQUIRES.search(source)
    if match is None:
        return None
    names = [n.strip() for n in match["names"].split(",")]
    return frozenset(n for n in names if n)


@attrs.frozen
class MailTemplates:
    """Every loaded and checked template, by name and locale."""

    directory: Path
    default_locale: str
    # name -> locale lookup key -> variant; the "" key is ``<name>.msg``.
    _variants: Mapping[str, Mapping[str, _Variant]] = attrs.field(repr=False)

    @classmethod
    def load(cls, directory: Path, default_locale: str = DEFAULT_LOCALE) -> MailTemplates:
        """Load ``directory/mail/*.msg``, check each file and render it with sample values.

        Raises:
            TemplateError: listing every problem, each with its file (and line where known).
        """
        mail_dir = directory / "mail"
        loader = jinja2.FileSystemLoader(str(directory))
        common = {"undefined": jinja2.StrictUndefined, "keep_trailing_newline": True}
        plain_env = jinja2.Environment(loader=loader, autoescape=False, **common)  # type: ignore[arg-type]
        html_env = jinja2.Environment(loader=loader, autoescape=True, **common)  # type: ignore[arg-type]
        problems: list[str] = []
        variants: dict[str, dict[str, _Variant]] = {}
        paths = sorted(mail_dir.glob("*.msg")) if mail_dir.is_dir() else []
        named: set[str] = set()  # the names with a file, usable or not
        for path in paths:
            named.add(path.name.split(".", 1)[0])
            variant = _load_variant(path, default_locale, plain_env, html_env, problems)
            if variant is None:
                continue
            key = "" if path.name == f"{variant.name}.msg" else normalize_locale(variant.locale)
            existing = variants.setdefault(variant.name, {})
            if key in existing:
                problems.append(f"{path}: the same locale as {existing[key].path.name}")
                continue
            existing[key] = variant
        for name in REQUIRED_TEMPLATES:
            if name not in named:
                problems.append(f"{mail_dir / f'{name}.msg'}: not found")
        for name, by_locale in sorted(variants.items()):
            if "" not in by_locale and (mail_dir / f"{name}.msg").exists():
                continue  # the default-locale file exists but is broken: reported above
            if "" not in by_locale:
                first = next(iter(by_locale.values()))
                problems.append(
                    f"{mail_dir / f'{name}.msg'}: not found (every template needs one in the "
                    f"default locale; {first.path.name} has no fallback)"
                )
                continue
            base = by_locale[""]
            for variant in by_locale.values():
                if variant.requires != base.requires:
                    mine = ", ".join(sorted(variant.requires)) or "nothing"
                    theirs = ", ".join(sorted(base.requires)) or "nothing"
                    problems.append(
                        f"{variant.path}: requires {mine} but {base.path.name} requires {theirs}"
                    )
        if problems:
            raise TemplateError(problems)
        return cls(directory, default_locale, variants)

    def names(self) -> list[str]:
        """The template names, sorted."""
        return sorted(self._variants)

    def locales(self, name: str) -> list[str]:
        """The locales ``name`` exists in (the default first)."""
        by_locale = self._variants[name]
        return [by_locale[""].locale, *sorted(v.locale for k, v in by_locale.items() if k)]

    def requires(self, name: str) -> frozenset[str]:
        """The variables a caller must send for ``name``.

        Raises:
            InvalidRequest: ``name`` is not a template here (field ``template``).
        """
        return self._variant(name, "").requires

    def check_variables(self, name: str, variables: Mapping[str, str]) -> None:
        """Refuse a request whose variables do not match what ``name`` declares.

        Raises:
            InvalidRequest: an unknown template (field ``template``), or a missing, unknown, too
                long or unsafe variable (field ``vars.<name>``), naming the template.
        """
        required = self.requires(name)
        if len(variables) > MAX_VARIABLES:
            raise InvalidRequest(
                "vars", f"template {name!r}: expected at most {MAX_VARIABLES}, got {len(variables)}"
            )
        for key in sorted(variables):
            if not VARIABLE_NAME.fullmatch(key):
                raise InvalidRequest(
                    "vars", f"template {name!r}: {key[:40]!a} is not a variable name"
                )
            if key not in required:
                declared = ", ".join(sorted(required)) or "nothing"
                raise InvalidRequest(
                    f"vars.{key}",
                    f"template {name!r} does not take this variable (it requires: {declared})",
                )
        for key in sorted(required):
            if key not in variables:
                raise InvalidRequest(f"vars.{key}", f"template {name!r} requires it, got nothing")
            value = variables[key]
            if len(value) > MAX_VARIABLE_CHARS:
                raise InvalidRequest(
                    f"vars.{key}",
                    f"template {name!r}: expected at most {MAX_VARIABLE_CHARS} characters, "
                    f"got {len(value)}",
                )
            # Any variable may land in the Subject header: the header rules apply to all.
            for char in value:
                if unicodedata.category(char) == "Cc" or char in "\u2028\u2029\x85":
                    raise InvalidRequest(
                        f"vars.{key}",
                        f"template {name!r}: control character {char!r} is not allowed",
                    )
            if "=?" in value:
                raise InvalidRequest(
                    f"vars.{key}",
                    f"template {name!r}: '=?' (an RFC 2047 encoded-word opener) is not allowed",
                )

    def resolve(self, name: str, locale: str) -> _Variant:
        """The variant of ``name`` for ``locale``: the tag, its prefixes, then the default.

        Raises:
            InvalidRequest: ``name`` is not a template here.
        """
        by_locale = self._variants.get(name)
        if by_locale is None:
            return self._variant(name, "")
        for key in [*locale_chain(locale), *locale_chain(self.default_locale)]:
            if key in by_locale:
                return by_locale[key]
        return by_locale[""]

    def _variant(self, name: str, key: str) -> _Variant:
        by_locale = self._variants.get(name)
        if by_locale is None:
            shown = name if TEMPLATE_NAME.fullmatch(name) else ascii(name[:40])
            known = ", ".join(self.names()[:20])
            raise InvalidRequest("template", f"unknown template {shown!r} (known: {known})")
        return by_locale[key]

    def render(
        self,
        name: str,
        variables: Mapping[str, str],
        *,
        locale: str = "",
        builtins: Mapping[str, str] | None = None,
    ) -> RenderedMail:
        """Render ``name`` in ``locale`` (falling back) with the caller's ``variables``.

        ``builtins`` (``to``, ``service_name``) come from the service, not the caller; values not
        given are the samples. The variables are not checked here: see ``check_variables``.

        Raises:
            InvalidRequest: ``name`` is not a template here.
            RenderError: the template failed for these values (a Jinja error, or one of its
                expressions raised), or the subject came out empty, too long, or spanning lines.
        """
        variant = self.resolve(name, locale)
        context = {**SAMPLE_BUILTINS, **(builtins or {}), **variables}
        try:
            return _render(variant, context)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{variant.path.name}: {exc}") from exc
        except _EXPRESSION_ERRORS as exc:
            # The template's own expressions, with this request's values (`{{ code | int // n }}`).
            raise RenderError(f"{variant.path.name}: {type(exc).__name__}: {exc}") from exc


def _load_variant(
    path: Path,
    default_locale: str,
    plain_env: jinja2.Environment,
    html_env: jinja2.Environment,
    problems: list[str],
) -> _Variant | None:
    stem = path.name.removesuffix(".msg")
    name, _, locale = stem.partition(".")
    if not TEMPLATE_NAME.fullmatch(name) or (locale and not LOCALE_TAG.fullmatch(locale)):
        problems.append(
            f"{path}: expected a file name <name>.msg or <name>.<locale>.msg (name: lower-case "
            "letters, digits, - and _; locale: a tag such as ru or pt-BR)"
        )
        return None
    relative = f"mail/{path.name}"
    try:
        source = path.read_text(encoding="utf-8")
        plain = plain_env.get_template(relative)
        escaped_full = html_env.get_template(relative)
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text: {exc}")
        return None
    except jinja2.TemplateSyntaxError as exc:
        problems.append(f"{path}:{exc.lineno}: syntax error: {exc.message}")
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return None
    requires = _parse_requires(source)
    if requires is None:
        problems.append(f"{path}:1: no '{{# requires: ... #}}' line declaring its variables")
        return None
    bad = sorted(n for n in requires if not VARIABLE_NAME.fullmatch(n))
    builtin = sorted(requires & BUILTIN_VARIABLES)
    if bad or builtin or len(requires) > MAX_VARIABLES:
        detail = (
            f"{', '.join(bad)} not variable names"
            if bad
            else f"{', '.join(builtin)} provided by the service, not the caller"
            if builtin
            else f"more than {MAX_VARIABLES} variables"
        )
        problems.append(f"{path}: requires: {detail}")
        return None
    text_block = "text" if "text" in plain.blocks else LEGACY_TEXT_BLOCK
    missing = [b for b in ("subject", text_block) if b not in plain.blocks]
    if missing:
        problems.append(f"{path}: missing block(s) {', '.join(missing)}")
        return None
    escaped = escaped_full if "html" in plain.blocks else None
    variant = _Variant(
        name=name,
        locale=locale or default_locale,
        path=path,
        requires=requires,
        text_block=text_block,
        plain=plain,
        escaped=escaped,
    )
    sample = {**SAMPLE_BUILTINS, **dict.fromkeys(requires, SAMPLE_VALUE)}
    try:
        _render(variant, sample)
    except jinja2.UndefinedError as exc:
        line = _line_of(exc, (variant.plain, variant.escaped))
        where = f"{path}:{line}" if line else str(path)
        problems.append(
            f"{where}: does not render with sample values: {exc.message} "
            "(declare caller variables in its requires line)"
        )
        return None
    except (jinja2.TemplateError, RenderError) as exc:
        line = _line_of(exc, (variant.plain, variant.escaped))
        where = f"{path}:{line}" if line else str(path)
        problems.append(f"{where}: does not render with sample values: {exc}")
        return None
    except _EXPRESSION_ERRORS as exc:  # a template's own expression: `{{ code + 1 }}`, `// 0`
        line = _line_of(exc, (variant.plain, variant.escaped))
        where = f"{path}:{line}" if line else str(path)
        problems.append(f"{where}: does not render with sample values: {type(exc).__name__}: {exc}")
        return None
    return variant


def _block(template: jinja2.Template, block: str, values: Mapping[str, str]) -> str:
    context = template.new_context(dict(values))
    return "".join(template.blocks[block](context))


def _tidy(part: str) -> str:
    # One leading newline after "{% block text %}" is layout, not content.
    part = part.removeprefix("\n")
    return part if part.endswith("\n") else part + "\n"


def _render(variant: _Variant, values: Mapping[str, str]) -> RenderedMail:
    subject = _block(variant.plain, "subject", values).strip()
    if not subject:
        raise RenderError("the subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise RenderError(f"the subject is {len(subject)} characters, over {MAX_SUBJECT_CHARS}")
    if any(c in subject for c in "\r\n\x00\u2028\u2029\x85"):
        raise RenderError("the subject spans more than one line")
    text = _tidy(_block(variant.plain, variant.text_block, values))
    html = None
    if variant.escaped is not None:
        html = _tidy(_block(variant.escaped, "html", values))
    return RenderedMail(
        subject=subject, text=text, html=html, locale=variant.locale, template=variant.name
    )


def sample_variables(names: Iterable[str]) -> dict[str, str]:
    """Sample values for ``names``, as the start-up check uses."""
    return dict.fromkeys(names, SAMPLE_VALUE)
