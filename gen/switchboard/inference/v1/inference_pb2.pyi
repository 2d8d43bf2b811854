import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from switchboard.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_GENERATOR: _ClassVar[ModelKind]
    MODEL_KIND_EMBEDDER: _ClassVar[ModelKind]

class BackendState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_STATE_UNSPECIFIED: _ClassVar[BackendState]
    BACKEND_STATE_HEALTHY: _ClassVar[BackendState]
    BACKEND_STATE_OPEN: _ClassVar[BackendState]
    BACKEND_STATE_HALF_OPEN: _ClassVar[BackendState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_GENERATOR: ModelKind
MODEL_KIND_EMBEDDER: ModelKind
BACKEND_STATE_UNSPECIFIED: BackendState
BACKEND_STATE_HEALTHY: BackendState
BACKEND_STATE_OPEN: BackendState
BACKEND_STATE_HALF_OPEN: BackendState

class Passage(_message.Message):
    __slots__ = ("source_id", "text")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    text: str
    def __init__(self, source_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("max_tokens", "temperature", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "tier", "prompt", "context", "parameters", "session_id", "priority", "report_queue_position")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REPORT_QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: _common_pb2.ModelTier
    prompt: str
    context: _containers.RepeatedCompositeFieldContainer[Passage]
    parameters: GenerationParameters
    session_id: str
    priority: _common_pb2.Priority
    report_queue_position: bool
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.ModelTier, str]] = ..., prompt: _Optional[str] = ..., context: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., session_id: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., report_queue_position: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "complete", "queued")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    token: TokenDelta
    complete: GenerationComplete
    queued: _common_pb2.QueuePosition
    def __init__(self, token: _Optional[_Union[TokenDelta, _Mapping]] = ..., complete: _Optional[_Union[GenerationComplete, _Mapping]] = ..., queued: _Optional[_Union[_common_pb2.QueuePosition, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("text", "index", "passage_index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    index: int
    passage_index: int
    def __init__(self, text: _Optional[str] = ..., index: _Optional[int] = ..., passage_index: _Optional[int] = ...) -> None: ...

class GenerationComplete(_message.Message):
    __slots__ = ("usage", "model", "backend", "finish_reason", "citations", "time_to_first_token")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.TokenUsage
    model: _common_pb2.ModelRef
    backend: str
    finish_reason: FinishReason
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    time_to_first_token: _duration_pb2.Duration
    def __init__(self, usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., backend: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "dimensions", "usage")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: str
    dimensions: int
    usage: _common_pb2.TokenUsage
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "tier", "context_tokens", "relative_cost", "kind", "healthy", "backends")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_COST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: _common_pb2.ModelTier
    context_tokens: int
    relative_cost: float
    kind: ModelKind
    healthy: bool
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.ModelTier, str]] = ..., context_tokens: _Optional[int] = ..., relative_cost: _Optional[float] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., healthy: _Optional[bool] = ..., backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("name", "address", "state", "outstanding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: BackendState
    outstanding: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[BackendState, str]] = ..., outstanding: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
