from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "surface", "limit")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    surface: str
    limit: int
    def __init__(self, user_id: _Optional[str] = ..., surface: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class GetCandidatesResponse(_message.Message):
    __slots__ = ("user_id", "surface", "candidates", "model_version", "generated_at_ms", "source_event_ts_ms", "is_fallback")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EVENT_TS_MS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    surface: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model_version: str
    generated_at_ms: int
    source_event_ts_ms: int
    is_fallback: bool
    def __init__(self, user_id: _Optional[str] = ..., surface: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model_version: _Optional[str] = ..., generated_at_ms: _Optional[int] = ..., source_event_ts_ms: _Optional[int] = ..., is_fallback: _Optional[bool] = ...) -> None: ...

class BatchGetCandidatesRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GetCandidatesRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GetCandidatesRequest, _Mapping]]] = ...) -> None: ...

class BatchGetCandidatesResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[GetCandidatesResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[GetCandidatesResponse, _Mapping]]] = ...) -> None: ...
