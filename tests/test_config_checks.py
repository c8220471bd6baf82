"""Config bounds and checks, one variable at a time: the edges of every range, and the checks
on files, tokens, names and paths. The expected bounds are written out here on purpose (not
read from SETTINGS), so a changed bound fails a test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trio_mailer.core.config import (
    MAX_SERVICE_NAME_CHARS,
    SETTINGS,
    Config,
    ConfigError,
    Setting,
    TlsMode,
    load_config,
    shipped_templates_dir,
)

MINIMAL = {
    "MAILER_REMOTE_HOST": "smtp.example.com:465",
    "MAILER_FROM": "noreply@example.com",
    "MAILER_OUTBOX": "memory",
}
TOKEN = "a-token-of-twenty-chars"


def problems(**env: str) -> list[str]:
    try:
        load_config({**MINIMAL, **env})
    except ConfigError as exc:
        return exc.problems
    return []


# (variable, field, accepted text -> value, refused texts, the expectation in the message)
INTEGERS = [
    ("MAILER_SERVE_PORT", "serve_port", 0, 65535),
    ("MAILER_QUEUE_SIZE", "queue_size", 1, 100_000),
    ("MAILER_MAX_ATTEMPTS", "max_attempts", 1, 1_000_000),
    ("MAILER_RETRY_CAPACITY", "retry_capacity", 1, 100_000),
    ("MAILER_SMTP_SESSIONS", "smtp_sessions", 1, 64),
    ("MAILER_SESSION_MAX_MESSAGES", "session_max_messages", 1, 1_000_000),
    ("MAILER_METRICS_PORT", "metrics_port", 0, 65535),
    ("MAILER_DB_POOL_SIZE", "db_pool_size", 2, 1000),
    ("MAILER_MAX_CONNECTIONS", "max_connections", 1, 100_000),
]


@pytest.mark.parametrize(("env", "field", "low", "high"), INTEGERS)
def test_whole_number_ranges_include_both_ends(env: str, field: str, low: int, high: int) -> None:
    extra = {"MAILER_RETRY_CAPACITY": "100000"} if env == "MAILER_SMTP_SESSIONS" else {}
    for text, value in ((str(low), low), (str(high), high), (f" {low} ", low)):
        config = load_config({**MINIMAL, **extra, env: text})
        assert getattr(config, field) == value
    message = f"{env}: expected a whole number from {low} to {high}, got "
    assert problems(**extra, **{env: str(low - 1)}) == [message + repr(str(low - 1))]
    assert problems(**extra, **{env: str(high + 1)}) == [message + repr(str(high + 1))]
    assert problems(**{env: "1.5"}) == [message + "'1.5'"]


SECONDS = [
    # (variable, field, low, low included, high)
    ("MAILER_SMTP_TIMEOUT_S", "smtp_timeout_s", 0, False, 3600),
    ("MAILER_SHUTDOWN_GRACE_S", "shutdown_grace_s", 0, True, 3600),
    ("MAILER_RETRY_BASE_S", "retry_base_s", 0, False, 3600),
    ("MAILER_MESSAGE_TTL_S", "message_ttl_s", 0, False, 604800),
    ("MAILER_NOOP_IDLE_S", "noop_idle_s", 0, True, 3600),
    ("MAILER_SESSION_MAX_AGE_S", "session_max_age_s", 0, False, 86400),
    ("MAILER_HEALTH_DOWN_AFTER_S", "health_down_after_s", 0, True, 86400),
    ("MAILER_STATUS_RETENTION_S", "status_retention_s", 0, False, 31536000),  # shown 3.1536e+07
    ("MAILER_DB_TIMEOUT_S", "db_timeout_s", 0, False, 600),
    ("MAILER_REFUSAL_WAIT_S", "refusal_wait_s", 0, True, 60),
    ("MAILER_IDEMPOTENCY_WINDOW_S", "idempotency_window_s", 0, False, 2592000),
    ("MAILER_SUPPRESS_S", "suppress_s", 0, True, 31536000),
    ("MAILER_LEASE_S", "lease_s", 0, False, 3600),
    ("MAILER_GRPC_IDLE_TIMEOUT_S", "grpc_idle_timeout_s", 0, False, 86400),
]


@pytest.mark.parametrize(("env", "field", "low", "included", "high"), SECONDS)
def test_seconds_ranges(env: str, field: str, low: int, included: bool, high: int) -> None:
    # The retry cap must stay at or above the base: give it room for the base's whole range.
    extra = {"MAILER_RETRY_MAX_S": "86400"} if env == "MAILER_RETRY_BASE_S" else {}
    bound = f"{'at least' if included else 'more than'} {low} and at most {float(high):g}"
    message = f"{env}: expected a number of seconds, {bound}, got "
    assert getattr(load_config({**MINIMAL, **extra, env: str(high)}), field) == high
    assert getattr(load_config({**MINIMAL, **extra, env: "0.001"}), field) == 0.001
    if included:
        assert getattr(load_config({**MINIMAL, env: str(low)}), field) == low
    else:
        assert problems(**{env: str(low)}) == [message + repr(str(low))]
    for bad in (str(high + 0.5), "-0.5", "nan", "inf", "soon"):
        assert problems(**extra, **{env: bad}) == [message + repr(bad)]


def test_retry_max_range_and_its_check() -> None:
    """The cap: above 0, at most a day, and at least the base (equal is fine)."""
    assert load_config({**MINIMAL, "MAILER_RETRY_MAX_S": "86400"}).retry_max_s == 86400
    config = load_config({**MINIMAL, "MAILER_RETRY_BASE_S": "5", "MAILER_RETRY_MAX_S": "5"})
    assert (config.retry_base_s, config.retry_max_s) == (5, 5)
    assert problems(MAILER_RETRY_MAX_S="86401") == [
        "MAILER_RETRY_MAX_S: expected a number of seconds, more than 0 and at most 86400, "
        "got '86401'"
    ]
    assert problems(MAILER_RETRY_BASE_S="5", MAILER_RETRY_MAX_S="4.5") == [
        "MAILER_RETRY_MAX_S: expected at least MAILER_RETRY_BASE_S (5), got 4.5"
    ]


def test_sessions_may_equal_the_retry_capacity() -> None:
    config = load_config({**MINIMAL, "MAILER_SMTP_SESSIONS": "4", "MAILER_RETRY_CAPACITY": "4"})
    assert config.smtp_sessions == config.retry_capacity == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("1", True), ("true", True), ("YES", True), ("On", True)],
        *[("0", False), ("false", False), ("No", False), ("OFF", False)],
    ],
)
def test_flags(text: str, expected: bool) -> None:
    assert load_config({**MINIMAL, "MAILER_AUTH_ALL_SERVICES": text}).auth_all_services is expected


def test_a_bad_flag_says_what_was_expected() -> None:
    assert problems(MAILER_ALLOW_UNAUTHENTICATED="maybe") == [
        "MAILER_ALLOW_UNAUTHENTICATED: expected 1 or 0, got 'maybe'"
    ]


@pytest.mark.parametrize(
    ("text", "mode"),
    [("IMPLICIT", TlsMode.IMPLICIT), ("StartTLS", TlsMode.STARTTLS), ("none", TlsMode.NONE)],
)
def test_tls_modes_and_their_ports(text: str, mode: TlsMode) -> None:
    config = load_config({**MINIMAL, "MAILER_SMTP_TLS": text, "MAILER_REMOTE_HOST": "relay"})
    assert config.smtp_tls is mode
    assert config.relay_port == {"implicit": 465, "starttls": 587, "none": 25}[mode.value]


def test_log_format() -> None:
    assert load_config({**MINIMAL, "MAILER_LOG_FORMAT": "JSON"}).log_format == "json"
    assert load_config({**MINIMAL, "MAILER_LOG_FORMAT": "text"}).log_format == "text"
    assert problems(MAILER_LOG_FORMAT="xml") == [
        "MAILER_LOG_FORMAT: expected one of text, json, got 'xml'"
    ]


def test_a_bad_relay_address_is_reported_with_what_came() -> None:
    assert problems(MAILER_REMOTE_HOST="relay:0") == [
        "MAILER_REMOTE_HOST: expected host:port, the port a whole number from 1 to 65535, "
        "got 'relay:0'"
    ]
    config = load_config({**MINIMAL, "MAILER_REMOTE_HOST": "  relay.example:2525  "})
    assert (config.relay_host, config.relay_port) == ("relay.example", 2525)


# ---- files ----


@pytest.mark.parametrize("env", ["MAILER_SMTP_CA_FILE", "MAILER_TLS_CLIENT_CA"])
def test_a_tls_file_must_be_a_readable_file(env: str, tmp_path: Path) -> None:
    extra = {}
    if env == "MAILER_TLS_CLIENT_CA":
        (tmp_path / "c.pem").write_text("x")
        extra = {
            "MAILER_TLS_CERT": str(tmp_path / "c.pem"),
            "MAILER_TLS_KEY": str(tmp_path / "c.pem"),
        }
    assert problems(**extra, **{env: str(tmp_path)}) == [
        f"{env}: expected a readable file, got {str(tmp_path)!r}"
    ]
    assert problems(**extra, **{env: str(tmp_path / "missing.pem")}) == [
        f"{env}: expected a readable file, got {str(tmp_path / 'missing.pem')!r}"
    ]
    (tmp_path / "ca.pem").write_text("x")
    assert problems(**extra, **{env: str(tmp_path / "ca.pem")}) == []


def test_grpc_tls_needs_both_cert_and_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    config = load_config({**MINIMAL, "MAILER_TLS_CERT": str(cert), "MAILER_TLS_KEY": str(key)})
    assert (config.tls_cert, config.tls_key) == (cert, key)
    assert problems(MAILER_TLS_CERT=str(cert)) == [
        "MAILER_TLS_CERT and MAILER_TLS_KEY: set both (TLS on the gRPC port) or neither, "
        "got only MAILER_TLS_CERT"
    ]
    assert problems(MAILER_TLS_KEY=str(key)) == [
        "MAILER_TLS_CERT and MAILER_TLS_KEY: set both (TLS on the gRPC port) or neither, "
        "got only MAILER_TLS_KEY"
    ]
    assert problems(MAILER_TLS_CERT=str(cert), MAILER_TLS_KEY=str(tmp_path / "none.pem")) == [
        f"MAILER_TLS_KEY: expected a readable file, got {str(tmp_path / 'none.pem')!r}",
        "MAILER_TLS_CERT and MAILER_TLS_KEY: set both (TLS on the gRPC port) or neither, "
        "got only MAILER_TLS_CERT",
    ]


def test_a_client_ca_needs_the_servers_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert problems(MAILER_TLS_CLIENT_CA=str(ca)) == [
        "MAILER_TLS_CLIENT_CA: needs MAILER_TLS_CERT and MAILER_TLS_KEY"
    ]
    config = load_config(
        {
            **MINIMAL,
            "MAILER_TLS_CERT": str(ca),
            "MAILER_TLS_KEY": str(ca),
            "MAILER_TLS_CLIENT_CA": str(ca),
        }
    )
    assert config.tls_client_ca == ca


def test_smtp_credentials_come_as_a_pair_and_verbatim() -> None:
    config = load_config({**MINIMAL, "MAILER_USER": " bot ", "MAILER_PASSWORD": " pass word "})
    assert (config.smtp_user, config.smtp_password) == (" bot ", " pass word ")
    assert problems(MAILER_PASSWORD="secret") == [
        "MAILER_USER and MAILER_PASSWORD: set both (AUTH) or neither (no AUTH), "
        "got only MAILER_PASSWORD"
    ]
    assert load_config(MINIMAL).smtp_user is None


def test_the_templates_dir(tmp_path: Path) -> None:
    assert load_config({**MINIMAL, "MAILER_TEMPLATES_DIR": str(tmp_path)}).templates_dir == tmp_path
    assert load_config(MINIMAL).templates_dir == shipped_templates_dir()
    (tmp_path / "file").write_text("x")
    assert problems(MAILER_TEMPLATES_DIR=str(tmp_path / "file")) == [
        f"MAILER_TEMPLATES_DIR: expected a directory, got {str(tmp_path / 'file')!r}"
    ]


def test_shipped_templates_dir_is_the_source_trees_in_a_checkout() -> None:
    here = shipped_templates_dir()
    assert here.is_dir()
    assert (here / "password").exists() or any(here.iterdir())


# ---- tokens ----


def test_a_token_file_is_read(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# callers\n{TOKEN}\n", encoding="utf-8")
    config = load_config({**MINIMAL, "MAILER_AUTH_TOKENS_FILE": str(tokens)})
    assert config.auth_tokens is not None
    assert config.auth_tokens.allows([("authorization", f"Bearer {TOKEN}")])
    assert load_config(MINIMAL).auth_tokens is None


def test_a_missing_token_file_names_the_file_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    assert problems(MAILER_AUTH_TOKENS_FILE=str(path)) == [
        f"MAILER_AUTH_TOKENS_FILE: cannot read {str(path)!r}: No such file or directory"
    ]
    assert problems(MAILER_AUTH_TOKENS_FILE=str(tmp_path)) == [
        f"MAILER_AUTH_TOKENS_FILE: cannot read {str(tmp_path)!r}: Is a directory"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN)
    path.chmod(0)
    assert problems(MAILER_AUTH_TOKENS_FILE=str(path)) == [
        f"MAILER_AUTH_TOKENS_FILE: cannot read {str(path)!r}: Permission denied"
    ]


def test_a_bad_token_file_says_which_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\nshort\n")
    assert problems(MAILER_AUTH_TOKENS_FILE=str(path)) == [
        "MAILER_AUTH_TOKENS_FILE: line 2: expected a token of at least 16 characters without "
        "spaces, or sha256:<hex>"
    ]
    path.write_bytes(b"\xff\xfe not utf-8 \x80")
    [problem] = problems(MAILER_AUTH_TOKENS_FILE=str(path))
    assert problem.startswith("MAILER_AUTH_TOKENS_FILE: 'utf-8' codec can't decode")


# ---- the service name and the sender ----


def test_service_name_length_limit() -> None:
    assert MAX_SERVICE_NAME_CHARS == 64
    name = "n" * 64
    assert load_config({**MINIMAL, "MAILER_SERVICENAME": name}).service_name == name
    assert problems(MAILER_SERVICENAME="n" * 65) == [
        "MAILER_SERVICENAME: expected at most 64 characters, got 65"
    ]


def test_sender_address_must_be_valid() -> None:
    [problem] = problems(MAILER_FROM="not an address")
    assert problem.startswith("MAILER_FROM: ")
    assert "got" in problem


# ---- the outbox ----


def test_an_outbox_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    assert problems(MAILER_OUTBOX=str(tmp_path), HOME="/home/mailer") == [
        f"MAILER_OUTBOX: expected a file, got {str(tmp_path)!r}"
    ]


def test_an_outbox_path_may_be_a_new_or_existing_file(tmp_path: Path) -> None:
    new = tmp_path / "new.sqlite3"
    assert load_config({**MINIMAL, "MAILER_OUTBOX": str(new)}).outbox_path == new
    new.write_bytes(b"")
    assert load_config({**MINIMAL, "MAILER_OUTBOX": str(new)}).outbox_path == new
    assert load_config({**MINIMAL, "MAILER_OUTBOX": "MEMORY"}).outbox_path is None


def test_no_default_outbox_location_is_reported() -> None:
    env = {key: value for key, value in MINIMAL.items() if key != "MAILER_OUTBOX"}
    with pytest.raises(ConfigError) as caught:
        load_config({**env, "HOME": "relative"})
    assert caught.value.problems == [
        "MAILER_OUTBOX: no default location: XDG_STATE_HOME or HOME: expected an absolute "
        "path, got '' and 'relative'"
    ]


# ---- exposure ----


def test_binding_beyond_loopback_needs_caller_authentication(tmp_path: Path) -> None:
    assert problems(MAILER_SERVE_HOST="0.0.0.0") == [
        "MAILER_SERVE_HOST: 0.0.0.0 is reachable from other machines, but no caller "
        "authentication is set up: set MAILER_AUTH_TOKENS_FILE or MAILER_TLS_CLIENT_CA, or "
        "MAILER_ALLOW_UNAUTHENTICATED=1 if you mean it"
    ]
    for host in ("127.0.0.1", "localhost", "::1"):
        assert problems(MAILER_SERVE_HOST=host) == []
    assert problems(MAILER_SERVE_HOST="0.0.0.0", MAILER_ALLOW_UNAUTHENTICATED="1") == []
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN)
    assert problems(MAILER_SERVE_HOST="0.0.0.0", MAILER_AUTH_TOKENS_FILE=str(tokens)) == []
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert (
        problems(
            MAILER_SERVE_HOST="0.0.0.0",
            MAILER_TLS_CERT=str(ca),
            MAILER_TLS_KEY=str(ca),
            MAILER_TLS_CLIENT_CA=str(ca),
        )
        == []
    )
    # A blank tokens variable is no authentication.
    assert len(problems(MAILER_SERVE_HOST="0.0.0.0", MAILER_AUTH_TOKENS_FILE="  ")) == 1


# ---- the table itself ----


def test_blank_values_count_as_unset() -> None:
    """A variable set to spaces takes its default (and a required one is reported missing)."""
    assert load_config({**MINIMAL, "MAILER_QUEUE_SIZE": "   "}).queue_size == 10
    assert problems(MAILER_FROM="  ") == [
        "MAILER_FROM: required (the sender address, e.g. noreply@example.com), but not set"
    ]


def test_default_texts_as_the_readme_shows_them() -> None:
    by_env = {setting.env: setting for setting in SETTINGS}
    assert by_env["MAILER_REMOTE_HOST"].default_text == "required"
    assert by_env["MAILER_USER"].default_text == "unset"
    assert by_env["MAILER_TEMPLATES_DIR"].default_text == "unset"
    assert by_env["MAILER_AUTH_ALL_SERVICES"].default_text == "0"
    assert by_env["MAILER_SMTP_TLS"].default_text == "implicit"
    assert by_env["MAILER_SMTP_TIMEOUT_S"].default_text == "30"
    assert by_env["MAILER_QUEUE_SIZE"].default_text == "10"
    flag_on = Setting("MAILER_X", "x", True, str, "")
    assert flag_on.default_text == "1"
    assert Setting("MAILER_Y", "y", 0.5, str, "").default_text == "0.5"


def test_only_passwords_are_taken_verbatim() -> None:
    verbatim = sorted(setting.env for setting in SETTINGS if not setting.strip)
    assert verbatim == ["MAILER_PASSWORD", "MAILER_USER"]


def test_every_setting_says_what_it_means() -> None:
    """`serve --help` and the README show each row's meaning: none may be blank."""
    blank = [setting.env for setting in SETTINGS if not setting.meaning.strip()]
    assert blank == []


def test_a_bracketed_address_must_be_followed_by_a_port_or_nothing() -> None:
    assert problems(MAILER_REMOTE_HOST="[2001:db8::1]x25") == [
        "MAILER_REMOTE_HOST: expected [IPv6]:port, got '[2001:db8::1]x25'"
    ]


def test_refusals_per_second_range() -> None:
    """MAILER_REFUSALS_PER_S: 0 (refuse at once) to 1e6, a finite number."""
    for text, value in (("0", 0.0), ("100", 100.0), ("1000000", 1e6), (" 2.5 ", 2.5)):
        assert load_config({**MINIMAL, "MAILER_REFUSALS_PER_S": text}).refusals_per_s == value
    message = "MAILER_REFUSALS_PER_S: expected a number per second, at least 0 and at most 1e+06"
    for bad in ("-0.5", "1000001", "nan", "inf", "lots"):
        (problem,) = problems(MAILER_REFUSALS_PER_S=bad)
        assert problem.startswith(message), problem


@pytest.mark.parametrize(
    "text",
    ["relay.example:0", "relay.example:65536", "a:b:25", "[::1]:65536"],
)
def test_a_relay_address_with_a_bad_port_or_colons_is_refused(text: str) -> None:
    (problem,) = problems(MAILER_REMOTE_HOST=text)
    assert problem.startswith("MAILER_REMOTE_HOST: expected "), problem


def test_a_bad_default_locale_names_its_variable() -> None:
    found = problems(MAILER_DEFAULT_LOCALE="not a locale!")
    assert len(found) == 1
    assert found[0].startswith("MAILER_DEFAULT_LOCALE: expected a language tag"), found


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://mailer:s3cret@db:5432/mail", "postgresql://mailer:***@db:5432/mail"),
        (
            "postgres://db/mail?user=mailer&password=s3cret",
            "postgres://db/mail?user=mailer&password=***",
        ),
    ],
)
def test_a_postgresql_outbox_is_a_url_shown_without_its_password(url: str, shown: str) -> None:
    config = load_config({**MINIMAL, "MAILER_OUTBOX": url})
    assert config.outbox_path is None
    assert config.outbox_url is not None
    assert config.outbox_url.url == url
    assert config.outbox_url.masked() == shown
    assert str(config.outbox_url) == shown
    assert "s3cret" not in repr(config) and "s3cret" not in config.describe()
    assert f"outbox={shown} lease_s=30 db_pool_size=10 db_timeout_s=5 " in config.describe()


def test_a_file_outbox_has_no_url() -> None:
    config = load_config({**MINIMAL, "MAILER_OUTBOX": "/tmp/trio-mailer-test-outbox.sqlite3"})
    assert config.outbox_url is None
    assert config.outbox_path == Path("/tmp/trio-mailer-test-outbox.sqlite3")
    assert "outbox=/tmp/trio-mailer-test-outbox.sqlite3 status_retention_s=" in config.describe()
    assert "lease_s" not in config.describe()


def test_the_description_lists_every_relay_in_order() -> None:
    config = load_config(
        {**MINIMAL, "MAILER_REMOTE_HOST": "a.example.com:465, b.example.com:2465,c.example.com"}
    )
    assert "relay=a.example.com:465,b.example.com:2465,c.example.com:465 " in config.describe()


def test_relay_ports_include_both_ends() -> None:
    config = load_config({**MINIMAL, "MAILER_REMOTE_HOST": "a.example:1,b.example:65535"})
    assert config.relay_list == (("a.example", 1), ("b.example", 65535))
    assert (config.relay_host, config.relay_port) == ("a.example", 1)  # the first is tried first


def test_a_config_built_without_a_relay_list_has_its_one_relay() -> None:
    config = Config(relay_host="relay.example", relay_port=2465, mail_from="a@example.com")
    assert config.relay_list == (("relay.example", 2465),)


def test_the_description_says_when_there_is_no_smtp_auth() -> None:
    assert " tls=implicit no AUTH ca_file=" in load_config(MINIMAL).describe()


def test_the_config_error_lists_each_problem_on_its_own_line() -> None:
    error = ConfigError(["MAILER_A: bad", "MAILER_B: worse"])
    assert str(error) == "invalid configuration:\n  - MAILER_A: bad\n  - MAILER_B: worse"
    assert error.problems == ["MAILER_A: bad", "MAILER_B: worse"]


def test_the_default_locale_is_read() -> None:
    assert load_config({**MINIMAL, "MAILER_DEFAULT_LOCALE": "pt-BR"}).default_locale == "pt-BR"


def test_shipped_templates_are_found_in_a_wheel_and_in_a_checkout(tmp_path: Path) -> None:
    package = tmp_path / "site" / "trio_mailer"
    (package / "templates").mkdir(parents=True)
    assert shipped_templates_dir(package) == package / "templates"  # a wheel
    checkout = tmp_path / "checkout" / "trio_mailer"
    checkout.mkdir(parents=True)
    assert shipped_templates_dir(checkout) == tmp_path / "checkout" / "templates"
