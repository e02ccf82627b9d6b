"""Codec additions for full-model updates: zero tensors, varint-gap indices, dense small tensors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.update_codec import (
    ErrorFeedbackEncoder,
    UpdateCodecError,
    decode_delta,
    decode_varints,
    encode_delta,
    encode_varints,
)

SHAPES = {"fc.weight": (64, 1568), "conv.weight": (16, 1, 3, 3), "bias": (10,)}


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


@given(st.lists(st.integers(min_value=0, max_value=2**35), max_size=50))
@settings(max_examples=60, deadline=None)
def test_varints_round_trip(values: list[int]) -> None:
    data = encode_varints(np.array(values, dtype=np.uint64))
    assert decode_varints(data, len(values), "x").tolist() == values


def test_varints_reject_wrong_counts_and_truncation() -> None:
    data = encode_varints(np.array([1, 300, 5], dtype=np.uint64))
    with pytest.raises(UpdateCodecError, match="exactly 2"):
        decode_varints(data, 2, "x")
    with pytest.raises(UpdateCodecError, match="exactly 3"):
        decode_varints(data[:-1], 3, "x")


def test_zero_tensors_are_header_only_and_decode_as_zeros() -> None:
    delta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for enc in ("int8_delta", "int8_topk_delta"):
        payload = encode_delta(delta, enc, 0.05)
        assert len(payload) < 6 + 3 * (1 + 12 + 9)
        out = decode_delta(payload, enc, SHAPES)
        assert all(np.array_equal(out[k], delta[k]) for k in SHAPES)


def test_topk_uses_varint_gaps_and_matches_fixed_width_values() -> None:
    delta = _delta()
    payload = encode_delta(delta, "int8_topk_delta", 0.05)
    kept = int(np.ceil(0.05 * 64 * 1568))
    assert len(payload) < 2.2 * kept  # ~1 byte per index + 1 per value, not 5 (uint32 indices)
    out = decode_delta(payload, "int8_topk_delta", SHAPES)
    flat = np.abs(delta["fc.weight"]).reshape(-1)
    top = np.sort(np.argpartition(flat, flat.size - kept)[flat.size - kept:])
    assert np.array_equal(np.flatnonzero(out["fc.weight"].reshape(-1)), top)


def test_dense_below_sends_small_tensors_whole() -> None:
    delta = _delta(1)
    payload = encode_delta(delta, "int8_topk_delta", 0.05, dense_below=200)
    out = decode_delta(payload, "int8_topk_delta", SHAPES)
    for k in ("conv.weight", "bias"):  # every entry within int8 rounding, not only the top 5 %
        assert np.abs(out[k] - delta[k]).max() <= np.abs(delta[k]).max() / 254 + 1e-6
    assert np.count_nonzero(out["fc.weight"]) == int(np.ceil(0.05 * 64 * 1568))
    with pytest.raises(UpdateCodecError, match="dense_below"):
        encode_delta(delta, "int8_topk_delta", 0.05, dense_below=-1)


def test_corrupt_sparse_payloads_are_refused() -> None:
    payload = encode_delta(_delta(2), "int8_topk_delta", 0.05, dense_below=200)
    for cut in (5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(UpdateCodecError):
            decode_delta(payload[:cut], "int8_topk_delta", SHAPES)
    with pytest.raises(UpdateCodecError, match="unexpected bytes"):
        decode_delta(payload + b"\0", "int8_topk_delta", SHAPES)
    # a dense tensor declared with the wrong count
    name = b"bias"
    head = struct.pack("<H", 1) + struct.pack("<B", len(name)) + name + struct.pack("<IfB", 3, 0.1, 4)
    bad = b"ELD1" + head + b"\1\2\3"
    with pytest.raises(UpdateCodecError, match="3 values"):
        decode_delta(bad, "int8_topk_delta", SHAPES)
    with pytest.raises(UpdateCodecError, match="NaN"):
        encode_delta({"bias": np.full(10, np.nan, np.float32)}, "int8_delta")


def test_error_feedback_with_dense_small_tensors_tracks_the_sum() -> None:
    enc = ErrorFeedbackEncoder("int8_topk_delta", 0.05, dense_below=200)
    total, sent = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, {k: np.zeros(s, np.float32)
                                                                          for k, s in SHAPES.items()}
    for seed in range(30):
        d = {k: v * 0.01 for k, v in _delta(seed).items()}
        out = enc.encode(d)
        for k in SHAPES:
            total[k] += d[k]
            sent[k] += out.decoded[k]
    for k in SHAPES:  # what is sent plus what is still owed is exactly what happened
        assert np.allclose(sent[k] + enc.residual[k], total[k], atol=1e-4)
