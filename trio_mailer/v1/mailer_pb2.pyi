from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class MsgRequest(_message.Message):
    __slots__ = ("to", "code")
    TO_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    to: str
    code: str
    def __init__(self, to: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class MsgReply(_message.Message):
    __slots__ = ("sent", "message_id", "reason")
    SENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sent: bool
    message_id: str
    reason: str
    def __init__(self, sent: _Optional[bool] = ..., message_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
