from fedkrso.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATUS_UNSPECIFIED: _ClassVar[RoundStatus]
    ROUND_STATUS_TRAIN: _ClassVar[RoundStatus]
    ROUND_STATUS_WAIT: _ClassVar[RoundStatus]
    ROUND_STATUS_FINISHED: _ClassVar[RoundStatus]

class CatchUp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATCH_UP_UNSPECIFIED: _ClassVar[CatchUp]
    CATCH_UP_NONE: _ClassVar[CatchUp]
    CATCH_UP_DELTAS: _ClassVar[CatchUp]
    CATCH_UP_SNAPSHOT: _ClassVar[CatchUp]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
ROUND_STATUS_UNSPECIFIED: RoundStatus
ROUND_STATUS_TRAIN: RoundStatus
ROUND_STATUS_WAIT: RoundStatus
ROUND_STATUS_FINISHED: RoundStatus
CATCH_UP_UNSPECIFIED: CatchUp
CATCH_UP_NONE: CatchUp
CATCH_UP_DELTAS: CatchUp
CATCH_UP_SNAPSHOT: CatchUp
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class JoinRequest(_message.Message):
    __slots__ = ("name", "num_samples", "software_version", "eval_samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_samples: int
    software_version: str
    eval_samples: int
    def __init__(self, name: _Optional[str] = ..., num_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., eval_samples: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("client_id", "run_id", "config_json", "model_fingerprint", "current_round", "max_chunk_bytes")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run_id: str
    config_json: str
    model_fingerprint: str
    current_round: int
    max_chunk_bytes: int
    def __init__(self, client_id: _Optional[str] = ..., run_id: _Optional[str] = ..., config_json: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., current_round: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("run_id", "have_round", "wait_seconds", "holds_run_seeds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_RUN_SEEDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    have_round: int
    wait_seconds: float
    holds_run_seeds: bool
    def __init__(self, run_id: _Optional[str] = ..., have_round: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., holds_run_seeds: _Optional[bool] = ...) -> None: ...

class RoundHeader(_message.Message):
    __slots__ = ("status", "round", "seeds", "plan_fingerprint", "catch_up", "target_round", "state_fingerprint", "num_deltas", "snapshot_round", "deadline_unix")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_DELTAS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    status: RoundStatus
    round: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    plan_fingerprint: str
    catch_up: CatchUp
    target_round: int
    state_fingerprint: str
    num_deltas: int
    snapshot_round: int
    deadline_unix: float
    def __init__(self, status: _Optional[_Union[RoundStatus, str]] = ..., round: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., plan_fingerprint: _Optional[str] = ..., catch_up: _Optional[_Union[CatchUp, str]] = ..., target_round: _Optional[int] = ..., state_fingerprint: _Optional[str] = ..., num_deltas: _Optional[int] = ..., snapshot_round: _Optional[int] = ..., deadline_unix: _Optional[float] = ...) -> None: ...

class DeltaHeader(_message.Message):
    __slots__ = ("round", "seeds", "num_tensors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    num_tensors: int
    def __init__(self, round: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., num_tensors: _Optional[int] = ...) -> None: ...

class StartRoundResponse(_message.Message):
    __slots__ = ("header", "delta", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: RoundHeader
    delta: DeltaHeader
    tensors: _tensor_pb2.TensorBatch
    def __init__(self, header: _Optional[_Union[RoundHeader, _Mapping]] = ..., delta: _Optional[_Union[DeltaHeader, _Mapping]] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorBatch, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round", "num_samples", "loss", "steps", "seeds_used", "num_tensors", "update_digest", "train_seconds", "peak_rss_bytes", "train_state_bytes", "eval_metrics", "eval_examples", "accelerator_peak_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    num_samples: int
    loss: float
    steps: int
    seeds_used: _containers.RepeatedScalarFieldContainer[int]
    num_tensors: int
    update_digest: str
    train_seconds: float
    peak_rss_bytes: int
    train_state_bytes: int
    eval_metrics: _containers.RepeatedCompositeFieldContainer[EvalMetric]
    eval_examples: int
    accelerator_peak_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., loss: _Optional[float] = ..., steps: _Optional[int] = ..., seeds_used: _Optional[_Iterable[int]] = ..., num_tensors: _Optional[int] = ..., update_digest: _Optional[str] = ..., train_seconds: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., train_state_bytes: _Optional[int] = ..., eval_metrics: _Optional[_Iterable[_Union[EvalMetric, _Mapping]]] = ..., eval_examples: _Optional[int] = ..., accelerator_peak_bytes: _Optional[int] = ...) -> None: ...

class EvalMetric(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensors: _tensor_pb2.TensorBatch
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorBatch, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "round", "payload_bytes", "message_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    round: int
    payload_bytes: int
    message_bytes: int
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., message_bytes: _Optional[int] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("run_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("header", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: RoundHeader
    tensors: _tensor_pb2.TensorBatch
    def __init__(self, header: _Optional[_Union[RoundHeader, _Mapping]] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorBatch, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "round", "phase")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    phase: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("run_finished", "current_round")
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_finished: bool
    current_round: int
    def __init__(self, run_finished: _Optional[bool] = ..., current_round: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("run_id", "round", "cipher_public_key", "mask_public_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class ClientKeys(_message.Message):
    __slots__ = ("client_id", "cipher_public_key", "mask_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysResponse(_message.Message):
    __slots__ = ("clients", "threshold", "fixed_point_bits", "ring_bits")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_BITS_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientKeys]
    threshold: int
    fixed_point_bits: int
    ring_bits: int
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientKeys, _Mapping]]] = ..., threshold: _Optional[int] = ..., fixed_point_bits: _Optional[int] = ..., ring_bits: _Optional[int] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("client_id", "ciphertext", "mask_key_commitment", "self_mask_commitment")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    ciphertext: bytes
    mask_key_commitment: bytes
    self_mask_commitment: bytes
    def __init__(self, client_id: _Optional[str] = ..., ciphertext: _Optional[bytes] = ..., mask_key_commitment: _Optional[bytes] = ..., self_mask_commitment: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("run_id", "round", "shares")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ShareKeysResponse(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ConfirmSharesRequest(_message.Message):
    __slots__ = ("run_id", "round", "complaints")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMPLAINTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    complaints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., complaints: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfirmSharesResponse(_message.Message):
    __slots__ = ("members", "excluded")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    excluded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, members: _Optional[_Iterable[str]] = ..., excluded: _Optional[_Iterable[str]] = ...) -> None: ...

class MaskedInputRequest(_message.Message):
    __slots__ = ("header", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensors: _tensor_pb2.TensorBatch
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorBatch, _Mapping]] = ...) -> None: ...

class MaskedInputResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "round", "payload_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    round: int
    payload_bytes: int
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class UnmaskingRequest(_message.Message):
    __slots__ = ("run_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class UnmaskingResponse(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("client_id", "kind", "share")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    kind: ShareKind
    share: bytes
    def __init__(self, client_id: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class RevealSharesRequest(_message.Message):
    __slots__ = ("run_id", "round", "shares")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class RevealSharesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
