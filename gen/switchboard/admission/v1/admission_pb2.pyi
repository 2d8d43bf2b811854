import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from switchboard.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmitRequest(_message.Message):
    __slots__ = ("context", "tier", "estimated_prompt_tokens", "max_completion_tokens", "no_wait", "max_wait")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    tier: _common_pb2.ModelTier
    estimated_prompt_tokens: int
    max_completion_tokens: int
    no_wait: bool
    max_wait: _duration_pb2.Duration
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.ModelTier, str]] = ..., estimated_prompt_tokens: _Optional[int] = ..., max_completion_tokens: _Optional[int] = ..., no_wait: _Optional[bool] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("lease", "queue_wait", "initial_queue_position")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    queue_wait: _duration_pb2.Duration
    initial_queue_position: int
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., queue_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., initial_queue_position: _Optional[int] = ...) -> None: ...

class AdmitStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: AdmitRequest
    def __init__(self, request: _Optional[_Union[AdmitRequest, _Mapping]] = ...) -> None: ...

class AdmitStreamResponse(_message.Message):
    __slots__ = ("queued", "admitted")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    queued: _common_pb2.QueuePosition
    admitted: AdmitResponse
    def __init__(self, queued: _Optional[_Union[_common_pb2.QueuePosition, _Mapping]] = ..., admitted: _Optional[_Union[AdmitResponse, _Mapping]] = ...) -> None: ...

class AdmitSessionRequest(_message.Message):
    __slots__ = ("request", "reserve", "claim", "give_back")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    GIVE_BACK_FIELD_NUMBER: _ClassVar[int]
    request: AdmitRequest
    reserve: SliceRequest
    claim: str
    give_back: SliceReturn
    def __init__(self, request: _Optional[_Union[AdmitRequest, _Mapping]] = ..., reserve: _Optional[_Union[SliceRequest, _Mapping]] = ..., claim: _Optional[str] = ..., give_back: _Optional[_Union[SliceReturn, _Mapping]] = ...) -> None: ...

class SliceRequest(_message.Message):
    __slots__ = ("shape", "count")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    shape: AdmitRequest
    count: int
    def __init__(self, shape: _Optional[_Union[AdmitRequest, _Mapping]] = ..., count: _Optional[int] = ...) -> None: ...

class SliceReturn(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("admissions",)
    ADMISSIONS_FIELD_NUMBER: _ClassVar[int]
    admissions: _containers.RepeatedCompositeFieldContainer[AdmitResponse]
    def __init__(self, admissions: _Optional[_Iterable[_Union[AdmitResponse, _Mapping]]] = ...) -> None: ...

class SliceRecall(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdmitSessionResponse(_message.Message):
    __slots__ = ("request_id", "queued", "admitted", "refused", "slice", "recall")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: _common_pb2.QueuePosition
    admitted: AdmitResponse
    refused: _status_pb2.Status
    slice: Slice
    recall: SliceRecall
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[_common_pb2.QueuePosition, _Mapping]] = ..., admitted: _Optional[_Union[AdmitResponse, _Mapping]] = ..., refused: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., slice: _Optional[_Union[Slice, _Mapping]] = ..., recall: _Optional[_Union[SliceRecall, _Mapping]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "tenant_id", "charged_tokens", "expire_time")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    tenant_id: str
    charged_tokens: int
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., charged_tokens: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "actual_usage", "request_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    actual_usage: _common_pb2.TokenUsage
    request_id: str
    def __init__(self, lease_id: _Optional[str] = ..., actual_usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "token_adjustment")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    released: bool
    token_adjustment: int
    def __init__(self, released: _Optional[bool] = ..., token_adjustment: _Optional[int] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetQuotaResponse(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: QuotaStatus
    def __init__(self, quota: _Optional[_Union[QuotaStatus, _Mapping]] = ...) -> None: ...

class QuotaStatus(_message.Message):
    __slots__ = ("tenant_id", "user_id", "policy", "available_requests", "available_tokens", "in_flight", "queued")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    policy: Policy
    available_requests: float
    available_tokens: int
    in_flight: int
    queued: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., available_requests: _Optional[float] = ..., available_tokens: _Optional[int] = ..., in_flight: _Optional[int] = ..., queued: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("priority", "waiting")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    priority: _common_pb2.Priority
    waiting: int
    def __init__(self, priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., waiting: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("tenant_id", "user_id", "requests_per_second", "request_burst", "tokens_per_minute", "token_burst", "max_in_flight", "weight", "max_queued", "update_time", "etag")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BURST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    requests_per_second: float
    request_burst: int
    tokens_per_minute: int
    token_burst: int
    max_in_flight: int
    weight: int
    max_queued: int
    update_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., requests_per_second: _Optional[float] = ..., request_burst: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., token_burst: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., weight: _Optional[int] = ..., max_queued: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy", "is_default")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    is_default: bool
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., is_default: _Optional[bool] = ...) -> None: ...

class UpdatePolicyRequest(_message.Message):
    __slots__ = ("policy", "update_mask")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdatePolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "next_page_token")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    next_page_token: str
    def __init__(self, policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePolicyRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class DeletePolicyResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
