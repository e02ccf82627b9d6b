"""numpy ⇄ protobuf ``Tensor`` conversion with validation; used by servicers and the device transport."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from proto.edgeloop.v1 import common_pb2

_TO_PROTO: dict[np.dtype, int] = {
    np.dtype(np.float32): common_pb2.DTYPE_FLOAT32,
    np.dtype(np.float16): common_pb2.DTYPE_FLOAT16,
    np.dtype(np.int8): common_pb2.DTYPE_INT8,
    np.dtype(np.uint8): common_pb2.DTYPE_UINT8,
    np.dtype(np.int32): common_pb2.DTYPE_INT32,
    np.dtype(np.int64): common_pb2.DTYPE_INT64,
}
_FROM_PROTO: dict[int, np.dtype] = {v: k for k, v in _TO_PROTO.items()}


class TensorDecodeError(ValueError):
    """A ``Tensor`` message is malformed: unknown dtype, bad shape, size mismatch or non-finite values."""


def tensor_to_proto(name: str, array: np.ndarray) -> common_pb2.Tensor:
    """Encode ``array`` as a little-endian C-order ``Tensor`` named ``name``."""
    arr = np.ascontiguousarray(array)
    dtype = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in "=|" else arr.dtype
    if np.dtype(dtype) not in _TO_PROTO:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not supported on the wire")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return common_pb2.Tensor(
        name=name, dtype=_TO_PROTO[np.dtype(dtype)], shape=list(arr.shape), data=arr.tobytes()
    )


def tensor_from_proto(
    msg: common_pb2.Tensor, *, max_elements: int = 1 << 24, require_finite: bool = True
) -> np.ndarray:
    """Decode a ``Tensor`` into a new numpy array, validating dtype, shape, byte size and finiteness."""
    if msg.dtype not in _FROM_PROTO:
        raise TensorDecodeError(f"tensor {msg.name!r}: unknown dtype code {msg.dtype}")
    dtype = _FROM_PROTO[msg.dtype]
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"tensor {msg.name!r}: negative dimension in shape {shape}")
    count = 1
    for d in shape:  # exact Python ints, stopping past the limit: an int64 product of huge dims would wrap
        count *= d
        if count > max_elements:
            shown = f"{list(shape[:8])}{'…' if len(shape) > 8 else ''}"
            raise TensorDecodeError(f"tensor {msg.name[:64]!r}: shape {shown} holds more than the limit of "
                                    f"{max_elements} elements")
    expected = count * dtype.itemsize
    if len(msg.data) != expected:
        raise TensorDecodeError(
            f"tensor {msg.name!r}: {len(msg.data)} bytes for shape {shape} of {dtype} (expected {expected})"
        )
    arr = np.frombuffer(msg.data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    if require_finite and dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise TensorDecodeError(f"tensor {msg.name!r}: contains NaN or infinite values")
    return arr


def tensors_to_proto(arrays: Mapping[str, np.ndarray]) -> list[common_pb2.Tensor]:
    """Encode a name → array mapping, in sorted name order."""
    return [tensor_to_proto(name, arrays[name]) for name in sorted(arrays)]


def tensors_from_proto(msgs: Iterable[common_pb2.Tensor], **kwargs: object) -> dict[str, np.ndarray]:
    """Decode repeated ``Tensor`` messages into a dict; duplicate or empty names are rejected."""
    out: dict[str, np.ndarray] = {}
    for msg in msgs:
        if not msg.name:
            raise TensorDecodeError("tensor with an empty name")
        if msg.name in out:
            raise TensorDecodeError(f"tensor {msg.name!r} appears twice")
        out[msg.name] = tensor_from_proto(msg, **kwargs)  # type: ignore[arg-type]
    return out
