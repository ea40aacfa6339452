# ruff: noqa
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Options(_message.Message):
    __slots__ = ("binary_name",)
    BINARY_NAME_FIELD_NUMBER: _ClassVar[int]
    binary_name: str
    def __init__(self, binary_name: _Optional[str] = ...) -> None: ...
