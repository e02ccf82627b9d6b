"""FOA's prior correction (on a stream the class-balance detector finds balanced the logits are shifted by
-τ · log p̄, centred, p̄ the running mean of the predicted class probabilities; elsewhere nothing changes), its
mirrored view (opt-in, or declared by the model), and the CMA-ES mean it exports."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pytest

from device_agents.tta import FOA, FOAConfig
from device_agents.tta.cma_search import CMASearch
from device_agents.tta.foa import MIRROR_CHUNK, PRIOR_KEY
from runtime.model import ForwardResult, softmax
from tests.device_agents.test_tta import TinyModel

SCORE_KEY = "stats.balance.score"


def _iid_batches(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches drawn i.i.d. from one distribution (what the detector calls balanced)."""
    rng = np.random.default_rng(seed)
    return [(rng.random((size, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32) for _ in range(n)]


def _run_pair(batches: list[np.ndarray], **config: float) -> tuple[FOA, list[np.ndarray], list[np.ndarray], list[bool]]:
    """Raw logits (τ = 0), corrected logits (τ from ``config``) and the detector's verdict per batch, the two
    methods fed the same batches on separate models."""
    raw_method, method = FOA(FOAConfig(prior_correction=0.0)), FOA(FOAConfig(**config))
    raw_model, model = TinyModel(), TinyModel()
    threshold = math.log(method.config.imbalance_threshold)
    raw, corrected, verdicts = [], [], []
    for x in batches:
        raw.append(np.array(raw_method.predict(raw_model, x).logits))
        corrected.append(np.array(method.predict(model, x).logits))
        raw_method.snapshot()  # a snapshot rebuilds the CMA-ES strategy: take one on both to stay in step
        verdicts.append(float(method.snapshot()[SCORE_KEY]) < threshold)
    return method, raw, corrected, verdicts


@pytest.mark.parametrize("size", [64, 16])
def test_balanced_stream_logits_are_shifted_by_the_running_log_prior(size: int) -> None:
    tau, m = 0.8, 0.99
    batches = _iid_batches(24 * 64 // size, size)
    method, raw, corrected, verdicts = _run_pair(batches, prior_correction=tau, prior_momentum=m)
    assert any(verdicts), "an i.i.d. stream should be found balanced within 1536 samples"
    prior = None
    for logits, out, balanced in zip(raw, corrected, verdicts, strict=True):
        if not balanced:
            np.testing.assert_array_equal(out, logits)
            continue
        batch = softmax(logits.astype(np.float64)).mean(axis=0)
        keep = m ** len(logits)
        prior = batch if prior is None else keep * prior + (1.0 - keep) * batch
        log_prior = np.log(prior)
        np.testing.assert_allclose(out, logits - tau * (log_prior - log_prior.mean()), rtol=1e-5, atol=1e-5)
    assert prior is not None
    np.testing.assert_allclose(method.snapshot()[PRIOR_KEY], prior, rtol=1e-9)


def test_class_runs_leave_logits_and_prior_untouched() -> None:
    """Batches that each hold near-copies of one image (a class run) never pass the detector."""
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(10):
        base = rng.random((1, 1, 8, 8)) * 0.5 + 0.4
        batches.append((base + rng.normal(0.0, 0.01, (64, 1, 8, 8))).astype(np.float32))
    method, raw, corrected, verdicts = _run_pair(batches, prior_correction=1.0)
    assert not any(verdicts)
    for logits, out in zip(raw, corrected, strict=True):
        np.testing.assert_array_equal(out, logits)
    assert PRIOR_KEY not in method.snapshot()


def test_probabilities_follow_the_corrected_logits_and_the_prior_survives_snapshot_restore() -> None:
    batches = _iid_batches(24, 64, seed=5)
    method, model = FOA(), TinyModel()
    for x in batches[:22]:
        method.predict(model, x)
    saved = method.snapshot()
    assert PRIOR_KEY in saved and saved[PRIOR_KEY].shape == (model.num_classes,)
    assert np.isclose(saved[PRIOR_KEY].sum(), 1.0)
    first = [method.predict(model, x) for x in batches[22:]]
    method.restore(saved)
    again = [method.predict(model, x) for x in batches[22:]]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_allclose(a.probs, softmax(a.logits), rtol=1e-6)


@pytest.mark.parametrize(("field", "value"), [
    ("prior_correction", -0.1), ("prior_correction", 1.5), ("prior_correction", float("nan")),
    ("prior_momentum", 0.0), ("prior_momentum", 1.0), ("prior_momentum", float("inf")),
    ("flip_weight", 0.0), ("flip_weight", 1.0), ("flip_view", 1), ("population", 1), ("population", 3.0),
    ("population", True),
])
def test_bad_prior_settings_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        FOAConfig(**{field: value})


def test_cma_mean_is_the_phenotype_and_survives_export_after_cma_moves_conditioning_into_its_transform() -> None:
    """``cma`` hands an ill-conditioned covariance over to its genotype-phenotype transform
    (``alleviate_conditioning``), after which ``es.mean`` (the genotype) is no longer the point it samples
    around; :meth:`CMASearch.mean` and the exported state are that point, and a rebuilt strategy keeps it."""
    search = CMASearch(population=4, sigma0=0.1, seed=0)
    es = search.strategy({}, 2)
    for _ in range(60):
        candidates = es.ask()
        es.tell(candidates, [float(100.0 * (z[0] - 0.3) ** 2 + (z[1] + 0.2) ** 2) for z in candidates])
    es.alleviate_conditioning(1.5)  # what cma does by itself beyond a condition number of 1e12
    assert not np.allclose(es.mean, search.mean())  # the genotype moved into the transform's coordinates
    np.testing.assert_allclose(search.mean(), es.result.xfavorite, rtol=1e-12)
    assert np.abs(search.mean() - [0.3, -0.2]).max() < 0.3
    exported = search.export()
    np.testing.assert_array_equal(exported["cma.mean"], search.mean())
    search.invalidate()
    rebuilt = search.strategy(exported, 2)
    np.testing.assert_allclose(search.mean(), exported["cma.mean"], rtol=1e-12)
    spread = float(rebuilt.sigma) * float(np.max(exported["cma.stds"]))
    assert all(np.abs(z - exported["cma.mean"]).max() < 10.0 * spread for z in rebuilt.ask())


class _Recording(TinyModel):
    """Keeps every pass's input, α and parameter feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[np.ndarray, float, dict[str, np.ndarray]]] = []

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
                ) -> ForwardResult:
        self.passes.append((np.array(x), alpha, {k: np.array(v) for k, v in (params or {}).items()}))
        return super().forward(x, alpha, params)


def test_flip_view_averages_in_the_mirrored_batch_normalised_like_the_batch_in_chunks() -> None:
    x = _iid_batches(1, 40, seed=7)[0]
    plain_model, flip_model = _Recording(), _Recording()
    plain = FOA(FOAConfig(prior_correction=0.0)).predict(plain_model, x)
    method = FOA(FOAConfig(prior_correction=0.0, flip_view=True, flip_weight=0.25, population=4))
    out = method.predict(flip_model, x)
    assert method.config.passes_per_batch() == 5 and FOAConfig().passes_per_batch() == 4
    assert len(plain_model.passes) == 4  # the same four candidates, then the mirrored view in chunks
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(flip_model.passes[:4], plain_model.passes, strict=True))
    chunks = flip_model.passes[4:]
    sizes = [min(MIRROR_CHUNK, 40 - start) for start in range(0, 40, MIRROR_CHUNK)]
    assert [len(c[0]) for c in chunks] == sizes and len(sizes) > 1
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), x[..., ::-1])
    assert all(alpha == 0.0 for _, alpha, _ in chunks)  # the batch's statistics are fed, none are computed
    params = chunks[0][2]
    assert all(np.array_equal(c[2][k], params[k]) for c in chunks for k in params)
    np.testing.assert_allclose(params["bn1.weight"], np.exp(method.snapshot()["cma.mean"][0]), rtol=1e-6)
    # the statistics the batch itself was normalised with: its own mixed by α with the fed (or current) ones
    _, alpha, fed = flip_model.passes[0]
    own = TinyModel().forward(x, alpha=alpha, params=fed).batch_stats
    current = TinyModel().params
    for layer, (mean, var) in own.items():
        for key, value in ((f"{layer}.mean", mean), (f"{layer}.var", var)):
            expected_stat = (1.0 - alpha) * fed.get(key, current[key]) + alpha * value
            np.testing.assert_allclose(params[key], expected_stat, rtol=1e-5, atol=1e-6)
    flipped = TinyModel().forward(x[..., ::-1], alpha=0.0, params=params)
    expected = 0.75 * softmax(plain.logits) + 0.25 * softmax(flipped.logits)
    np.testing.assert_allclose(out.probs, expected, rtol=1e-5, atol=1e-6)


class _Declaring(_Recording):
    """A recording model whose manifest declares input invariances (as an exported bundle's does)."""

    def __init__(self, invariances: tuple[str, ...], layout: str = "NCHW") -> None:
        super().__init__()
        self.manifest.input = SimpleNamespace(layout=layout, invariances=invariances)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("invariances", "flip_view", "mirrored"), [
    (("hflip",), None, True), ((), None, False), (("hflip",), False, False), ((), True, True),
])
def test_the_mirrored_view_follows_the_declared_invariance_at_four_passes(
    invariances: tuple[str, ...], flip_view: bool | None, mirrored: bool
) -> None:
    """By default the mirrored view is on exactly for a model declaring ``hflip``; the default population
    shrinks to 3 then, so a batch costs 4 passes either way; an explicit ``flip_view`` wins."""
    x = _iid_batches(1, 32, seed=3)[0]
    model = _Declaring(invariances)
    method = FOA(FOAConfig(prior_correction=0.0, flip_view=flip_view))
    method.predict(model, x)
    assert sum(len(p[0]) for p in model.passes) == 4 * len(x) and method.passes_per_batch(model) == 4
    flipped = [len(p[0]) < len(x) for p in model.passes]
    assert flipped == ([False] * 3 + [True] * (len(x) // MIRROR_CHUNK) if mirrored else [False] * 4)
    method.predict(model, x)  # the strategy carries on at the resolved population
    assert sum(len(p[0]) for p in model.passes) == 8 * len(x)


def test_the_mirrored_view_of_an_nhwc_input_flips_the_width_axis() -> None:
    x = _iid_batches(1, 32, seed=4)[0]
    model = _Declaring(("hflip",), layout="NHWC")
    FOA(FOAConfig(prior_correction=0.0)).predict(model, x)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in model.passes[3:]]), x[:, :, ::-1, :])
