from proto.edgeloop.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PublishBundleResponse(_message.Message):
    __slots__ = ("bundle_id", "total_bytes")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    total_bytes: int
    def __init__(self, bundle_id: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "labels", "registered_unix_ms", "last_seen_unix_ms", "samples_stored", "drift_events", "acked_update_version", "outbox_dropped_samples", "outbox_pending_samples", "rollbacks", "cohort")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_STORED_FIELD_NUMBER: _ClassVar[int]
    DRIFT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ACKED_UPDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DROPPED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_PENDING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    labels: _containers.ScalarMap[str, str]
    registered_unix_ms: int
    last_seen_unix_ms: int
    samples_stored: int
    drift_events: int
    acked_update_version: int
    outbox_dropped_samples: int
    outbox_pending_samples: int
    rollbacks: int
    cohort: str
    def __init__(self, device_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., registered_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., samples_stored: _Optional[int] = ..., drift_events: _Optional[int] = ..., acked_update_version: _Optional[int] = ..., outbox_dropped_samples: _Optional[int] = ..., outbox_pending_samples: _Optional[int] = ..., rollbacks: _Optional[int] = ..., cohort: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("kind", "max_samples", "steps", "cohort")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    max_samples: int
    steps: int
    cohort: str
    def __init__(self, kind: _Optional[str] = ..., max_samples: _Optional[int] = ..., steps: _Optional[int] = ..., cohort: _Optional[str] = ...) -> None: ...

class StartRoundResponse(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "kind", "state", "update_version", "samples_used", "error", "seconds", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_USED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    kind: str
    state: str
    update_version: int
    samples_used: int
    error: str
    seconds: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round_id: _Optional[int] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., update_version: _Optional[int] = ..., samples_used: _Optional[int] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...
