import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from switchboard.common.v1 import common_pb2 as _common_pb2
from switchboard.events.v1 import events_pb2 as _events_pb2
from switchboard.inference.v1 import inference_pb2 as _inference_pb2
from switchboard.rag.v1 import rag_pb2 as _rag_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_ROLE_UNSPECIFIED: _ClassVar[MessageRole]
    MESSAGE_ROLE_USER: _ClassVar[MessageRole]
    MESSAGE_ROLE_ASSISTANT: _ClassVar[MessageRole]
    MESSAGE_ROLE_TOOL_CALL: _ClassVar[MessageRole]
    MESSAGE_ROLE_TOOL_RESULT: _ClassVar[MessageRole]

class MessageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_STATUS_UNSPECIFIED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_IN_PROGRESS: _ClassVar[MessageStatus]
    MESSAGE_STATUS_COMPLETED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_CANCELLED: _ClassVar[MessageStatus]
    MESSAGE_STATUS_FAILED: _ClassVar[MessageStatus]
MESSAGE_ROLE_UNSPECIFIED: MessageRole
MESSAGE_ROLE_USER: MessageRole
MESSAGE_ROLE_ASSISTANT: MessageRole
MESSAGE_ROLE_TOOL_CALL: MessageRole
MESSAGE_ROLE_TOOL_RESULT: MessageRole
MESSAGE_STATUS_UNSPECIFIED: MessageStatus
MESSAGE_STATUS_IN_PROGRESS: MessageStatus
MESSAGE_STATUS_COMPLETED: MessageStatus
MESSAGE_STATUS_CANCELLED: MessageStatus
MESSAGE_STATUS_FAILED: MessageStatus

class SessionSettings(_message.Message):
    __slots__ = ("system_prompt", "collection", "retrieval_top_k", "allowed_tools", "code_enabled", "model", "tier", "parameters", "priority")
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    CODE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    system_prompt: str
    collection: str
    retrieval_top_k: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    code_enabled: bool
    model: str
    tier: _common_pb2.ModelTier
    parameters: _inference_pb2.GenerationParameters
    priority: _common_pb2.Priority
    def __init__(self, system_prompt: _Optional[str] = ..., collection: _Optional[str] = ..., retrieval_top_k: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ..., code_enabled: _Optional[bool] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.ModelTier, str]] = ..., parameters: _Optional[_Union[_inference_pb2.GenerationParameters, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "title", "settings", "message_count", "usage", "create_time", "update_time", "last_event_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    title: str
    settings: SessionSettings
    message_count: int
    usage: _common_pb2.TokenUsage
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_event_id: str
    def __init__(self, session_id: _Optional[str] = ..., title: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., message_count: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_event_id: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("tool_call_id", "tool", "arguments", "task_id")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    tool: str
    arguments: _struct_pb2.Struct
    task_id: str
    def __init__(self, tool_call_id: _Optional[str] = ..., tool: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., task_id: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("tool_call_id", "output", "error")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    output: _struct_pb2.Value
    error: _status_pb2.Status
    def __init__(self, tool_call_id: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("message_id", "session_id", "sequence", "role", "status", "text", "tool_call", "tool_result", "citations", "passages", "usage", "model", "error", "client_message_id", "create_time")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    session_id: str
    sequence: int
    role: MessageRole
    status: MessageStatus
    text: str
    tool_call: ToolCall
    tool_result: ToolResult
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    passages: _containers.RepeatedCompositeFieldContainer[_rag_pb2.RetrievedChunk]
    usage: _common_pb2.TokenUsage
    model: _common_pb2.ModelRef
    error: _status_pb2.Status
    client_message_id: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., role: _Optional[_Union[MessageRole, str]] = ..., status: _Optional[_Union[MessageStatus, str]] = ..., text: _Optional[str] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., passages: _Optional[_Iterable[_Union[_rag_pb2.RetrievedChunk, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., client_message_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("title", "settings")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    title: str
    settings: SessionSettings
    def __init__(self, title: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session", "update_mask")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    session: Session
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("session_id", "page_size", "page_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    page_size: int
    page_token: str
    def __init__(self, session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("open", "resume", "message", "cancel", "settings")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    resume: ResumeSession
    message: UserMessage
    cancel: CancelTurn
    settings: ChangeSettings
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., resume: _Optional[_Union[ResumeSession, _Mapping]] = ..., message: _Optional[_Union[UserMessage, _Mapping]] = ..., cancel: _Optional[_Union[CancelTurn, _Mapping]] = ..., settings: _Optional[_Union[ChangeSettings, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResumeSession(_message.Message):
    __slots__ = ("session_id", "last_event_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    last_event_id: str
    def __init__(self, session_id: _Optional[str] = ..., last_event_id: _Optional[str] = ...) -> None: ...

class UserMessage(_message.Message):
    __slots__ = ("client_message_id", "text")
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    client_message_id: str
    text: str
    def __init__(self, client_message_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class CancelTurn(_message.Message):
    __slots__ = ("assistant_message_id",)
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    assistant_message_id: str
    def __init__(self, assistant_message_id: _Optional[str] = ...) -> None: ...

class ChangeSettings(_message.Message):
    __slots__ = ("settings", "update_mask")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    settings: SessionSettings
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("event_id", "message_id", "opened", "turn_started", "queued", "token", "citations", "tool_call", "tool_progress", "turn_completed", "error", "settings_changed")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TURN_STARTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TURN_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    message_id: str
    opened: SessionOpened
    turn_started: TurnStarted
    queued: _common_pb2.QueuePosition
    token: _inference_pb2.TokenDelta
    citations: Citations
    tool_call: ToolCall
    tool_progress: ToolProgress
    turn_completed: TurnCompleted
    error: ErrorFrame
    settings_changed: SettingsChanged
    def __init__(self, event_id: _Optional[str] = ..., message_id: _Optional[str] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., turn_started: _Optional[_Union[TurnStarted, _Mapping]] = ..., queued: _Optional[_Union[_common_pb2.QueuePosition, _Mapping]] = ..., token: _Optional[_Union[_inference_pb2.TokenDelta, _Mapping]] = ..., citations: _Optional[_Union[Citations, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_progress: _Optional[_Union[ToolProgress, _Mapping]] = ..., turn_completed: _Optional[_Union[TurnCompleted, _Mapping]] = ..., error: _Optional[_Union[ErrorFrame, _Mapping]] = ..., settings_changed: _Optional[_Union[SettingsChanged, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session", "resumed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    resumed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., resumed: _Optional[bool] = ...) -> None: ...

class TurnStarted(_message.Message):
    __slots__ = ("client_message_id", "user_message_id", "assistant_message_id")
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    client_message_id: str
    user_message_id: str
    assistant_message_id: str
    def __init__(self, client_message_id: _Optional[str] = ..., user_message_id: _Optional[str] = ..., assistant_message_id: _Optional[str] = ...) -> None: ...

class Citations(_message.Message):
    __slots__ = ("citations", "passages")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    passages: _containers.RepeatedCompositeFieldContainer[_rag_pb2.RetrievedChunk]
    def __init__(self, citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., passages: _Optional[_Iterable[_Union[_rag_pb2.RetrievedChunk, _Mapping]]] = ...) -> None: ...

class ToolProgress(_message.Message):
    __slots__ = ("tool_call_id", "event")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    event: _events_pb2.StepEvent
    def __init__(self, tool_call_id: _Optional[str] = ..., event: _Optional[_Union[_events_pb2.StepEvent, _Mapping]] = ...) -> None: ...

class TurnCompleted(_message.Message):
    __slots__ = ("assistant_message_id", "status", "finish_reason", "usage", "model")
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    assistant_message_id: str
    status: MessageStatus
    finish_reason: _inference_pb2.FinishReason
    usage: _common_pb2.TokenUsage
    model: _common_pb2.ModelRef
    def __init__(self, assistant_message_id: _Optional[str] = ..., status: _Optional[_Union[MessageStatus, str]] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ErrorFrame(_message.Message):
    __slots__ = ("status", "client_message_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    client_message_id: str
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class SettingsChanged(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class SendMessageRequest(_message.Message):
    __slots__ = ("session_id", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: UserMessage
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[_Union[UserMessage, _Mapping]] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ("accepted", "last_event_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    last_event_id: str
    def __init__(self, accepted: _Optional[bool] = ..., last_event_id: _Optional[str] = ...) -> None: ...

class CancelTurnRequest(_message.Message):
    __slots__ = ("session_id", "assistant_message_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    assistant_message_id: str
    def __init__(self, session_id: _Optional[str] = ..., assistant_message_id: _Optional[str] = ...) -> None: ...

class CancelTurnResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("session_id", "after_event_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_event_id: str
    def __init__(self, session_id: _Optional[str] = ..., after_event_id: _Optional[str] = ...) -> None: ...

class StreamEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: ConverseResponse
    def __init__(self, event: _Optional[_Union[ConverseResponse, _Mapping]] = ...) -> None: ...
