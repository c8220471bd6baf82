"""Configuration from MAILER_* variables: defaults, parsing, and every problem at once."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from trio_mailer.core.config import (
    SETTINGS,
    Config,
    ConfigError,
    TlsMode,
    load_config,
    parse_host_port,
    shipped_templates_dir,
    unknown_variables,
)

MINIMAL = {
    "MAILER_REMOTE_HOST": "smtp.example.com:465",
    "MAILER_FROM": "noreply@example.com",
    "HOME": "/home/mailer",
}


def test_minimal_config_gets_the_documented_defaults() -> None:
    """Only the two required variables: everything else takes its default."""
    config = load_config(MINIMAL)
    assert config == Config(
        relay_host="smtp.example.com",
        relay_port=465,
        relays=(("smtp.example.com", 465),),
        smtp_tls=TlsMode.IMPLICIT,
        mail_from="noreply@example.com",
        service_name="trio-mailer",
        smtp_user=None,
        smtp_password=None,
        smtp_ca_file=None,
        smtp_timeout_s=30.0,
        serve_host="127.0.0.1",
        serve_port=20100,
        queue_size=10,
        templates_dir=shipped_templates_dir(),
        shutdown_grace_s=10.0,
        retry_base_s=1.0,
        retry_max_s=60.0,
        max_attempts=1000,
        message_ttl_s=600.0,
        retry_capacity=100,
        smtp_sessions=1,
        noop_idle_s=1.0,
        session_max_messages=100,
        session_max_age_s=300.0,
        outbox_path=Path("/home/mailer/.local/state/trio-mailer/outbox.sqlite3"),
        status_retention_s=86400.0,
    )


def test_shipped_templates_are_found() -> None:
    """The default templates directory holds the two mail templates."""
    assert (shipped_templates_dir() / "mail" / "password.msg").is_file()
    assert (shipped_templates_dir() / "mail" / "retrieve.msg").is_file()


@pytest.mark.parametrize(
    ("tls", "port"), [("implicit", 465), ("starttls", 587), ("none", 25), ("STARTTLS", 587)]
)
def test_relay_without_port_gets_the_tls_modes_port(tls: str, port: int) -> None:
    """A relay given without a port gets 465, 587 or 25 by TLS mode."""
    config = load_config({**MINIMAL, "MAILER_REMOTE_HOST": "relay.example", "MAILER_SMTP_TLS": tls})
    assert (config.relay_host, config.relay_port) == ("relay.example", port)


def test_every_variable_is_read() -> None:
    """Each documented variable lands in its field."""
    config = load_config(
        {
            "MAILER_REMOTE_HOST": "[::1]:2525",
            "MAILER_OUTBOX": "/var/lib/mailer/outbox.sqlite3",
            "MAILER_STATUS_RETENTION_S": "3600",
            "MAILER_FROM": "bot@example.org",
            "MAILER_SERVICENAME": "Acme Accounts",
            "MAILER_USER": "bot",
            "MAILER_PASSWORD": " s3cret ",
            "MAILER_SERVE_HOST": "0.0.0.0",
            "MAILER_ALLOW_UNAUTHENTICATED": "1",
            "MAILER_SERVE_PORT": "0",
            "MAILER_QUEUE_SIZE": "250",
            "MAILER_SMTP_TLS": "starttls",
            "MAILER_SMTP_CA_FILE": __file__,
            "MAILER_SMTP_TIMEOUT_S": "2.5",
            "MAILER_TEMPLATES_DIR": str(Path(__file__).parent),
            "MAILER_SHUTDOWN_GRACE_S": "0",
            "MAILER_RETRY_BASE_S": "0.5",
            "MAILER_RETRY_MAX_S": "30",
            "MAILER_MAX_ATTEMPTS": "3",
            "MAILER_MESSAGE_TTL_S": "120",
            "MAILER_RETRY_CAPACITY": "7",
            "MAILER_SMTP_SESSIONS": "4",
            "MAILER_NOOP_IDLE_S": "0",
            "MAILER_SESSION_MAX_MESSAGES": "50",
            "MAILER_SESSION_MAX_AGE_S": "60",
        }
    )
    assert (config.relay_host, config.relay_port) == ("::1", 2525)
    assert config.service_name == "Acme Accounts"
    assert (config.smtp_user, config.smtp_password) == ("bot", " s3cret ")
    assert (config.serve_host, config.serve_port, config.queue_size) == ("0.0.0.0", 0, 250)
    assert config.smtp_tls is TlsMode.STARTTLS
    assert config.smtp_ca_file == Path(__file__)
    assert config.smtp_timeout_s == 2.5
    assert config.templates_dir == Path(__file__).parent
    assert config.shutdown_grace_s == 0.0
    assert (config.retry_base_s, config.retry_max_s) == (0.5, 30.0)
    assert (config.max_attempts, config.message_ttl_s, config.retry_capacity) == (3, 120.0, 7)
    assert (config.smtp_sessions, config.noop_idle_s) == (4, 0.0)
    assert config.outbox_path == Path("/var/lib/mailer/outbox.sqlite3")
    assert config.status_retention_s == 3600.0
    assert (config.session_max_messages, config.session_max_age_s) == (50, 60.0)


def test_all_problems_are_reported_together() -> None:
    """A bad environment yields one error listing every missing or invalid variable."""
    with pytest.raises(ConfigError) as info:
        load_config(
            {
                "MAILER_FROM": '"a"@evil.com',
                "MAILER_OUTBOX": "memory",
                "MAILER_USER": "bot",
                "MAILER_SMTP_TLS": "ssl",
                "MAILER_SERVE_PORT": "70000",
                "MAILER_QUEUE_SIZE": "0",
                "MAILER_SMTP_TIMEOUT_S": "0",
                "MAILER_SHUTDOWN_GRACE_S": "-1",
                "MAILER_SMTP_CA_FILE": "/nonexistent/ca.pem",
                "MAILER_TEMPLATES_DIR": "/nonexistent/templates",
                "MAILER_SERVICENAME": "Evil\r\nBcc: x@evil.com",
                "MAILER_RETRY_BASE_S": "10",
                "MAILER_RETRY_MAX_S": "5",
                "MAILER_MAX_ATTEMPTS": "0",
                "MAILER_MESSAGE_TTL_S": "forever",
                "MAILER_RETRY_CAPACITY": "-1",
                "MAILER_SMTP_SESSIONS": "65",
                "MAILER_NOOP_IDLE_S": "-1",
                "MAILER_SESSION_MAX_MESSAGES": "0",
                "MAILER_SESSION_MAX_AGE_S": "0",
            }
        )
    assert info.value.problems == [
        "MAILER_SMTP_TLS: expected one of implicit, starttls, none, got 'ssl'",
        "MAILER_REMOTE_HOST: required (the SMTP relay as host:port), but not set",
        "MAILER_FROM: expected a plain local part (letters, digits and !#$%&'*+/=?^_`{|}~- "
        "separated by single dots; no quotes, spaces or comments), got '\"a\"'",
        "MAILER_SERVICENAME: control character '\\r' is not allowed",
        "MAILER_USER and MAILER_PASSWORD: set both (AUTH) or neither (no AUTH), "
        "got only MAILER_USER",
        "MAILER_SMTP_CA_FILE: expected a readable file, got '/nonexistent/ca.pem'",
        "MAILER_TEMPLATES_DIR: expected a directory, got '/nonexistent/templates'",
        "MAILER_SMTP_TIMEOUT_S: expected a number of seconds, more than 0 and at most 3600, "
        "got '0'",
        "MAILER_SERVE_PORT: expected a whole number from 0 to 65535, got '70000'",
        "MAILER_QUEUE_SIZE: expected a whole number from 1 to 100000, got '0'",
        "MAILER_SHUTDOWN_GRACE_S: expected a number of seconds, at least 0 and at most 3600, "
        "got '-1'",
        "MAILER_RETRY_MAX_S: expected at least MAILER_RETRY_BASE_S (10), got 5",
        "MAILER_MAX_ATTEMPTS: expected a whole number from 1 to 1000000, got '0'",
        "MAILER_MESSAGE_TTL_S: expected a number of seconds, more than 0 and at most 604800, "
        "got 'forever'",
        "MAILER_RETRY_CAPACITY: expected a whole number from 1 to 100000, got '-1'",
        "MAILER_SMTP_SESSIONS: expected a whole number from 1 to 64, got '65'",
        "MAILER_NOOP_IDLE_S: expected a number of seconds, at least 0 and at most 3600, got '-1'",
        "MAILER_SESSION_MAX_MESSAGES: expected a whole number from 1 to 1000000, got '0'",
        "MAILER_SESSION_MAX_AGE_S: expected a number of seconds, more than 0 and at most 86400, "
        "got '0'",
    ]
    assert str(info.value).startswith("invalid configuration:\n  - MAILER_SMTP_TLS")


def test_missing_from_is_reported() -> None:
    """MAILER_FROM is required."""
    with pytest.raises(ConfigError) as info:
        load_config({"MAILER_REMOTE_HOST": "relay.example", "MAILER_OUTBOX": "memory"})
    assert info.value.problems == [
        "MAILER_FROM: required (the sender address, e.g. noreply@example.com), but not set"
    ]


def test_password_never_appears_in_repr_or_description() -> None:
    """The password is kept out of repr() and the start-up log line."""
    config = load_config({**MINIMAL, "MAILER_USER": "bot", "MAILER_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in repr(config)
    assert "hunter2-secret" not in config.describe()
    assert "password=***" in config.describe()


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("host:25", None, ("host", 25)),
        ("host", 465, ("host", 465)),
        ("10.0.0.1:2525", None, ("10.0.0.1", 2525)),
        ("[2001:db8::1]:587", None, ("2001:db8::1", 587)),
        ("[2001:db8::1]", 465, ("2001:db8::1", 465)),
    ],
)
def test_parse_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    """host[:port] and [IPv6][:port] forms parse."""
    assert parse_host_port(text, default) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host:0", "expected host:port, the port a whole number from 1 to 65535"),
        ("host:smtp", "expected host:port, the port a whole number from 1 to 65535"),
        ("host", "expected host:port, the port is missing"),
        ("2001:db8::1", "expected host:port (write an IPv6 address as [addr]:port)"),
        ("[2001:db8::1", "expected [IPv6]:port, the ']' is missing"),
        (":25", "expected host:port with a host name or address"),
        ("user@host:25", "expected host:port with a host name or address"),
    ],
)
def test_parse_host_port_rejects(text: str, message: str) -> None:
    """Malformed relay addresses say what was expected."""
    with pytest.raises(ValueError, match=None) as info:
        parse_host_port(text, None)
    assert str(info.value) == message


def test_more_sessions_than_retry_capacity_is_refused() -> None:
    """Every session holds a mail in flight, so the pool cannot outgrow the retry capacity."""
    with pytest.raises(ConfigError) as info:
        load_config({**MINIMAL, "MAILER_SMTP_SESSIONS": "8", "MAILER_RETRY_CAPACITY": "4"})
    assert info.value.problems == [
        "MAILER_SMTP_SESSIONS: expected at most MAILER_RETRY_CAPACITY (4), since every session "
        "holds one mail in flight, got 8"
    ]


def test_outbox_memory_and_default_location() -> None:
    """MAILER_OUTBOX=memory keeps mail in memory; unset, it follows XDG_STATE_HOME."""
    assert load_config({**MINIMAL, "MAILER_OUTBOX": "memory"}).outbox_path is None
    config = load_config({**MINIMAL, "XDG_STATE_HOME": "/state"})
    assert config.outbox_path == Path("/state/trio-mailer/outbox.sqlite3")
    with pytest.raises(ConfigError) as info:
        load_config({**MINIMAL, "HOME": "relative"})
    assert info.value.problems[0].startswith("MAILER_OUTBOX: no default location")


def _readme_settings() -> dict[str, str]:
    """The README's configuration table: each variable and its documented default."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table: dict[str, str] = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`MAILER_"):
            for name in cells[0].split(","):
                table[name.strip().strip("`")] = cells[1]
    return table


def test_readme_documents_every_setting_with_its_default() -> None:
    """The README's table lists exactly the SETTINGS, each with the table's own default."""
    documented = _readme_settings()
    assert sorted(documented) == sorted(setting.env for setting in SETTINGS)
    for setting in SETTINGS:
        shown = setting.default_text
        if shown in ("required", "unset"):
            assert documented[setting.env] != "required" or shown == "required", setting.env
            continue
        assert f"`{shown}`" in documented[setting.env], (setting.env, shown)


def test_config_defaults_come_from_the_table() -> None:
    """Every Config field with a plain default takes it from its SETTINGS row."""
    fields = attrs.fields_dict(Config)
    computed = {"templates_dir", "outbox_path"}  # depend on the installation and the environment
    checked = 0
    for setting in SETTINGS:
        if setting.field in fields and setting.field not in computed and setting.required is None:
            assert fields[setting.field].default == setting.default, setting.env
            checked += 1
    assert checked == len(SETTINGS) - 4  # REMOTE_HOST, FROM: required; two computed


def test_unknown_mailer_variables_are_named_with_the_closest_known_one() -> None:
    """A MAILER_* name no setting reads gets a warning, with difflib's closest setting if any;
    the settings and the client's MAILER_TOKEN are not warned about."""
    env = {
        "MAILER_FORM": "noreply@example.com",
        "MAILER_QUEUESIZE": "5",
        "MAILER_XYZZY": "1",
        "MAILER_FROM": "noreply@example.com",
        "MAILER_TOKEN": "t",
        "PATH": "/bin",
    }
    assert unknown_variables(env) == [
        "MAILER_FORM is not a trio-mailer setting (did you mean MAILER_FROM?); it is ignored",
        "MAILER_QUEUESIZE is not a trio-mailer setting (did you mean MAILER_QUEUE_SIZE?); "
        "it is ignored",
        "MAILER_XYZZY is not a trio-mailer setting; it is ignored "
        "(trio-mailer serve --help lists them all)",
    ]
