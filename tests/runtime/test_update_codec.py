"""The update codec (int8 deltas, top-k with error feedback) and the canonical signed header."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.update_codec import (
    ErrorFeedbackEncoder,
    UpdateCodecError,
    decode_delta,
    decode_update,
    encode_delta,
    encode_full,
    quantize_int8,
)
from runtime.update_signing import UpdateHeader, signed_bytes


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"bn1.weight": rng.normal(1, 0.1, 16).astype(np.float32), "conv.w": rng.normal(0, 1, (8, 3, 3)).astype(
        np.float32), "zero": np.zeros(4, np.float32)}


def test_int8_delta_round_trip_error_is_at_most_half_a_step() -> None:
    delta = {k: v - 1.0 for k, v in _params().items()}
    payload = encode_delta(delta, "int8_delta")
    got = decode_delta(payload, "int8_delta", {k: v.shape for k, v in delta.items()})
    for name, value in delta.items():
        _, scale = quantize_int8(value)
        assert float(scale) == pytest.approx(float(np.abs(value).max()) / 127)
        assert np.abs(got[name] - value).max() <= float(scale) / 2 + 1e-7, name
    big = {"w": np.random.default_rng(1).normal(0, 1, 4096).astype(np.float32)}
    assert len(encode_delta(big, "int8_delta")) < big["w"].nbytes / 3.5  # a quarter plus a small header


def test_full_and_delta_updates_rebuild_parameters() -> None:
    base, target = _params(0), _params(1)
    shapes = {k: v.shape for k, v in base.items()}
    assert all(np.array_equal(decode_update(encode_full(target), "f32", None, shapes)[k], target[k]) for k in target)
    delta = {k: target[k] - base[k] for k in base}
    rebuilt = decode_update(encode_delta(delta, "int8_delta"), "int8_delta", base, shapes)
    assert max(float(np.abs(rebuilt[k] - target[k]).max()) for k in base) < 0.05
    with pytest.raises(UpdateCodecError, match="base"):
        decode_update(encode_delta(delta, "int8_delta"), "int8_delta", None, shapes)
    with pytest.raises(UpdateCodecError):
        decode_delta(encode_delta(delta, "int8_delta"), "int8_delta", {"conv.w": (9,)})


def test_topk_with_error_feedback_converges_to_the_full_update() -> None:
    """One real delta, then empty rounds: what was left out is carried and sent later, so the applied sum
    reaches the full delta and the residual shrinks to int8 rounding."""
    delta = {k: v - 1.0 for k, v in _params().items()}
    encoder = ErrorFeedbackEncoder("int8_topk_delta", topk_fraction=0.25)
    applied = {k: np.zeros_like(v) for k, v in delta.items()}
    residual_norms = []
    for step in range(8):
        out = encoder.encode(delta if step == 0 else {k: np.zeros_like(v) for k, v in delta.items()})
        for k in applied:
            applied[k] += out.decoded[k]
            # the invariant of error feedback: applied + residual == everything sent so far
            np.testing.assert_allclose(applied[k] + encoder.residual[k], delta[k], atol=1e-5)
        residual_norms.append(float(np.sqrt(sum(float((r**2).sum()) for r in encoder.residual.values()))))
    assert residual_norms[0] > 1.0 and residual_norms[3] < 0.05 * residual_norms[0]
    for k in delta:  # after 4+ rounds every entry was sent: error bounded by the last rounds' int8 steps
        assert np.abs(applied[k] - delta[k]).max() < 0.02, k
    big = {"w": np.random.default_rng(1).normal(0, 1, 4096).astype(np.float32)}
    assert len(encode_delta(big, "int8_topk_delta", 0.1)) < 0.4 * len(encode_delta(big, "int8_delta"))


def test_signed_bytes_are_canonical_and_cover_every_field() -> None:
    h = UpdateHeader("b" * 64, "default", 3, 2, "distill", 1, 1000, "int8_delta", "p" * 64, "s" * 64, "t" * 64)
    assert signed_bytes(h) == signed_bytes(UpdateHeader(**h.__dict__))
    changed = {signed_bytes(UpdateHeader(**{**h.__dict__, name: value}))
               for name, value in (("version", 4), ("cohort", "lab"), ("base_version", 1), ("encoding", "f32"),
                                   ("payload_sha256", "q" * 64), ("bundle_id", "c" * 64))}
    assert len(changed) == 6 and signed_bytes(h) not in changed


def test_delta_payload_is_compact_for_small_parameter_sets() -> None:
    """BN-sized tensors: the int8 delta is about a quarter of the float32 payload, names included."""
    rng = np.random.default_rng(0)
    params = {f"bn{i}.{k}": rng.normal(size=c).astype(np.float32)
              for i, c in enumerate((16, 32, 64), 1) for k in ("weight", "bias")}
    full = encode_full(params)
    dense = encode_delta(params, "int8_delta")
    sparse = encode_delta(params, "int8_topk_delta", 0.1)
    values = sum(v.size for v in params.values())
    assert len(dense) <= values + len(params) * 20 + 6 and len(dense) < 0.35 * len(full)
    assert len(sparse) < len(dense)


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda b: b"XXXX" + b[4:], "expected b'ELD1'"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"\x00", "unexpected bytes"),
])
def test_corrupt_delta_payload_is_named(corrupt: object, message: str) -> None:
    delta = {"w": np.linspace(-1, 1, 12, dtype=np.float32)}
    payload = corrupt(encode_delta(delta, "int8_delta"))  # type: ignore[operator]
    with pytest.raises(UpdateCodecError, match=message):
        decode_delta(payload, "int8_delta", {"w": (12,)})
