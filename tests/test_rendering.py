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
    normalize_locale,
    sample_variables,
    validate_locale,
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


# ---- more cases: locales, declarations, parts, variables (each branch and boundary) ----


def test_the_locale_chain_is_the_tag_then_its_prefixes_then_the_default_chain(
    tmp_path: Path,
) -> None:
    """Default pt-BR: a request for de-AT tries de-at, de, then pt-br, then pt, then the base."""
    variant = (
        "{# requires: code #}{% block subject %}S-LOCALE{% endblock %}"
        "{% block text %}t{% endblock %}"
    )
    templates = load(tmp_path, default_locale="pt-BR", password_pt=variant.replace("LOCALE", "pt"))
    assert templates.resolve("password", "de-AT").locale == "pt"  # the default's prefix
    assert templates.render("password", CODE, locale="de-AT").subject == "S-pt"
    assert templates.resolve("password", "").locale == "pt"
    # The base file is named after the default locale.
    assert templates.locales("password") == ["pt-BR", "pt"]
    assert templates.locales("retrieve") == ["pt-BR"]


def test_locales_lists_the_default_first_then_the_others_sorted(tmp_path: Path) -> None:
    templates = load(tmp_path, password_ru=GOOD, password_de=GOOD, password_pt__BR=GOOD)
    assert templates.locales("password") == ["en", "de", "pt-BR", "ru"]
    assert templates.names() == ["password", "retrieve"]


def test_a_locale_variant_may_add_or_lack_the_html_part(tmp_path: Path) -> None:
    """The text and html parts come from the variant used: ru has html, the base has not."""
    templates = load(tmp_path, password_ru=WITH_HTML)
    base = templates.render("password", CODE, builtins=BUILTINS)
    ru = templates.render("password", CODE, locale="ru", builtins=BUILTINS)
    assert (base.html, base.locale) == (None, "en")
    assert (ru.subject, ru.text, ru.html) == (
        "Code 739201",
        "text: 739201\n",
        "<p>html: 739201</p>\n",
    )
    assert ru.body == ru.text and ru.template == "password"


def test_parts_lose_one_leading_newline_and_end_with_exactly_one(tmp_path: Path) -> None:
    """The newline after ``{% block text %}`` is layout; a part always ends with a newline."""
    text = (
        "{# requires: code #}{% block subject %}  S {{ code }}  {% endblock %}"
        "{% block text %}\n\n{{ code }}{% endblock %}{% block html %}<b>{{ code }}</b>\n\n"
        "{% endblock %}"
    )
    rendered = load(tmp_path, password=text).render("password", CODE)
    assert rendered.subject == "S 739201"  # stripped
    assert rendered.text == "\n739201\n"
    assert rendered.html == "<b>739201</b>\n\n"


def test_builtins_default_to_the_samples_and_callers_cannot_override_them_by_default(
    tmp_path: Path,
) -> None:
    templates = load(tmp_path)
    assert templates.render("password", CODE).subject == "Code for trio-mailer"
    assert templates.render("password", CODE).text == "739201 for user@example.com\n"
    only_name = templates.render("password", CODE, builtins={"service_name": "Acme"})
    assert only_name.text == "739201 for user@example.com\n"  # ``to`` keeps its sample


@pytest.mark.parametrize(
    ("line", "declared"),
    [
        ("{# requires: code #}", {"code"}),
        ("{#- requires: code, ttl_minutes -#}", {"code", "ttl_minutes"}),
        ("{#requires:code,ttl_minutes#}", {"code", "ttl_minutes"}),
        ("{# requires: code, , ttl_minutes, #}", {"code", "ttl_minutes"}),
        ("{# requires: #}", set()),
    ],
)
def test_requires_declarations_in_their_spellings(
    tmp_path: Path, line: str, declared: set[str]
) -> None:
    """The first ``{# requires: ... #}`` declares the variables; blanks between commas drop."""
    body = "".join(f"{{{{ {name} }}}}" for name in sorted(declared))
    text = f"{line}{{% block subject %}}S{{% endblock %}}{{% block text %}}x{body}{{% endblock %}}"
    templates = load(tmp_path, welcome=text)
    assert templates.requires("welcome") == declared
    templates.check_variables("welcome", dict.fromkeys(declared, "v"))
    assert templates.render("welcome", dict.fromkeys(declared, "v")).text == (
        "x" + "v" * len(declared) + "\n"
    )


def test_a_template_that_requires_nothing_takes_no_variables(tmp_path: Path) -> None:
    templates = load(
        tmp_path,
        welcome="{# requires: #}{% block subject %}Hi{% endblock %}{% block text %}x{% endblock %}",
    )
    templates.check_variables("welcome", {})
    with pytest.raises(InvalidRequest) as info:
        templates.check_variables("welcome", {"code": "1"})
    assert (info.value.field, info.value.message) == (
        "vars.code",
        "vars.code: template 'welcome' does not take this variable (it requires: nothing)",
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{# requires: code, 1x, a-b #}", "requires: 1x, a-b not variable names"),
        ("{# requires: code, service_name #}", "requires: service_name provided by the service"),
        (
            "{# requires: " + ", ".join(f"v{i}" for i in range(33)) + " #}",
            "requires: more than 32 variables",
        ),
    ],
)
def test_bad_requires_declarations_stop_start_up(tmp_path: Path, line: str, problem: str) -> None:
    write_templates(
        tmp_path,
        password=f"{line}{{% block subject %}}x{{% endblock %}}{{% block text %}}x{{% endblock %}}",
        retrieve=GOOD,
    )
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    (only,) = info.value.problems
    assert only.startswith(f"{tmp_path / 'mail/password.msg'}: {problem}")


def test_thirty_two_declared_variables_are_the_most(tmp_path: Path) -> None:
    names = [f"v{i:02d}" for i in range(32)]
    text = (
        "{# requires: " + ", ".join(names) + " #}{% block subject %}x{% endblock %}"
        "{% block text %}" + "".join(f"{{{{ {n} }}}}" for n in names) + "{% endblock %}"
    )
    templates = load(tmp_path, welcome=text)
    templates.check_variables("welcome", dict.fromkeys(names, "1"))
    assert templates.render("welcome", dict.fromkeys(names, "1")).text == "1" * 32 + "\n"


@pytest.mark.parametrize(
    ("variables", "field", "message"),
    [
        (
            {f"v{i}": "1" for i in range(33)},
            "vars",
            "vars: template 'password': expected at most 32, got 33",
        ),
        (
            {f"v{i:02d}": "1" for i in range(32)},  # 32 is not too many: each is unknown
            "vars.v00",
            "vars.v00: template 'password' does not take this variable (it requires: code)",
        ),
        (
            {**CODE, "1x": "1"},
            "vars",
            "vars: template 'password': '1x' is not a variable name",
        ),
        (
            {**CODE, "b": "1", "a": "1"},  # the first unknown one in name order
            "vars.a",
            "vars.a: template 'password' does not take this variable (it requires: code)",
        ),
        (
            {"code": "a\u2028b"},
            "vars.code",
            "vars.code: template 'password': control character '\\u2028' is not allowed",
        ),
        (
            {"code": "a\x85b"},
            "vars.code",
            "vars.code: template 'password': control character '\\x85' is not allowed",
        ),
        (
            {"code": "\t"},
            "vars.code",
            "vars.code: template 'password': control character '\\t' is not allowed",
        ),
    ],
)
def test_more_variable_problems_name_their_field(
    tmp_path: Path, variables: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        load(tmp_path).check_variables("password", variables)
    assert (info.value.field, info.value.message) == (field, message)


def test_every_missing_variable_is_named_in_order(tmp_path: Path) -> None:
    """Two declared, one sent: the missing one is named (and the first missing, of two)."""
    text = GOOD.replace("requires: code", "requires: code, ttl").replace("{{ to }}", "{{ ttl }}")
    templates = load(tmp_path, welcome=text)
    with pytest.raises(InvalidRequest) as info:
        templates.check_variables("welcome", CODE)
    assert info.value.field == "vars.ttl"
    with pytest.raises(InvalidRequest) as info:
        templates.check_variables("welcome", {})
    assert info.value.field == "vars.code"


@pytest.mark.parametrize("value", ["x" * MAX_VARIABLE_CHARS, "=", "a ? b", "é ü 中", ""])
def test_values_up_to_the_limit_and_without_control_characters_pass(
    tmp_path: Path, value: str
) -> None:
    load(tmp_path).check_variables("password", {"code": value})


def test_an_unknown_template_is_refused_everywhere_naming_the_field(tmp_path: Path) -> None:
    templates = load(tmp_path)
    for call in (
        lambda: templates.requires("nope"),
        lambda: templates.resolve("nope", "en"),
        lambda: templates.render("nope", CODE),
    ):
        with pytest.raises(InvalidRequest) as info:
            call()
        assert info.value.message == "template: unknown template 'nope' (known: password, retrieve)"
    with pytest.raises(InvalidRequest) as info:
        templates.requires("Bad\nName")
    assert info.value.message == (
        "template: unknown template \"'Bad\\\\nName'\" (known: password, retrieve)"
    )


def test_a_value_that_breaks_a_template_at_render_time_is_a_render_error(tmp_path: Path) -> None:
    """Samples render; another value reaches an undefined name: RenderError with the file."""
    text = GOOD.replace(
        "{{ code }} for", '{% if code == "boom" %}{{ nowhere }}{% endif %}{{ code }} for'
    )
    templates = load(tmp_path, password=text)
    with pytest.raises(RenderError) as info:
        templates.render("password", {"code": "boom"})
    assert str(info.value) == "password.msg: 'nowhere' is undefined"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("x" * 195, None),  # "Code " + 195: exactly 200
        ("x" * 196, "the subject is 201 characters, over 200"),
        ("a\x85b", "the subject spans more than one line"),
        ("a\u2029b", "the subject spans more than one line"),
        ("a\x00b", "the subject spans more than one line"),
        ("   ", None),  # "Code" after stripping: not empty
    ],
)
def test_the_subject_limits(tmp_path: Path, value: str, error: str | None) -> None:
    templates = load(
        tmp_path, password=GOOD.replace("Code for {{ service_name }}", "Code {{ code }}")
    )
    if error is None:
        assert templates.render("password", {"code": value}).subject == f"Code {value}".strip()
    else:
        with pytest.raises(RenderError, match=error):
            templates.render("password", {"code": value})


def test_an_empty_subject_at_render_time_is_a_render_error(tmp_path: Path) -> None:
    templates = load(tmp_path, password=GOOD.replace("Code for {{ service_name }}", "{{ code }}"))
    with pytest.raises(RenderError, match="the subject is empty"):
        templates.render("password", {"code": "  "})


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"password_pt__BR": GOOD, "password_pt__br": GOOD}, "the same locale as"),
        ({"password_x": GOOD}, "expected a file name <name>.msg or <name>.<locale>.msg"),
        ({("a" * 65): GOOD}, "expected a file name <name>.msg or <name>.<locale>.msg"),
    ],
)
def test_bad_or_clashing_file_names_are_reported(
    tmp_path: Path, files: dict[str, str], problem: str
) -> None:
    write_templates(tmp_path, password=GOOD, retrieve=GOOD, **files)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    (only,) = info.value.problems
    assert problem in only
    assert str(info.value) == f"mail templates are not usable:\n  - {only}"


def test_a_64_character_template_name_is_fine(tmp_path: Path) -> None:
    assert "a" * 64 in load(tmp_path, **{"a" * 64: GOOD}).names()


def test_a_broken_default_file_is_reported_once_and_its_variants_not_again(
    tmp_path: Path,
) -> None:
    """welcome.msg is broken and welcome.ru.msg fine: one problem, about welcome.msg."""
    write_templates(tmp_path, password=GOOD, retrieve=GOOD, welcome="{{ oops", welcome_ru=GOOD)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    (only,) = info.value.problems
    assert only.startswith(f"{tmp_path / 'mail/welcome.msg'}:1: syntax error:")


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    write_templates(tmp_path, password=GOOD, retrieve=GOOD)
    (tmp_path / "mail" / "welcome.msg").write_bytes(b"{# requires: #}\xff\xfe")
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    (only,) = info.value.problems
    assert only.startswith(f"{tmp_path / 'mail/welcome.msg'}: not UTF-8 text:")


def test_no_mail_directory_reports_both_required_templates(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'mail/password.msg'}: not found",
        f"{tmp_path / 'mail/retrieve.msg'}: not found",
    ]


def test_a_render_error_in_the_html_part_names_its_line(tmp_path: Path) -> None:
    """A name undefined only in the html block: found at load, with the line of the block."""
    text = WITH_HTML.replace("<p>html: {{ code }}</p>", "<p>{{ missing }}</p>")
    write_templates(tmp_path, password=text, retrieve=GOOD)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'mail/password.msg'}:7: does not render with sample values: 'missing' is "
        "undefined (declare caller variables in its requires line)"
    ]


def test_a_template_expression_that_raises_is_a_listed_problem_not_a_crash(
    tmp_path: Path,
) -> None:
    """``{{ code + 1 }}`` (a str plus an int) or ``// 0``: start-up lists it with file and line.

    (It used to escape ``load`` as a bare TypeError or ZeroDivisionError.)"""
    write_templates(
        tmp_path,
        password=GOOD.replace("{{ code }} for", "{{ code | int // 0 }} for"),
        retrieve=GOOD.replace("{{ code }} for", "{{ code + 1 }} for"),
    )
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    mail = tmp_path / "mail"
    assert info.value.problems == [
        f"{mail / 'password.msg'}:4: does not render with sample values: "
        "ZeroDivisionError: integer division or modulo by zero",
        f"{mail / 'retrieve.msg'}:4: does not render with sample values: "
        'TypeError: can only concatenate str (not "int") to str',
    ]


def test_a_template_expression_that_raises_for_a_value_is_a_render_error(tmp_path: Path) -> None:
    """Samples render, but ``{{ 100 // code | int }}`` with code "0" raises: a RenderError."""
    templates = load(
        tmp_path, password=GOOD.replace("{{ code }} for", "{{ 100 // code | int }} for")
    )
    assert templates.render("password", {"code": "4"}).text == "25 for user@example.com\n"
    with pytest.raises(RenderError) as info:
        templates.render("password", {"code": "0"})
    assert str(info.value) == "password.msg: ZeroDivisionError: integer division or modulo by zero"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("en", True),
        ("pt_BR", True),
        ("zh-Hant-TW", True),
        ("a" * 2 + "-abcdefgh" * 3 + "-abcde", True),  # 35 characters
        ("a" * 2 + "-abcdefgh" * 3 + "-abcdef", False),  # 36
        ("e", False),
        ("en\nBcc", False),
        ("en-", False),
        ("english", False),
    ],
)
def test_a_requested_locale_is_checked_for_shape(value: str, ok: bool) -> None:
    if ok:
        assert validate_locale("locale", value) == value
        return
    with pytest.raises(InvalidRequest) as info:
        validate_locale("locale", value)
    assert info.value.field == "locale"
    if len(value) > 35:
        assert info.value.message == f"locale: expected at most 35 characters, got {len(value)}"
    else:
        assert info.value.message == (
            f"locale: expected a language tag such as en, ru or pt-BR, got {value!a}"
        )


def test_small_helpers() -> None:
    assert MailKind.PASSWORD.template_name == "mail/password.msg"
    assert sample_variables(["a", "b"]) == {"a": "123456", "b": "123456"}
    assert normalize_locale("pt_BR") == "pt-br"


def test_the_limits_are_the_ones_the_readme_documents() -> None:
    """README "Templates": a change here changes what a caller may send."""
    from trio_mailer.core import rendering

    assert (
        rendering.MAX_SUBJECT_CHARS,
        rendering.MAX_VARIABLE_CHARS,
        rendering.MAX_VARIABLES,
        rendering.MAX_TEMPLATE_NAME_CHARS,
        rendering.MAX_LOCALE_CHARS,
    ) == (200, 1000, 32, 64, 35)
    assert rendering.TEMPLATE_NAME.fullmatch("a" * 64)
    assert not rendering.TEMPLATE_NAME.fullmatch("a" * 65)


def test_every_problem_is_listed_one_a_line(tmp_path: Path) -> None:
    error = TemplateError(["first", "second"])
    assert str(error) == "mail templates are not usable:\n  - first\n  - second"


def test_a_rendered_mail_names_no_template_unless_told() -> None:
    from trio_mailer.core.rendering import RenderedMail

    assert RenderedMail("s", "t\n", None, "en").template == ""


def test_variables_on_both_sides_of_a_requires_mismatch_are_listed(tmp_path: Path) -> None:
    """A variant requiring nothing against a base requiring two: both spelt out."""
    base = GOOD.replace("requires: code", "requires: code, ttl").replace(
        "{{ code }}", "{{ code }} {{ ttl }}"
    )
    variant = GOOD.replace("requires: code", "requires:").replace("{{ code }} for", "for")
    write_templates(tmp_path, password=GOOD, retrieve=GOOD, welcome=base, welcome_ru=variant)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'mail/welcome.ru.msg'}: requires nothing but welcome.msg requires code, ttl"
    ]
    write_templates(tmp_path, welcome=variant, welcome_ru=base)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'mail/welcome.ru.msg'}: requires code, ttl but welcome.msg requires nothing"
    ]


def test_an_unknown_variable_is_refused_listing_what_the_template_takes(tmp_path: Path) -> None:
    base = GOOD.replace("requires: code", "requires: code, ttl").replace(
        "{{ code }}", "{{ code }} {{ ttl }}"
    )
    templates = load(tmp_path, welcome=base)
    with pytest.raises(InvalidRequest) as info:
        templates.check_variables("welcome", {"code": "1", "ttl": "2", "zzz": "3"})
    assert info.value.message == (
        "vars.zzz: template 'welcome' does not take this variable (it requires: code, ttl)"
    )


def test_an_unknown_template_error_shows_at_most_40_characters_and_20_names(
    tmp_path: Path,
) -> None:
    names = {f"t{i:02d}": GOOD for i in range(25)}
    templates = load(tmp_path, **names)
    known = ", ".join(templates.names()[:20])
    assert len(templates.names()) == 27 and known.count(",") == 19
    bad = "Ü" + "x" * 60
    with pytest.raises(InvalidRequest) as info:
        templates.requires(bad)
    assert info.value.message == (
        f"template: unknown template {ascii(bad[:40])!r} (known: {known})"
    )


def test_a_template_path_that_cannot_be_read_is_reported(tmp_path: Path) -> None:
    write_templates(tmp_path, password=GOOD, retrieve=GOOD)
    (tmp_path / "mail" / "welcome.msg").mkdir()  # a directory where a file should be
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    (only,) = info.value.problems
    assert only.startswith(f"{tmp_path / 'mail/welcome.msg'}: cannot read:")
