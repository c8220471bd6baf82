"""Configuration: the ``MAILER_*`` environment variables, parsed into one frozen object.

Pure. ``load_config`` reads every variable, collects every problem, and raises one
``ConfigError`` that lists them all, so an operator fixes a bad deployment in one go.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs

from trio_mailer.core.caller_auth import TokenSet, is_loopback
from trio_mailer.core.errors import InvalidRequest
from trio_mailer.core.mail_lifecycle import default_outbox_path
from trio_mailer.core.rendering import DEFAULT_LOCALE, validate_locale
from trio_mailer.core.validation import reject_unsafe_header_text, validate_address

T = TypeVar("T")

MAX_SERVICE_NAME_CHARS = 64
MAX_QUEUE_SIZE = 100_000
MAX_SMTP_SESSIONS = 64


class TlsMode(enum.Enum):
    """How the SMTP session is protected."""

    IMPLICIT = "implicit"  # TLS from the first byte (port 465, RFC 8314)
    STARTTLS = "starttls"  # plaintext greeting, then STARTTLS is required (port 587)
    NONE = "none"  # plaintext: only when the operator sets it explicitly

    @property
    def default_port(self) -> int:
        return {TlsMode.IMPLICIT: 465, TlsMode.STARTTLS: 587, TlsMode.NONE: 25}[self]


class ConfigError(Exception):
    """Start-up configuration is unusable; ``problems`` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
        )
        self.problems = problems


def shipped_templates_dir() -> Path:
    """The templates shipped with the package, wherever it was installed from.

    A wheel carries them as ``trio_mailer/templates`` (hatchling ``force-include``); a source
    checkout (editable install, or running from the tree) has them at the top level.
    """
    package_dir = Path(__file__).resolve().parent.parent  # trio_mailer/
    installed = package_dir / "templates"
    if installed.is_dir():
        return installed
    return package_dir.parent / "templates"


@attrs.frozen
class Config:
    relay_host: str
    relay_port: int
    smtp_tls: TlsMode
    mail_from: str
    service_name: str = "trio-mailer"
    smtp_user: str | None = None
    smtp_password: str | None = attrs.field(default=None, repr=False)  # never logged
    smtp_ca_file: Path | None = None
    smtp_timeout_s: float = 30.0
    serve_host: str = "127.0.0.1"
    serve_port: int = 20100
    queue_size: int = 10
    templates_dir: Path = attrs.field(factory=shipped_templates_dir)
    default_locale: str = DEFAULT_LOCALE  # the locale of <name>.msg and the last fallback
    shutdown_grace_s: float = 10.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    max_attempts: int = 8
    message_ttl_s: float = 600.0
    retry_capacity: int = 100
    smtp_sessions: int = 1
    noop_idle_s: float = 1.0
    session_max_messages: int = 100
    session_max_age_s: float = 300.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: TokenSet | None = None
    auth_all_services: bool = False
    allow_unauthenticated: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"
    health_down_after_s: float = 30.0
    outbox_path: Path | None = None  # None: the in-memory outbox (MAILER_OUTBOX=memory)
    status_retention_s: float = 86400.0

    def describe(self) -> str:
        """The effective configuration for the start-up log line, without secrets."""
        auth = f"user={self.smtp_user!r} password=***" if self.smtp_user else "no AUTH"
        return (
            f"relay={self.relay_host}:{self.relay_port} tls={self.smtp_tls.value} {auth} "
            f"ca_file={self.smtp_ca_file or 'system store'} from={self.mail_from} "
            f"service_name={self.service_name!r} listen={self.serve_host}:{self.serve_port} "
            f"queue_size={self.queue_size} smtp_timeout_s={self.smtp_timeout_s:g} "
            f"shutdown_grace_s={self.shutdown_grace_s:g} templates={self.templates_dir} "
            f"default_locale={self.default_locale} "
            f"retry_base_s={self.retry_base_s:g} retry_max_s={self.retry_max_s:g} "
            f"max_attempts={self.max_attempts} message_ttl_s={self.message_ttl_s:g} "
            f"retry_capacity={self.retry_capacity} smtp_sessions={self.smtp_sessions} "
            f"noop_idle_s={self.noop_idle_s:g} session_max_messages={self.session_max_messages} "
            f"session_max_age_s={self.session_max_age_s:g} "
            f"grpc_tls={'mTLS' if self.tls_client_ca else 'on' if self.tls_cert else 'off'} "
            f"tokens={len(self.auth_tokens.digests) if self.auth_tokens else 0} "
            f"metrics_port={self.metrics_port or 'off'} log_format={self.log_format} "
            f"outbox={self.outbox_path or 'memory'} status_retention_s={self.status_retention_s:g}"
        )


class _Reader:
    """Reads variables from ``env`` and collects problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def required(self, name: str, what: str) -> str | None:
        value = self.raw(name)
        if value is None:
            self.problems.append(f"{name}: required ({what}), but not set")
        return value

    def parse(self, name: str, default: T, convert: Callable[[str], T]) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}, got {value!r}")
            return default


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return number

    return convert


def _seconds(low: float, high: float, *, low_inclusive: bool) -> Callable[[str], float]:
    bound = f"{'at least' if low_inclusive else 'more than'} {low:g} and at most {high:g}"

    def convert(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds, {bound}") from None
        too_low = number < low if low_inclusive else number <= low
        if not math.isfinite(number) or too_low or number > high:
            raise ValueError(f"expected a number of seconds, {bound}")
        return number

    return convert


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def _one_of(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text.lower()

    return convert


def _tls_mode(text: str) -> TlsMode:
    try:
        return TlsMode(text.lower())
    except ValueError:
        raise ValueError("expected one of implicit, starttls, none") from None


def parse_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` or ``[v6addr][:port]``.

    Raises:
        ValueError: with a message saying what was expected.
    """
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError("expected [IPv6]:port, the ']' is missing")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected [IPv6]:port")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError("expected host:port (write an IPv6 address as [addr]:port)")
    if not host or any(c.isspace() for c in host) or "/" in host or "@" in host:
        raise ValueError("expected host:port with a host name or address")
    if port_text is None:
        if default_port is None:
            raise ValueError("expected host:port, the port is missing")
        return host, default_port
    return host, _int_in(1, 65535)(port_text)


def load_config(env: Mapping[str, str]) -> Config:
    """Build the ``Config`` from environment variables.

    Raises:
        ConfigError: listing every missing or invalid variable.
    """
    r = _Reader(env)
    tls = r.parse("MAILER_SMTP_TLS", TlsMode.IMPLICIT, _tls_mode)

    relay_host, relay_port = "", tls.default_port
    remote = r.required("MAILER_REMOTE_HOST", "the SMTP relay as host:port")
    if remote is not None:
        try:
            relay_host, relay_port = parse_host_port(remote, tls.default_port)
        except ValueError as exc:
            r.problems.append(f"MAILER_REMOTE_HOST: {exc}, got {remote!r}")

    mail_from = r.required("MAILER_FROM", "the sender address, e.g. noreply@example.com") or ""
    if mail_from:
        try:
            validate_address("MAILER_FROM", mail_from)
        except InvalidRequest as exc:
            r.problems.append(exc.message)

    service_name = r.raw("MAILER_SERVICENAME") or "trio-mailer"
    try:
        reject_unsafe_header_text("MAILER_SERVICENAME", service_name)
        if len(service_name) > MAX_SERVICE_NAME_CHARS:
            r.problems.append(
                f"MAILER_SERVICENAME: expected at most {MAX_SERVICE_NAME_CHARS} characters, "
                f"got {len(service_name)}"
            )
    except InvalidRequest as exc:
        r.problems.append(exc.message)

    # Not stripped: a password may legitimately begin or end with a space.
    user = env.get("MAILER_USER") or None
    password = env.get("MAILER_PASSWORD") or None
    if (user is None) != (password is None):
        r.problems.append(
            "MAILER_USER and MAILER_PASSWORD: set both (AUTH) or neither (no AUTH), "
            f"got only {'MAILER_USER' if user else 'MAILER_PASSWORD'}"
        )

    ca_file = r.parse("MAILER_SMTP_CA_FILE", None, Path)
    if ca_file is not None and not ca_file.is_file():
        r.problems.append(f"MAILER_SMTP_CA_FILE: expected a readable file, got {str(ca_file)!r}")

    templates_dir = r.parse("MAILER_TEMPLATES_DIR", shipped_templates_dir(), Path)
    if not templates_dir.is_dir():
        r.problems.append(f"MAILER_TEMPLATES_DIR: expected a directory, got {str(templates_dir)!r}")

    default_locale = r.raw("MAILER_DEFAULT_LOCALE") or DEFAULT_LOCALE
    try:
        validate_locale("MAILER_DEFAULT_LOCALE", default_locale)
    except InvalidRequest as exc:
        r.problems.append(exc.message)

    smtp_timeout_s = r.parse("MAILER_SMTP_TIMEOUT_S", 30.0, _seconds(0, 3600, low_inclusive=False))
    serve_host = r.raw("MAILER_SERVE_HOST") or "127.0.0.1"
    serve_port = r.parse("MAILER_SERVE_PORT", 20100, _int_in(0, 65535))
    queue_size = r.parse("MAILER_QUEUE_SIZE", 10, _int_in(1, MAX_QUEUE_SIZE))
    grace_s = r.parse("MAILER_SHUTDOWN_GRACE_S", 10.0, _seconds(0, 3600, low_inclusive=True))
    retry_base_s = r.parse("MAILER_RETRY_BASE_S", 1.0, _seconds(0, 3600, low_inclusive=False))
    retry_max_s = r.parse("MAILER_RETRY_MAX_S", 60.0, _seconds(0, 86400, low_inclusive=False))
    if retry_max_s < retry_base_s:
        r.problems.append(
            f"MAILER_RETRY_MAX_S: expected at least MAILER_RETRY_BASE_S ({retry_base_s:g}), "
            f"got {retry_max_s:g}"
        )
    max_attempts = r.parse("MAILER_MAX_ATTEMPTS", 8, _int_in(1, 100))
    ttl_s = r.parse("MAILER_MESSAGE_TTL_S", 600.0, _seconds(0, 7 * 86400, low_inclusive=False))
    retry_capacity = r.parse("MAILER_RETRY_CAPACITY", 100, _int_in(1, MAX_QUEUE_SIZE))
    smtp_sessions = r.parse("MAILER_SMTP_SESSIONS", 1, _int_in(1, MAX_SMTP_SESSIONS))
    if smtp_sessions > retry_capacity:
        r.problems.append(
            f"MAILER_SMTP_SESSIONS: expected at most MAILER_RETRY_CAPACITY ({retry_capacity}), "
            f"since every session holds one mail in flight, got {smtp_sessions}"
        )
    noop_idle_s = r.parse("MAILER_NOOP_IDLE_S", 1.0, _seconds(0, 3600, low_inclusive=True))
    max_messages = r.parse("MAILER_SESSION_MAX_MESSAGES", 100, _int_in(1, 1_000_000))
    max_age_s = r.parse("MAILER_SESSION_MAX_AGE_S", 300.0, _seconds(0, 86400, low_inclusive=False))
    tls_cert = r.parse("MAILER_TLS_CERT", None, Path)
    tls_key = r.parse("MAILER_TLS_KEY", None, Path)
    tls_client_ca = r.parse("MAILER_TLS_CLIENT_CA", None, Path)
    for name, path in (
        ("MAILER_TLS_CERT", tls_cert),
        ("MAILER_TLS_KEY", tls_key),
        ("MAILER_TLS_CLIENT_CA", tls_client_ca),
    ):
        if path is not None and not path.is_file():
            r.problems.append(f"{name}: expected a readable file, got {str(path)!r}")
    if (tls_cert is None) != (tls_key is None):
        r.problems.append(
            "MAILER_TLS_CERT and MAILER_TLS_KEY: set both (TLS on the gRPC port) or neither, "
            f"got only {'MAILER_TLS_CERT' if tls_cert else 'MAILER_TLS_KEY'}"
        )
    if tls_client_ca is not None and tls_cert is None:
        r.problems.append("MAILER_TLS_CLIENT_CA: needs MAILER_TLS_CERT and MAILER_TLS_KEY")
    tokens = None
    tokens_file = r.parse("MAILER_AUTH_TOKENS_FILE", None, Path)
    if tokens_file is not None:
        try:
            tokens = TokenSet.parse(tokens_file.read_text(encoding="utf-8"))
        except OSError as exc:
            r.problems.append(
                f"MAILER_AUTH_TOKENS_FILE: cannot read {str(tokens_file)!r}: {exc.strerror}"
            )
        except (ValueError, UnicodeDecodeError) as exc:
            r.problems.append(f"MAILER_AUTH_TOKENS_FILE: {exc}")
    auth_all = r.parse("MAILER_AUTH_ALL_SERVICES", False, _flag)
    allow_unauthenticated = r.parse("MAILER_ALLOW_UNAUTHENTICATED", False, _flag)
    if (
        not is_loopback(serve_host)
        and tls_client_ca is None
        and tokens_file is None
        and not allow_unauthenticated
    ):
        r.problems.append(
            f"MAILER_SERVE_HOST: {serve_host} is reachable from other machines, but no caller "
            "authentication is set up: set MAILER_AUTH_TOKENS_FILE or MAILER_TLS_CLIENT_CA, or "
            "MAILER_ALLOW_UNAUTHENTICATED=1 if you mean it"
        )
    metrics_port = r.parse("MAILER_METRICS_PORT", None, _int_in(0, 65535))
    metrics_host = r.raw("MAILER_METRICS_HOST") or "127.0.0.1"
    log_format = r.parse("MAILER_LOG_FORMAT", "text", _one_of("text", "json"))
    health_down_after_s = r.parse(
        "MAILER_HEALTH_DOWN_AFTER_S", 30.0, _seconds(0, 86400, low_inclusive=True)
    )
    outbox_path: Path | None = None
    outbox_text = r.raw("MAILER_OUTBOX")
    if outbox_text is None:
        try:
            outbox_path = default_outbox_path(env)
        except ValueError as exc:
            r.problems.append(f"MAILER_OUTBOX: no default location: {exc}")
    elif outbox_text.lower() != "memory":
        outbox_path = Path(outbox_text)
        if outbox_path.exists() and not outbox_path.is_file():
            r.problems.append(f"MAILER_OUTBOX: expected a file, got {outbox_text!r}")
    retention_s = r.parse(
        "MAILER_STATUS_RETENTION_S", 86400.0, _seconds(0, 365 * 86400, low_inclusive=False)
    )
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        relay_host=relay_host,
        relay_port=relay_port,
        smtp_tls=tls,
        mail_from=mail_from,
        service_name=service_name,
        smtp_user=user,
        smtp_password=password,
        smtp_ca_file=ca_file,
        smtp_timeout_s=smtp_timeout_s,
        serve_host=serve_host,
        serve_port=serve_port,
        queue_size=queue_size,
        templates_dir=templates_dir,
        default_locale=default_locale,
        shutdown_grace_s=grace_s,
        retry_base_s=retry_base_s,
        retry_max_s=retry_max_s,
        max_attempts=max_attempts,
        message_ttl_s=ttl_s,
        retry_capacity=retry_capacity,
        smtp_sessions=smtp_sessions,
        noop_idle_s=noop_idle_s,
        session_max_messages=max_messages,
        session_max_age_s=max_age_s,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_tokens=tokens,
        auth_all_services=auth_all,
        allow_unauthenticated=allow_unauthenticated,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        log_format=log_format,
        health_down_after_s=health_down_after_s,
        outbox_path=outbox_path,
        status_retention_s=retention_s,
    )
