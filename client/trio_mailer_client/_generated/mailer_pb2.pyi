import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MsgRequest(_message.Message):
    __slots__ = ("to", "code", "idempotency_key", "locale")
    TO_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    to: str
    code: str
    idempotency_key: str
    locale: str
    def __init__(self, to: _Optional[str] = ..., code: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., locale: _Optional[str] = ...) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("to", "template", "vars", "locale", "idempotency_key")
    class VarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TO_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VARS_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    to: str
    template: str
    vars: _containers.ScalarMap[str, str]
    locale: str
    idempotency_key: str
    def __init__(self, to: _Optional[str] = ..., template: _Optional[str] = ..., vars: _Optional[_Mapping[str, str]] = ..., locale: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class MsgReply(_message.Message):
    __slots__ = ("sent", "message_id", "reason", "retry_after_ms")
    SENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    sent: bool
    message_id: str
    reason: str
    retry_after_ms: int
    def __init__(self, sent: _Optional[bool] = ..., message_id: _Optional[str] = ..., reason: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("message_id", "idempotency_key")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    idempotency_key: str
    def __init__(self, message_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class MailStatus(_message.Message):
    __slots__ = ("message_id", "state", "attempts", "last_reply_code", "last_reply_text", "accepted_at", "last_attempt_at", "finished_at", "possible_duplicate")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[MailStatus.State]
        QUEUED: _ClassVar[MailStatus.State]
        SENDING: _ClassVar[MailStatus.State]
        RETRY_WAIT: _ClassVar[MailStatus.State]
        DELIVERED: _ClassVar[MailStatus.State]
        FAILED: _ClassVar[MailStatus.State]
        EXPIRED: _ClassVar[MailStatus.State]
    STATE_UNSPECIFIED: MailStatus.State
    QUEUED: MailStatus.State
    SENDING: MailStatus.State
    RETRY_WAIT: MailStatus.State
    DELIVERED: MailStatus.State
    FAILED: MailStatus.State
    EXPIRED: MailStatus.State
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_REPLY_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_REPLY_TEXT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    POSSIBLE_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    state: MailStatus.State
    attempts: int
    last_reply_code: int
    last_reply_text: str
    accepted_at: _timestamp_pb2.Timestamp
    last_attempt_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    possible_duplicate: bool
    def __init__(self, message_id: _Optional[str] = ..., state: _Optional[_Union[MailStatus.State, str]] = ..., attempts: _Optional[int] = ..., last_reply_code: _Optional[int] = ..., last_reply_text: _Optional[str] = ..., accepted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., possible_duplicate: _Optional[bool] = ...) -> None: ...

class ListSuppressedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SuppressedAddress(_message.Message):
    __slots__ = ("address", "since", "until", "reply_code", "reply_text", "message_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODE_FIELD_NUMBER: _ClassVar[int]
    REPLY_TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    reply_code: int
    reply_text: str
    message_id: str
    def __init__(self, address: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reply_code: _Optional[int] = ..., reply_text: _Optional[str] = ..., message_id: _Optional[str] = ...) -> None: ...

class ListSuppressedReply(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedCompositeFieldContainer[SuppressedAddress]
    def __init__(self, addresses: _Optional[_Iterable[_Union[SuppressedAddress, _Mapping]]] = ...) -> None: ...

class RemoveSuppressedRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RemoveSuppressedReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...
