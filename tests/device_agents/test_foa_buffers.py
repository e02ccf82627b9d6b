"""FOA keeps copies of the fittest pass, never the pass's own output buffers; its fitness targets are computed
once per model and give the documented distance."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from device_agents.tta import FOA, FOAConfig
from device_agents.tta.foa import _Target
from runtime.model import ForwardResult
from tests.device_agents.test_tta import TinyModel


def _batch(seed: int, size: int = 32) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32)


class ReusingModel(TinyModel):
    """Returns every pass's outputs in the same arrays, overwritten by the next pass — as onnxruntime's outputs
    live in its arena, which later passes reuse."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: dict[str, np.ndarray] = {}
        self.passes: list[np.ndarray] = []  # copies of each pass's logits, in call order

    def _into(self, key: str, value: np.ndarray) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != value.shape:
            buf = self._buffers[key] = np.empty_like(value)
        buf[...] = value
        return buf

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
                ) -> ForwardResult:
        r = super().forward(x, alpha, params)
        self.passes.append(np.array(r.logits))
        stats = {k: (self._into(f"{k}.m", m), self._into(f"{k}.v", v)) for k, (m, v) in r.batch_stats.items()}
        return ForwardResult(self._into("logits", r.logits), self._into("features", r.features), stats)


class _RecordingFOA(FOA):
    def __init__(self, config: FOAConfig) -> None:
        super().__init__(config)
        self.fitness: list[float] = []

    def _fitness(self, result: ForwardResult, plan: object) -> float:
        value = super()._fitness(result, plan)  # type: ignore[arg-type]
        self.fitness.append(value)
        return value


def test_the_prediction_is_the_fittest_pass_even_when_later_passes_reuse_its_buffers() -> None:
    model = ReusingModel()
    method = _RecordingFOA(FOAConfig(population=6, generations=2))
    not_last = 0  # batches whose fittest pass was followed by others (that overwrote its buffers)
    for seed in range(4):
        model.passes.clear()
        method.fitness.clear()
        out = method.predict(model, _batch(seed))
        assert len(model.passes) == len(method.fitness) == 12
        fittest = int(np.argmin(method.fitness))
        not_last += fittest != len(method.fitness) - 1
        np.testing.assert_array_equal(out.logits, model.passes[fittest])
        assert out.logits.base is None and out.features.base is None  # owned, not the model's buffers
    assert not_last >= 1
    state = method.snapshot()
    assert all(np.isfinite(v).all() for k, v in state.items() if k.startswith("stats."))


def test_prediction_matches_a_model_with_fresh_outputs() -> None:
    """Reused output buffers change nothing: same predictions and state as with fresh arrays every pass."""
    reusing, fresh = ReusingModel(), TinyModel()
    a, b = FOA(FOAConfig(population=4)), FOA(FOAConfig(population=4))
    for seed in range(4):
        np.testing.assert_array_equal(a.predict(reusing, _batch(seed)).logits, b.predict(fresh, _batch(seed)).logits)
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_target_distance_is_the_floored_gap() -> None:
    rng = np.random.default_rng(3)
    src_mean, src_var = rng.normal(size=7), rng.uniform(0, 2, 7)
    src_var[2] = 0.0  # a dead channel: its floor is the variance floor alone
    mean, var = rng.normal(size=7).astype(np.float32), rng.uniform(0, 2, 7).astype(np.float32)
    target = _Target.of(src_mean, src_var, 0.01)
    floor = src_var + 0.01 * src_var.mean() + 1e-12
    want = np.mean(((mean - src_mean) ** 2 + (np.sqrt(var.astype(np.float64)) - np.sqrt(src_var)) ** 2) / floor)
    assert target.distance(mean, var) == pytest.approx(want, rel=1e-12)
    assert target.distance(src_mean, src_var) == 0.0
    assert target.distance(src_mean, -np.ones(7)) > 0.0  # negative variances (rounding) count as zero


def test_on_a_real_bundle_the_outputs_own_their_memory(bundle_dir: Path) -> None:
    """On onnxruntime (outputs in its arena), the prediction's arrays are FOA's own copies."""
    from runtime.bundle import load_bundle
    from runtime.model import AdaptableModel

    model = AdaptableModel(load_bundle(bundle_dir, threads=1))
    shape = (16, *model.manifest.input.shape[1:])
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    method = FOA()
    first = method.predict(model, x)
    logits = first.logits.copy()
    method.predict(model, x[::-1].copy())
    assert first.logits.base is None
    np.testing.assert_array_equal(first.logits, logits)  # untouched by the next batch's passes
