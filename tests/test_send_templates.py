"""``Send`` end to end: templates, variables and locales, through the fake relay."""

from __future__ import annotations

import email
import email.message
import email.policy
import logging
import shutil
from pathlib import Path

import grpc
import pytest
import trio

from trio_mailer.core.config import shipped_templates_dir
from trio_mailer.v1.mailer_pb2 import MsgReply, MsgRequest, SendRequest

TIMEOUT_S = 30


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def grpcio_send(port: int, request: SendRequest) -> MsgReply:
    """``Send`` from a stock grpcio client: the protos are the contract."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/trio_mailer.v1.Mailer/Send",
            request_serializer=SendRequest.SerializeToString,
            response_deserializer=MsgReply.FromString,
        )
        reply: MsgReply = call(request, timeout=10)
        return reply


async def test_send_in_russian_arrives_as_multipart_alternative(start_harness) -> None:
    """A ru Send: multipart/alternative, text then html, UTF-8 in 7-bit encodings,
    Content-Language: ru, Auto-Submitted: auto-generated."""
    with trio.fail_after(TIMEOUT_S):
        async with start_harness() as h:
            reply = await h.stub.Send(
                SendRequest(
                    to="user@example.com",
                    template="password",
                    vars={"code": "739201"},
                    locale="ru-RU",
                )
            )
            assert reply.sent, reply.reason
            await h.relay.wait_for_mails(1)
    data = h.relay.received[0].data
    assert data.isascii()
    message = parse(data)
    assert str(message["Message-ID"]) == reply.message_id
    assert str(message["Content-Language"]) == "ru"
    assert str(message["Auto-Submitted"]) == "auto-generated"
    assert str(message["Subject"]) == "Код для входа в Acme"
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    for part in (text, html):
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] in ("base64", "quoted-printable")
    assert "Ваш код для входа в Acme:" in text.get_content()
    assert "    739201" in text.get_content()
    assert '<html lang="ru">' in html.get_content()
    assert ">739201</code>" in html.get_content()


async def test_send_pass_takes_a_locale_and_unknown_ones_fall_back(start_harness) -> None:
    """SendPass with locale ru is the ru mail; an unknown locale is the default, not an error."""
    with trio.fail_after(TIMEOUT_S):
        async with start_harness() as h:
            ru = await h.stub.SendPass(MsgRequest(to="user@example.com", code="1", locale="ru"))
            xx = await h.stub.SendRetrieve(
                MsgRequest(to="user@example.com", code="2", locale="tlh")
            )
            assert ru.sent and xx.sent
            await h.relay.wait_for_mails(2)
    languages = sorted(str(parse(m.data)["Content-Language"]) for m in h.relay.received)
    assert languages == ["en", "ru"]


async def test_grpcio_client_calls_send_with_vars(start_harness) -> None:
    """A grpcio client's Send with a vars map arrives, html-escaped in the html part."""
    with trio.fail_after(TIMEOUT_S):
        async with start_harness() as h:
            reply = await trio.to_thread.run_sync(
                grpcio_send,
                h.grpc_port,
                SendRequest(to="user@example.com", template="retrieve", vars={"code": "<b>42</b>"}),
            )
            assert reply.sent
            await h.relay.wait_for_mails(1)
    text, html = parse(h.relay.received[0].data).iter_parts()
    assert "    <b>42</b>" in text.get_content()
    assert "&lt;b&gt;42&lt;/b&gt;" in html.get_content()
    assert "<b>42</b>" not in html.get_content()


@pytest.mark.parametrize(
    ("request_fields", "detail"),
    [
        (
            {"template": "welcome", "vars": {"code": "1"}},
            "template: unknown template 'welcome' (known: password, retrieve)",
        ),
        ({"template": "password"}, "vars.code: template 'password' requires it, got nothing"),
        (
            {"template": "password", "vars": {"code": "1", "name": "x"}},
            "vars.name: template 'password' does not take this variable (it requires: code)",
        ),
        (
            {"template": "password", "vars": {"code": "9" * 1001}},
            "vars.code: template 'password': expected at most 1000 characters, got 1001",
        ),
        (
            {"template": "password", "vars": {"code": "1\nBcc: x@y.z"}},
            "vars.code: template 'password': control character '\\n' is not allowed",
        ),
        (
            {"template": "password", "vars": {"code": "1"}, "locale": "../../etc"},
            "locale: expected a language tag such as en, ru or pt-BR, got '../../etc'",
        ),
    ],
)
async def test_bad_send_requests_are_invalid_argument_naming_the_field(
    start_harness, request_fields: dict[str, object], detail: str
) -> None:
    """Unknown template, missing/unknown/too long/unsafe variable: INVALID_ARGUMENT, named."""
    with trio.fail_after(TIMEOUT_S):
        async with start_harness() as h:
            with pytest.raises(grpc.RpcError) as info:
                await trio.to_thread.run_sync(
                    grpcio_send,
                    h.grpc_port,
                    SendRequest(to="user@example.com", **request_fields),  # type: ignore[arg-type]
                )
            assert h.relay.received == []
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == detail


async def test_templates_reload_and_a_broken_set_is_refused(
    start_harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """reload_templates (SIGHUP): a new template becomes sendable; a broken set is refused at
    ERROR and the running templates keep working."""
    templates = tmp_path / "templates"
    shutil.copytree(shipped_templates_dir(), templates)
    with trio.fail_after(TIMEOUT_S):
        async with start_harness(env={"MAILER_TEMPLATES_DIR": str(templates)}) as h:
            request = SendRequest(to="user@example.com", template="welcome", vars={"name": "Ann"})
            with pytest.raises(grpc.RpcError):
                await trio.to_thread.run_sync(grpcio_send, h.grpc_port, request)
            (templates / "mail" / "welcome.msg").write_text(
                "{# requires: name #}{% block subject %}Welcome, {{ name }}{% endblock %}"
                "{% block text %}Hello {{ name }}{% endblock %}",
                encoding="utf-8",
            )
            assert h.app.reload_templates()
            assert (await h.stub.Send(request)).sent
            (templates / "mail" / "password.ru.msg").write_text("{% block subject %}{{ x ")
            with caplog.at_level(logging.ERROR):
                assert not h.app.reload_templates()
            assert "templates not reloaded, keeping the running ones" in caplog.text
            assert "password.ru.msg:1: syntax error" in caplog.text
            assert (await h.stub.Send(request)).sent
            assert (
                await h.stub.SendPass(MsgRequest(to="user@example.com", code="1", locale="ru"))
            ).sent
            await h.relay.wait_for_mails(3)
    subjects = [str(parse(m.data)["Subject"]) for m in h.relay.received]
    assert subjects == ["Welcome, Ann", "Welcome, Ann", "Код для входа в Acme"]
