import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_EVENT_TYPE_UNSPECIFIED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_QUEUED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_STARTED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_COMPLETED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_FAILED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_RETRIED: _ClassVar[StepEventType]
    STEP_EVENT_TYPE_CANCELLED: _ClassVar[StepEventType]

class TaskEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_EVENT_TYPE_UNSPECIFIED: _ClassVar[TaskEventType]
    TASK_EVENT_TYPE_SUBMITTED: _ClassVar[TaskEventType]
    TASK_EVENT_TYPE_COMPLETED: _ClassVar[TaskEventType]
    TASK_EVENT_TYPE_FAILED: _ClassVar[TaskEventType]
    TASK_EVENT_TYPE_CANCELLED: _ClassVar[TaskEventType]
STEP_EVENT_TYPE_UNSPECIFIED: StepEventType
STEP_EVENT_TYPE_QUEUED: StepEventType
STEP_EVENT_TYPE_STARTED: StepEventType
STEP_EVENT_TYPE_COMPLETED: StepEventType
STEP_EVENT_TYPE_FAILED: StepEventType
STEP_EVENT_TYPE_RETRIED: StepEventType
STEP_EVENT_TYPE_CANCELLED: StepEventType
TASK_EVENT_TYPE_UNSPECIFIED: TaskEventType
TASK_EVENT_TYPE_SUBMITTED: TaskEventType
TASK_EVENT_TYPE_COMPLETED: TaskEventType
TASK_EVENT_TYPE_FAILED: TaskEventType
TASK_EVENT_TYPE_CANCELLED: TaskEventType

class StepEvent(_message.Message):
    __slots__ = ("event_id", "task_id", "tenant_id", "step_name", "type", "attempt", "output", "error", "time", "sequence")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    task_id: str
    tenant_id: str
    step_name: str
    type: StepEventType
    attempt: int
    output: _struct_pb2.Value
    error: _status_pb2.Status
    time: _timestamp_pb2.Timestamp
    sequence: int
    def __init__(self, event_id: _Optional[str] = ..., task_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., step_name: _Optional[str] = ..., type: _Optional[_Union[StepEventType, str]] = ..., attempt: _Optional[int] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("event_id", "task_id", "tenant_id", "type", "error", "time", "sequence")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    task_id: str
    tenant_id: str
    type: TaskEventType
    error: _status_pb2.Status
    time: _timestamp_pb2.Timestamp
    sequence: int
    def __init__(self, event_id: _Optional[str] = ..., task_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., type: _Optional[_Union[TaskEventType, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...
