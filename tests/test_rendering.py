"""Mail templates: parts, locales, declared variables; loaded and checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.rendering import (
    MAX_VARIABLE_CHARS,
    MailKind,
    MailTemplates,
    RenderError,
    TemplateError,
    locale_chain,
)

BUILTINS = {"to": "user@example.com", "service_name": "Acme"}
CODE = {"code": "739201"}


def write_templates(root: Path, **texts: str) -> Path:
    """``name_ru="..."`` writes ``mail/name.ru.msg`` (``_`` before the locale, ``-`` inside it
    spelt ``__``: ``name_pt__BR`` is ``name.pt-BR.msg``)."""
    (root / "mail").mkdir(parents=True, exist_ok=True)
    for key, text in texts.items():
        name, _, locale = key.partition("_")
        file_name = f"{name}.{locale.replace('__', '-')}.msg" if locale else f"{name}.msg"
        (root / "mail" / file_name).write_text(text, encoding="utf-8")
    return root


GOOD = (
    "{# requires: code #}\n"
    "{% block subject %}Code for {{ service_name }}{% endblock %}\n"
    "{% block text %}\n{{ code }} for {{ to }}\n{% endblock %}\n"
)
WITH_HTML = (
    "{# requires: code #}\n"
    "{% block subject %}Code {{ code }}{% endblock %}\n"
    "{% block text %}\ntext: {{ code }}\n{% endblock %}\n"
    "{% block html %}\n<p>html: {{ code }}</p>\n{% endblock %}\n"
)


def load(tmp_path: Path, default_locale: str = "en", **texts: str) -> MailTemplates:
    texts.setdefault("password", GOOD)
    texts.setdefault("retrieve", GOOD)
    return MailTemplates.load(write_templates(tmp_path, **texts), default_locale)


def test_shipped_password_template_renders_both_parts() -> None:
    """The shipped password mail: subject, a text part with the code, and an html part."""
    rendered = MailTemplates.load(shipped_templates_dir()).render(
        "password", CODE, builtins=BUILTINS
    )
    assert rendered.subject == "Your Acme password code"
    assert rendered.locale == "en"
    assert "    739201\n" in rendered.text
    assert "user@example.com" in rendered.text
    assert rendered.text.startswith("Hello,\n")
    assert rendered.text.endswith("Acme\n")
    assert rendered.html is not None
    assert '<html lang="en">' in rendered.html
    assert ">739201</code>" in rendered.html
    # Self-contained: no remote image, font or stylesheet, no <style> block to be stripped.
    assert "http" not in rendered.html and "<img" not in rendered.html
    assert "<style" not in rendered.html and "<link" not in rendered.html


@pytest.mark.parametrize("name", ["password", "retrieve"])
def test_shipped_templates_exist_in_english_and_russian(name: str) -> None:
    """Both shipped mails come in en and ru, with the same declared variables."""
    templates = MailTemplates.load(shipped_templates_dir())
    assert templates.locales(name) == ["en", "ru"]
    assert templates.requires(name) == {"code"}
    ru = templates.render(name, CODE, locale="ru", builtins=BUILTINS)
    assert ru.locale == "ru"
    assert ru.html is not None and '<html lang="ru">' in ru.html
    assert "739201" in ru.text and ">739201</code>" in ru.html
    assert any("\u0400" <= c <= "\u04ff" for c in ru.subject)  # Cyrillic


def test_legacy_kind_names_are_template_names() -> None:
    """MailKind values are the shipped templates' names (what old outbox rows store)."""
    assert [str(kind) for kind in MailKind] == ["password", "retrieve"]


def test_custom_templates_render_exactly(tmp_path: Path) -> None:
    """A template's blocks render to exactly the subject and text it defines; no html part."""
    rendered = load(tmp_path).render("retrieve", CODE, builtins=BUILTINS)
    assert rendered.subject == "Code for Acme"
    assert rendered.text == "739201 for user@example.com\n"
    assert rendered.html is None


def test_html_is_autoescaped_and_text_is_verbatim(tmp_path: Path) -> None:
    """``<script>`` in a variable arrives escaped in the html part and as-is in the text part."""
    templates = load(tmp_path, welcome=WITH_HTML.replace("Code {{ code }}", "Hi"))
    value = "<script>alert('x')</script> & \"q\""
    rendered = templates.render("welcome", {"code": value}, builtins=BUILTINS)
    assert rendered.text == f"text: {value}\n"
    assert rendered.html == (
        "<p>html: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;q&#34;</p>\n"
    )


@pytest.mark.parametrize(
    ("requested", "used"),
    [
        ("pt-BR", "pt-BR"),
        ("pt-br", "pt-BR"),
        ("pt_BR", "pt-BR"),
        ("pt-PT", "pt"),
        ("pt", "pt"),
        ("ru", "ru"),
        ("ru-RU", "ru"),
        ("de", "en"),
        ("", "en"),
        ("zh-Hant-TW", "en"),
    ],
)
def test_locale_falls_back_to_prefix_then_default(
    tmp_path: Path, requested: str, used: str
) -> None:
    """pt-BR -> pt -> the default; an unknown locale is not an error."""
    variant = (
        "{# requires: code #}{% block subject %}S-LOCALE{% endblock %}"
        "{% block text %}t{% endblock %}"
    )
    templates = load(
        tmp_path,
        password_ru=variant.replace("LOCALE", "ru"),
        password_pt=variant.replace("LOCALE", "pt"),
        password_pt__BR=variant.replace("LOCALE", "pt-BR"),
    )
    rendered = templates.render("password", CODE, locale=requested, builtins=BUILTINS)
    assert rendered.locale == used
    assert rendered.subject == ("Code for Acme" if used == "en" else f"S-{used}")


def test_default_locale_chain_is_tried_before_the_base_file(tmp_path: Path) -> None:
    """With MAILER_DEFAULT_LOCALE=ru, an unknown locale gets the ru variant."""
    templates = load(
        tmp_path,
        default_locale="ru",
        password_ru=GOOD.replace("Code for", "Код для"),
    )
    assert templates.render("password", CODE, locale="de", builtins=BUILTINS).locale == "ru"


def test_locale_chain() -> None:
    assert locale_chain("pt-BR") == ["pt-br", "pt"]
    assert locale_chain("zh_Hant_TW") == ["zh-hant-tw", "zh-hant", "zh"]
    assert locale_chain("") == []


@pytest.mark.parametrize(
    ("template", "variables", "field", "message"),
    [
        ("nope", CODE, "template", "template: unknown template 'nope' (known: password, retrieve)"),
        ("password", {}, "vars.code", "vars.code: template 'password' requires it, got nothing"),
        (
            "password",
            {**CODE, "extra": "1"},
            "vars.extra",
            "vars.extra: template 'password' does not take this variable (it requires: code)",
        ),
        (
            "password",
            {"code": "x" * (MAX_VARIABLE_CHARS + 1)},
            "vars.code",
            f"vars.code: template 'password': expected at most {MAX_VARIABLE_CHARS} characters, "
            f"got {MAX_VARIABLE_CHARS + 1}",
        ),
        (
            "password",
            {"code": "1\r\nBcc: x@y.z"},
            "vars.code",
            "vars.code: template 'password': control character '\\r' is not allowed",
        ),
        (
            "password",
            {"code": "=?utf-8?q?x?="},
            "vars.code",
            "vars.code: template 'password': '=?' (an RFC 2047 encoded-word opener) is not allowed",
        ),
        (
            "password",
            {**CODE, "to": "other@example.com"},
            "vars.to",
            "vars.to: template 'password' does not take this variable (it requires: code)",
        ),
    ],
)
def test_variables_are_checked_against_the_declaration(
    tmp_path: Path, template: str, variables: dict[str, str], field: str, message: str
) -> None:
    """Unknown template, missing/unknown/too long/unsafe variable: named, with the template."""
    templates = load(tmp_path)
    with pytest.raises(InvalidRequest) as info:
        templates.check_variables(template, variables)
    assert info.value.field == field
    assert info.value.message == message


def test_missing_and_broken_templates_are_all_reported(tmp_path: Path) -> None:
    """Start-up lists every missing or broken template at once, with file and line."""
    write_templates(
        tmp_path,
        password=(
            "{# requires: code #}\n{% block subject %}x{% endblock %}\n{% block text %}{{ code "
        ),
    )
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'mail/password.msg'}:3: syntax error:")
    assert problems[1] == f"{tmp_path / 'mail/retrieve.msg'}: not found"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "{# requires: code #}{% block text %}x{% endblock %}",
            "missing block(s) subject",
        ),
        ("{# requires: #}no blocks at all", "missing block(s) subject, body"),
        (
            "{% block subject %}x{% endblock %}{% block text %}x{% endblock %}",
            "1: no '{# requires: ... #}' line declaring its variables",
        ),
        (
            "{# requires: code, to #}{% block subject %}x{% endblock %}"
            "{% block text %}x{% endblock %}",
            "requires: to provided by the service, not the caller",
        ),
        (
            "{# requires: code #}\n{% block subject %}x{% endblock %}\n{% block text %}\n"
            "line\n{{ nmae }}\n{% endblock %}",
            "5: does not render with sample values: 'nmae' is undefined "
            "(declare caller variables in its requires line)",
        ),
        (
            "{# requires: code #}{% block subject %}{% endblock %}{% block text %}x{% endblock %}",
            "does not render with sample values: the subject is empty",
        ),
        (
            "{# requires: code #}{% block subject %}a\nb{{ code }}{% endblock %}"
            "{% block text %}x{% endblock %}",
            "does not render with sample values: the subject spans more than one line",
        ),
    ],
)
def test_unusable_templates_stop_start_up(tmp_path: Path, text: str, problem: str) -> None:
    """Missing blocks or declarations, undefined variables, bad subjects: caught at load."""
    write_templates(tmp_path, password=text, retrieve=GOOD)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    separator = "" if problem[0].isdigit() else " "
    assert info.value.problems == [f"{tmp_path / 'mail/password.msg'}:{separator}{problem}"]


def test_a_broken_locale_variant_stops_start_up_naming_it(tmp_path: Path) -> None:
    """A locale variant is checked like the base file, and must declare the same variables."""
    write_templates(
        tmp_path,
        password=GOOD,
        retrieve=GOOD,
        password_ru="{# requires: code #}\n{% block subject %}{{ oops }}{% endblock %}"
        "{% block text %}x{% endblock %}",
        retrieve_ru=GOOD.replace("requires: code", "requires: code, ttl"),
        welcome_de=GOOD,
    )
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    mail = tmp_path / "mail"
    assert info.value.problems == [
        f"{mail / 'password.ru.msg'}:2: does not render with sample values: 'oops' is undefined "
        "(declare caller variables in its requires line)",
        f"{mail / 'retrieve.ru.msg'}: requires code, ttl but retrieve.msg requires code",
        f"{mail / 'welcome.msg'}: not found (every template needs one in the default locale; "
        "welcome.de.msg has no fallback)",
    ]


def test_bad_file_names_are_reported(tmp_path: Path) -> None:
    """A file that is neither <name>.msg nor <name>.<locale>.msg is a start-up problem."""
    (write_templates(tmp_path, password=GOOD, retrieve=GOOD) / "mail" / "Bad Name.msg").write_text(
        GOOD
    )
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems[0].startswith(f"{tmp_path / 'mail/Bad Name.msg'}: expected a file")


def test_old_body_block_still_works(tmp_path: Path) -> None:
    """A template written before the html part (block ``body``) renders as the text part."""
    old = GOOD.replace("block text", "block body")
    assert load(tmp_path, password=old).render("password", CODE, builtins=BUILTINS).text == (
        "739201 for user@example.com\n"
    )


def test_render_error_for_values_that_break_the_subject(tmp_path: Path) -> None:
    """A value that makes the subject too long fails this render, not the service."""
    templates = load(
        tmp_path, password=GOOD.replace("Code for {{ service_name }}", "Code {{ code }}")
    )
    with pytest.raises(RenderError, match="the subject is 205 characters, over 200"):
        templates.render("password", {"code": "x" * 200}, builtins=BUILTINS)


def test_default_locale_setting_is_checked() -> None:
    """MAILER_DEFAULT_LOCALE: en unless set; a malformed tag is a start-up problem."""
    from trio_mailer.core.config import ConfigError, load_config

    env = {
        "MAILER_REMOTE_HOST": "relay.example.com",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_OUTBOX": "memory",
    }
    assert load_config(env).default_locale == "en"
    assert load_config({**env, "MAILER_DEFAULT_LOCALE": "pt-BR"}).default_locale == "pt-BR"
    with pytest.raises(ConfigError) as info:
        load_config({**env, "MAILER_DEFAULT_LOCALE": "en\nBcc"})
    assert any(
        p.startswith("MAILER_DEFAULT_LOCALE: expected a language tag") for p in info.value.problems
    )
