"""Mail templates: loaded and checked at start-up, rendered per request."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderError, TemplateError

VARS = {"code": "739201", "to": "user@example.com", "service_name": "Acme"}


def write_templates(root: Path, **texts: str) -> Path:
    (root / "mail").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (root / "mail" / f"{name}.msg").write_text(text)
    return root


GOOD = (
    "{% block subject %}Code for {{ service_name }}{% endblock %}\n"
    "{% block body %}\n{{ code }} for {{ to }}\n{% endblock %}\n"
)


def test_shipped_password_template_renders_subject_and_body() -> None:
    """The shipped password mail carries the code, the address and the service name."""
    rendered = MailTemplates.load(shipped_templates_dir()).render(MailKind.PASSWORD, VARS)
    assert rendered.subject == "Your Acme password code"
    assert "    739201\n" in rendered.body
    assert "user@example.com" in rendered.body
    assert rendered.body.startswith("Hello,\n")
    assert rendered.body.endswith("Acme\n")


def test_shipped_retrieve_template_renders() -> None:
    """The shipped account-retrieval mail has its own subject and carries the code."""
    rendered = MailTemplates.load(shipped_templates_dir()).render(MailKind.RETRIEVE, VARS)
    assert rendered.subject == "Recover your Acme account"
    assert "    739201\n" in rendered.body


def test_custom_templates_render_exactly(tmp_path: Path) -> None:
    """A template's blocks render to exactly the subject and body it defines."""
    templates = MailTemplates.load(write_templates(tmp_path, password=GOOD, retrieve=GOOD))
    rendered = templates.render(MailKind.RETRIEVE, VARS)
    assert rendered.subject == "Code for Acme"
    assert rendered.body == "739201 for user@example.com\n"


def test_missing_and_broken_templates_are_all_reported(tmp_path: Path) -> None:
    """Start-up lists every missing or broken template at once."""
    write_templates(tmp_path, password="{% block subject %}x{% endblock %}{% block body %}{{ code ")
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'mail/password.msg'}:1: syntax error:")
    assert problems[1] == f"{tmp_path / 'mail/retrieve.msg'}: not found"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{% block body %}x{% endblock %}", "missing block(s) subject"),
        ("no blocks at all", "missing block(s) subject, body"),
        (
            "{% block subject %}{{ nmae }}{% endblock %}{% block body %}x{% endblock %}",
            "does not render with sample values: 'nmae' is undefined",
        ),
        (
            "{% block subject %}{% endblock %}{% block body %}x{% endblock %}",
            "does not render with sample values: the subject is empty",
        ),
        (
            "{% block subject %}a\nb{{ code }}{% endblock %}{% block body %}x{% endblock %}",
            "does not render with sample values: the subject spans more than one line",
        ),
    ],
)
def test_unusable_templates_stop_start_up(tmp_path: Path, text: str, problem: str) -> None:
    """Missing blocks, undefined variables and bad subjects are caught at load time."""
    write_templates(tmp_path, password=text, retrieve=GOOD)
    with pytest.raises(TemplateError) as info:
        MailTemplates.load(tmp_path)
    assert info.value.problems == [f"{tmp_path / 'mail/password.msg'}: {problem}"]


def test_render_error_for_values_that_break_the_subject(tmp_path: Path) -> None:
    """A value that makes the subject too long fails this render, not the service."""
    subject_with_code = GOOD.replace("Code for {{ service_name }}", "Code {{ code }}")
    templates = MailTemplates.load(
        write_templates(tmp_path, password=subject_with_code, retrieve=GOOD)
    )
    with pytest.raises(RenderError, match="the subject is 205 characters, over 200"):
        templates.render(MailKind.PASSWORD, {**VARS, "code": "x" * 200})


def test_mail_kind_values_name_the_template_files() -> None:
    """Golden: the values are the stored kind and the template's file name."""
    assert {k.name: k.value for k in MailKind} == {"PASSWORD": "password", "RETRIEVE": "retrieve"}
    assert MailKind.PASSWORD.template_name == "mail/password.msg"


def test_a_subject_of_exactly_200_characters_is_fine(tmp_path: Path) -> None:
    subject_is_code = GOOD.replace("Code for {{ service_name }}", "{{ code }}")
    templates = MailTemplates.load(
        write_templates(tmp_path, password=subject_is_code, retrieve=GOOD)
    )
    assert templates.render(MailKind.PASSWORD, {**VARS, "code": "x" * 200}).subject == "x" * 200
    with pytest.raises(RenderError, match=r"^the subject is 201 characters, over 200$"):
        templates.render(MailKind.PASSWORD, {**VARS, "code": "x" * 201})


@pytest.mark.parametrize("char", ["\r", "\n", "\x00"])
def test_a_value_that_splits_the_subject_is_refused(tmp_path: Path, char: str) -> None:
    subject_is_code = GOOD.replace("Code for {{ service_name }}", "A{{ code }}B")
    templates = MailTemplates.load(
        write_templates(tmp_path, password=subject_is_code, retrieve=GOOD)
    )
    with pytest.raises(RenderError, match=r"^the subject spans more than one line$"):
        templates.render(MailKind.PASSWORD, {**VARS, "code": f"1{char}2"})


def test_subject_spaces_are_trimmed_and_the_body_ends_with_one_newline(tmp_path: Path) -> None:
    text = (
        "{% block subject %}  Code  {% endblock %}"
        "{% block body %}\n\nfirst <b>{{ code }}</b>{% endblock %}"
    )
    templates = MailTemplates.load(write_templates(tmp_path, password=text, retrieve=GOOD))
    rendered = templates.render(MailKind.PASSWORD, {**VARS, "code": "<1&2>"})
    assert rendered.subject == "Code"
    # One leading newline is layout and goes; the second stays. Plain text: nothing escaped.
    assert rendered.body == "\nfirst <b><1&2></b>\n"


def test_a_body_that_ends_with_a_newline_keeps_exactly_one(tmp_path: Path) -> None:
    text = "{% block subject %}S{% endblock %}{% block body %}line\n{% endblock %}"
    templates = MailTemplates.load(write_templates(tmp_path, password=text, retrieve=GOOD))
    assert templates.render(MailKind.PASSWORD, VARS).body == "line\n"


def test_a_missing_value_at_render_time_is_a_render_error(tmp_path: Path) -> None:
    templates = MailTemplates.load(write_templates(tmp_path, password=GOOD, retrieve=GOOD))
    with pytest.raises(RenderError) as caught:
        templates.render(MailKind.PASSWORD, {"code": "1", "to": "a@b.c"})
    assert str(caught.value) == "mail/password.msg: 'service_name' is undefined"


def test_the_template_error_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as caught:
        MailTemplates.load(tmp_path)
    assert str(caught.value) == (
        "mail templates are not usable:\n"
        f"  - {tmp_path / 'mail/password.msg'}: not found\n"
        f"  - {tmp_path / 'mail/retrieve.msg'}: not found"
    )


def test_the_sample_values_are_used_at_load(tmp_path: Path) -> None:
    """Load renders every template with code, to and service_name; they all work."""
    text = (
        "{% block subject %}{{ code }}{{ to }}{{ service_name }}{% endblock %}"
        "{% block body %}x{% endblock %}"
    )
    templates = MailTemplates.load(write_templates(tmp_path, password=text, retrieve=GOOD))
    assert templates.render(MailKind.PASSWORD, VARS).subject == "739201user@example.comAcme"
    assert templates.directory == tmp_path
    assert "jinja2" not in repr(templates)


@pytest.mark.parametrize("variable", ["code", "to", "service_name"])
def test_a_subject_of_one_variable_loads(tmp_path: Path, variable: str) -> None:
    """The load-time sample values are not empty, so such a subject passes the check."""
    text = (
        f"{{% block subject %}}{{{{ {variable} }}}}{{% endblock %}}"
        "{% block body %}x{% endblock %}"
    )
    templates = MailTemplates.load(write_templates(tmp_path, password=text, retrieve=GOOD))
    assert templates.render(MailKind.PASSWORD, VARS).subject == VARS[variable]
