from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Principal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRINCIPAL_UNSPECIFIED: _ClassVar[Principal]
    PRINCIPAL_TENANT: _ClassVar[Principal]
    PRINCIPAL_OPERATOR: _ClassVar[Principal]
PRINCIPAL_UNSPECIFIED: Principal
PRINCIPAL_TENANT: Principal
PRINCIPAL_OPERATOR: Principal
AUTHORITY_FIELD_NUMBER: _ClassVar[int]
authority: _descriptor.FieldDescriptor

class Authority(_message.Message):
    __slots__ = ("principals",)
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedScalarFieldContainer[Principal]
    def __init__(self, principals: _Optional[_Iterable[_Union[Principal, str]]] = ...) -> None: ...
