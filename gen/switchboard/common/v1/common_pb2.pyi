import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_TIER_UNSPECIFIED: _ClassVar[ModelTier]
    MODEL_TIER_SMALL: _ClassVar[ModelTier]
    MODEL_TIER_LARGE: _ClassVar[ModelTier]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_FRAME_OUT_OF_ORDER: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_UTF8: _ClassVar[ErrorReason]
    ERROR_REASON_BINARY_CONTENT: _ClassVar[ErrorReason]
    ERROR_REASON_EMPTY_DOCUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_TENANT_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_PRINCIPAL_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_TENANT_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_COLLECTION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_DOCUMENT_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_LEASE_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_KEY_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_IDEMPOTENCY_KEY_REUSED: _ClassVar[ErrorReason]
    ERROR_REASON_PROMPT_TOO_LONG: _ClassVar[ErrorReason]
    ERROR_REASON_EVENT_HISTORY_EXPIRED: _ClassVar[ErrorReason]
    ERROR_REASON_EMBEDDING_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_ETAG_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_MESSAGE_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_QUEUE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_CAPACITY_EXHAUSTED: _ClassVar[ErrorReason]
    ERROR_REASON_TOO_MANY_PENDING_MESSAGES: _ClassVar[ErrorReason]
    ERROR_REASON_DOCUMENT_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_CODE_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_FILES_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_BACKENDS_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_BACKEND_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_DEPENDENCY_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_SANDBOX_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_CODE_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_MISSING_INPUT: _ClassVar[ErrorReason]
    ERROR_REASON_STEP_TIMEOUT: _ClassVar[ErrorReason]
    ERROR_REASON_MAX_DELIVERIES: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_ARGUMENTS_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_HOST_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_CIRCUIT_OPEN: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_REJECTED: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_OPERATION_IN_PROGRESS: _ClassVar[ErrorReason]
    ERROR_REASON_REPLICA_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_ANSWER_INTERRUPTED: _ClassVar[ErrorReason]
MODEL_TIER_UNSPECIFIED: ModelTier
MODEL_TIER_SMALL: ModelTier
MODEL_TIER_LARGE: ModelTier
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_REQUEST: ErrorReason
ERROR_REASON_FRAME_OUT_OF_ORDER: ErrorReason
ERROR_REASON_INVALID_UTF8: ErrorReason
ERROR_REASON_BINARY_CONTENT: ErrorReason
ERROR_REASON_EMPTY_DOCUMENT: ErrorReason
ERROR_REASON_API_KEY_MISSING: ErrorReason
ERROR_REASON_API_KEY_INVALID: ErrorReason
ERROR_REASON_TENANT_MISSING: ErrorReason
ERROR_REASON_PRINCIPAL_NOT_ALLOWED: ErrorReason
ERROR_REASON_TENANT_MISMATCH: ErrorReason
ERROR_REASON_TOOL_NOT_ALLOWED: ErrorReason
ERROR_REASON_MODEL_NOT_FOUND: ErrorReason
ERROR_REASON_COLLECTION_NOT_FOUND: ErrorReason
ERROR_REASON_DOCUMENT_NOT_FOUND: ErrorReason
ERROR_REASON_TASK_NOT_FOUND: ErrorReason
ERROR_REASON_SESSION_NOT_FOUND: ErrorReason
ERROR_REASON_LEASE_NOT_FOUND: ErrorReason
ERROR_REASON_KEY_NOT_FOUND: ErrorReason
ERROR_REASON_IDEMPOTENCY_KEY_REUSED: ErrorReason
ERROR_REASON_PROMPT_TOO_LONG: ErrorReason
ERROR_REASON_EVENT_HISTORY_EXPIRED: ErrorReason
ERROR_REASON_EMBEDDING_MISMATCH: ErrorReason
ERROR_REASON_ETAG_MISMATCH: ErrorReason
ERROR_REASON_CANCELLED: ErrorReason
ERROR_REASON_MESSAGE_TOO_LARGE: ErrorReason
ERROR_REASON_QUOTA_EXCEEDED: ErrorReason
ERROR_REASON_QUEUE_FULL: ErrorReason
ERROR_REASON_CAPACITY_EXHAUSTED: ErrorReason
ERROR_REASON_TOO_MANY_PENDING_MESSAGES: ErrorReason
ERROR_REASON_DOCUMENT_TOO_LARGE: ErrorReason
ERROR_REASON_TASK_TOO_LARGE: ErrorReason
ERROR_REASON_CODE_TOO_LARGE: ErrorReason
ERROR_REASON_FILES_TOO_LARGE: ErrorReason
ERROR_REASON_BACKENDS_UNAVAILABLE: ErrorReason
ERROR_REASON_BACKEND_UNAVAILABLE: ErrorReason
ERROR_REASON_DEPENDENCY_UNAVAILABLE: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_SANDBOX_FAILED: ErrorReason
ERROR_REASON_CODE_FAILED: ErrorReason
ERROR_REASON_MISSING_INPUT: ErrorReason
ERROR_REASON_STEP_TIMEOUT: ErrorReason
ERROR_REASON_MAX_DELIVERIES: ErrorReason
ERROR_REASON_TOOL_NOT_FOUND: ErrorReason
ERROR_REASON_TOOL_ARGUMENTS_INVALID: ErrorReason
ERROR_REASON_TOOL_HOST_NOT_ALLOWED: ErrorReason
ERROR_REASON_TOOL_CIRCUIT_OPEN: ErrorReason
ERROR_REASON_TOOL_UNAVAILABLE: ErrorReason
ERROR_REASON_TOOL_REJECTED: ErrorReason
ERROR_REASON_TOOL_FAILED: ErrorReason
ERROR_REASON_OPERATION_IN_PROGRESS: ErrorReason
ERROR_REASON_REPLICA_NOT_FOUND: ErrorReason
ERROR_REASON_ANSWER_INTERRUPTED: ErrorReason

class TokenUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: ModelTier
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[ModelTier, str]] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("tenant_id", "user_id", "request_id", "priority")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    request_id: str
    priority: Priority
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., request_id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class QueuePosition(_message.Message):
    __slots__ = ("position", "estimated_wait")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_FIELD_NUMBER: _ClassVar[int]
    position: int
    estimated_wait: _duration_pb2.Duration
    def __init__(self, position: _Optional[int] = ..., estimated_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("passage_index", "source_id", "start_char", "end_char", "text")
    PASSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    START_CHAR_FIELD_NUMBER: _ClassVar[int]
    END_CHAR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    passage_index: int
    source_id: str
    start_char: int
    end_char: int
    text: str
    def __init__(self, passage_index: _Optional[int] = ..., source_id: _Optional[str] = ..., start_char: _Optional[int] = ..., end_char: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...
