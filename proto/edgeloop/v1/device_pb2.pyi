from proto.edgeloop.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "labels", "runtime_backend")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BACKEND_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    labels: _containers.ScalarMap[str, str]
    runtime_backend: str
    def __init__(self, device_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., runtime_backend: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "bundle_id", "latest_update_version", "bundle_files", "cohort", "update_public_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    LATEST_UPDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FILES_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    latest_update_version: int
    bundle_files: _containers.RepeatedScalarFieldContainer[str]
    cohort: str
    update_public_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., latest_update_version: _Optional[int] = ..., bundle_files: _Optional[_Iterable[str]] = ..., cohort: _Optional[str] = ..., update_public_key: _Optional[bytes] = ...) -> None: ...

class FetchBundleRequest(_message.Message):
    __slots__ = ("device_id", "bundle_id", "paths", "chunk_size")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    paths: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., paths: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("device_id", "sample_id", "bundle_id", "input", "features", "entropy", "prediction", "stream_position", "captured_unix_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    sample_id: str
    bundle_id: str
    input: _common_pb2.Tensor
    features: _common_pb2.Tensor
    entropy: float
    prediction: int
    stream_position: int
    captured_unix_ms: int
    def __init__(self, device_id: _Optional[str] = ..., sample_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., features: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., entropy: _Optional[float] = ..., prediction: _Optional[int] = ..., stream_position: _Optional[int] = ..., captured_unix_ms: _Optional[int] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("stored_ids", "duplicate_ids", "bytes_received")
    STORED_IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_IDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    stored_ids: _containers.RepeatedScalarFieldContainer[str]
    duplicate_ids: _containers.RepeatedScalarFieldContainer[str]
    bytes_received: int
    def __init__(self, stored_ids: _Optional[_Iterable[str]] = ..., duplicate_ids: _Optional[_Iterable[str]] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("device_id", "detector", "signal", "statistic", "threshold", "stream_position", "detected_unix_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    DETECTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    detector: str
    signal: str
    statistic: float
    threshold: float
    stream_position: int
    detected_unix_ms: int
    def __init__(self, device_id: _Optional[str] = ..., detector: _Optional[str] = ..., signal: _Optional[str] = ..., statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., stream_position: _Optional[int] = ..., detected_unix_ms: _Optional[int] = ...) -> None: ...

class DriftAck(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    def __init__(self, event_id: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("device_id", "bundle_id", "since_version", "max_wait_seconds", "held_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    since_version: int
    max_wait_seconds: float
    held_version: int
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., since_version: _Optional[int] = ..., max_wait_seconds: _Optional[float] = ..., held_version: _Optional[int] = ...) -> None: ...

class FederatedUpdate(_message.Message):
    __slots__ = ("device_id", "bundle_id", "base_version", "num_samples", "tensors", "encoding", "payload", "base_sha256")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    base_version: int
    num_samples: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    encoding: str
    payload: bytes
    base_sha256: str
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., base_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., encoding: _Optional[str] = ..., payload: _Optional[bytes] = ..., base_sha256: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("device_id", "bundle_id", "held_version", "held_sha256")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_SHA256_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    held_version: int
    held_sha256: str
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., held_version: _Optional[int] = ..., held_sha256: _Optional[str] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: int
    def __init__(self, submission_id: _Optional[int] = ...) -> None: ...

class OutboxReport(_message.Message):
    __slots__ = ("device_id", "dropped_samples", "dropped_bytes", "pending_samples", "pending_bytes", "max_bytes", "eviction_policy", "reported_unix_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    REPORTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    dropped_samples: int
    dropped_bytes: int
    pending_samples: int
    pending_bytes: int
    max_bytes: int
    eviction_policy: str
    reported_unix_ms: int
    def __init__(self, device_id: _Optional[str] = ..., dropped_samples: _Optional[int] = ..., dropped_bytes: _Optional[int] = ..., pending_samples: _Optional[int] = ..., pending_bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., eviction_policy: _Optional[str] = ..., reported_unix_ms: _Optional[int] = ...) -> None: ...

class OutboxAck(_message.Message):
    __slots__ = ("dropped_samples",)
    DROPPED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    dropped_samples: int
    def __init__(self, dropped_samples: _Optional[int] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("device_id", "enrollment_secret")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    enrollment_secret: str
    def __init__(self, device_id: _Optional[str] = ..., enrollment_secret: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "device_token")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_token: str
    def __init__(self, device_id: _Optional[str] = ..., device_token: _Optional[str] = ...) -> None: ...

class RollbackReport(_message.Message):
    __slots__ = ("device_id", "bundle_id", "cohort", "version", "restored_version", "reason", "entropy_before", "entropy_after", "agreement_before", "agreement_after", "rolled_back_unix_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_AFTER_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_id: str
    cohort: str
    version: int
    restored_version: int
    reason: str
    entropy_before: float
    entropy_after: float
    agreement_before: float
    agreement_after: float
    rolled_back_unix_ms: int
    def __init__(self, device_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., cohort: _Optional[str] = ..., version: _Optional[int] = ..., restored_version: _Optional[int] = ..., reason: _Optional[str] = ..., entropy_before: _Optional[float] = ..., entropy_after: _Optional[float] = ..., agreement_before: _Optional[float] = ..., agreement_after: _Optional[float] = ..., rolled_back_unix_ms: _Optional[int] = ...) -> None: ...

class RollbackAck(_message.Message):
    __slots__ = ("rollback_id",)
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    rollback_id: int
    def __init__(self, rollback_id: _Optional[int] = ...) -> None: ...
