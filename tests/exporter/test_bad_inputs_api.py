"""Bad input to the exporter's Python API gets a clear error naming the problem (not a numpy/torch traceback,
not a silently broken result)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from exporter.adaptable import functional_forward
from exporter.bundle import export_bundle
from exporter.bundle_models import BuildOptions
from exporter.compress import FineTuneConfig, LowRankConfig, NMPatternError, NMSparsity, NMSparsityConfig, fine_tune
from exporter.foreign import ForeignInputSpec
from exporter.models import ModelSpec
from exporter.onnx_export import export_adaptable_onnx, params_numpy
from exporter.onnx_graph import LeanOptions
from exporter.quantize import CalibrationReader, Int8Config, quantize_int8
from exporter.train import TrainConfig, predict_logits, train_model

SPEC = ModelSpec(1, 4, 8, (0.5,), (0.25,))
LABELS = ["a", "b", "c", "d"]


class TinyNet(nn.Module):
    """conv (fan-in 8·1·1 for the second one, so 2:4 applies) – BN – ReLU – pool – linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _data(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 4, n)


def _export(model: nn.Module, out: Path, **kwargs: Any) -> Path:
    x, y = _data()
    args: dict[str, Any] = {"labels": LABELS, "calibration_x": x, "golden_x": x[:2], "source_x": x,
                            "source_y": y, "int8": False}
    args.update(kwargs)
    return export_bundle((model.eval(), "tiny", SPEC, "0" * 64), out, **args)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = TinyNet()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'classifier\.weight' holds NaN"):
        _export(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_nm_without_a_sparsity_report_still_needs_sparse_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(NMPatternError, match="only 0 weights satisfy 2:4"):
        _export(TinyNet(), tmp_path / "b", nm=(2, 4))


def test_bad_tflite_int8_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="tflite_int8 must be one of"):
        BuildOptions(tflite_int8="nope")


def test_eval_x_of_another_sample_shape_is_named(tmp_path: Path) -> None:
    x, _ = _data()
    model = TinyNet().eval()
    export_adaptable_onnx(model, tmp_path / "f.onnx", torch.from_numpy(x[:2]), parity_x=x[:2])
    with pytest.raises(ValueError, match=r"eval_x has sample shape \(1, 4, 8\)"):
        quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", x, params_numpy(model), eval_x=x[:, :, :4])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_samples": 2.5}, r"max_samples must be >= 1 \(an integer\), got 2.5"),
    ({"batch_size": "8"}, r"batch_size must be >= 1 \(an integer\), got '8'"),
    ({"float_convs_below_channels": "3"}, r"float_convs_below_channels must be >= 0 \(an integer\), got '3'"),
    ({"min_agreement": "0.5"}, "min_agreement"),
    ({"op_types": "Conv"}, "not the string 'Conv'"),
])
def test_int8_config_types_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Int8Config(**kwargs)


def test_a_single_sample_cannot_train_or_fine_tune() -> None:
    x, y = _data(1)
    with pytest.raises(ValueError, match="train_x needs at least 2 samples"):
        train_model("small_cnn", x, y, TrainConfig(epochs=1, threads=1))
    model = TinyNet()
    sparsity = NMSparsity(NMSparsityConfig(exclude=("features.0",)))
    sparsity.prepare(model)
    with pytest.raises(ValueError, match="fine-tune x needs at least 2 samples"):
        fine_tune(model, sparsity, x, y, FineTuneConfig(epochs=1, threads=1))


def test_augment_fn_returning_nan_is_refused() -> None:
    x, y = _data()
    config = TrainConfig(epochs=2, threads=1, augment=True, seed=1)
    with pytest.raises(ValueError, match="augment_fn returned NaN"):
        train_model("small_cnn", x, y, config, augment_fn=lambda b, rng: b * np.nan)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: TrainConfig(lr="1"), "lr must be positive"),
    (lambda: TrainConfig(weight_decay=None), "weight_decay must be"),
    (lambda: LowRankConfig.from_string("energy=1e"), "low-rank spec must look like"),
    (lambda: NMSparsityConfig(exclude=None), "exclude must be a sequence"),
    (lambda: LowRankConfig(exclude=3), "exclude must be a sequence"),
])
def test_config_type_errors_name_the_option(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if an export gets as far as building model files (checks must come before any work)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("export_bundle started building model files before refusing its input")

    monkeypatch.setattr("exporter.bundle.build_models", refuse)


@pytest.mark.parametrize(("take", "labels", "match"), [
    (1, lambda y: y[:1], r"source_x has 1 sample in 1 class\(es\) of source_y; .* need at least 2"),
    (1, lambda y: None, r"source_x has 1 sample; the source statistics need at least 2"),
    (4, lambda y: np.arange(4), r"4 samples in 4 class\(es\) of source_y; .* at least 5.*covariance is zero"),
    (2, lambda y: np.array([3, 1]), r"source_x has 2 samples in 2 class\(es\) of source_y; .* need at least 3"),
    (16, lambda y: y[:3], r"source_y must have shape \(16,\) \(one label per sample\), got \(3,\)"),
    (16, lambda y: y + 4, r"source_y must lie in \[0, 4\), got range \[4, 7\]"),
    (16, lambda y: y.astype(float), r"source_y must be integers, got dtype float64"),
    (16, lambda y: y > 1, r"source_y must be integers, got dtype bool"),
], ids=["one", "one-unlabelled", "one-per-class", "one-per-class-of-2", "short", "range", "float", "bool"])
def test_degenerate_source_statistics_are_refused_before_any_work(
    take: int, labels: Any, match: str, tmp_path: Path, no_build: None
) -> None:
    """A one-sample source_x used to export a zero covariance and zero feature variances (the device's
    Mahalanobis detector refused the bundle later); one sample per class gives a zero shared covariance."""
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        _export(TinyNet(), tmp_path / "b", source_x=x[:take], source_y=labels(y))
    assert list(tmp_path.iterdir()) == []


def test_identical_source_samples_are_refused(tmp_path: Path, no_build: None) -> None:
    x, _ = _data()
    same = np.repeat(x[:1], 4, axis=0)
    with pytest.raises(ValueError, match=r"source_x's 4 samples are all identical"):
        _export(TinyNet(), tmp_path / "b", source_x=same, source_y=None)
    two = np.concatenate([same[:2], x[1:3]])  # class 0: the same image twice, class 1: one image each
    with pytest.raises(ValueError, match=r"no class of source_y has 2 different samples in source_x"):
        _export(TinyNet(), tmp_path / "b", source_x=two, source_y=np.array([0, 0, 1, 2]))


def test_features_that_do_not_vary_are_refused(tmp_path: Path) -> None:
    """Different images, but the model maps them all to the same features: caught once they are computed."""
    model = TinyNet()
    with torch.no_grad():
        model.features[3].weight.zero_()
        model.features[3].bias.zero_()
    with pytest.raises(ValueError, match=r"features on the 16 samples of source_x do not vary"):
        _export(model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_few_samples_per_class_still_export_an_invertible_covariance(tmp_path: Path) -> None:
    """What the shared covariance handles is kept: a class with one sample and a class with none."""
    from runtime.manifest import read_manifest

    x, _ = _data()
    out = _export(TinyNet(), tmp_path / "b", source_x=x[:5], source_y=np.array([0, 0, 1, 3, 3]))
    gaussians = read_manifest(out)[0].class_gaussians(out)
    assert gaussians is not None
    means, cov, counts = gaussians
    assert counts.tolist() == [2, 1, 0, 2] and not means[2].any()
    assert np.linalg.eigvalsh(cov.astype(np.float64)).min() > 0  # what the device's Cholesky needs

    # on the device, the class without samples has no mean to score against and no T3A prototype
    from device_agents.drift import MahalanobisDrift
    from device_agents.drift.mahalanobis import MahalanobisScorer
    from device_agents.tta import T3A
    from runtime import load_bundle
    from runtime.predictor import Predictor

    loaded = load_bundle(out)
    scorer = MahalanobisDrift.from_bundle(loaded).scorer
    rows = np.random.default_rng(0).normal(size=(8, means.shape[1])).astype(np.float32)
    rows[0] = 0.0  # the placeholder mean of class 2: not a class centre
    np.testing.assert_allclose(scorer(rows), MahalanobisScorer(means[[0, 1, 3]], cov, scorer.shrinkage)(rows))
    state = T3A()._initial_state(Predictor(loaded), 4, means.shape[1])
    assert np.isinf(state["support_entropy"][2]).all() and not state["supports"][2].any()
    assert (state["support_entropy"][[0, 1, 3], 0] == 0).all()
    np.testing.assert_array_equal(state["supports"][[0, 1, 3], 0], means[[0, 1, 3]])


Factory = Any  # (value, tmp_path) -> object: builds the config or calls the function with the value under test
INTEGER_FIELDS: list[tuple[str, Factory, str]] = [
    ("TrainConfig.epochs", lambda v, _: TrainConfig(epochs=v), r"epochs must be >= 1 \(an integer\)"),
    ("TrainConfig.batch_size", lambda v, _: TrainConfig(batch_size=v), r"batch_size must be >= 2 \(an integer\)"),
    ("TrainConfig.seed", lambda v, _: TrainConfig(seed=v), r"seed must be >= 0 \(an integer\)"),
    ("TrainConfig.threads", lambda v, _: TrainConfig(threads=v), r"threads must be >= 1 \(an integer\) or None"),
    ("FineTuneConfig.epochs", lambda v, _: FineTuneConfig(epochs=v), r"epochs must be >= 1 \(an integer\)"),
    ("FineTuneConfig.batch_size", lambda v, _: FineTuneConfig(batch_size=v), r"batch_size must be >= 2"),
    ("FineTuneConfig.seed", lambda v, _: FineTuneConfig(seed=v), r"seed must be >= 0 \(an integer\)"),
    ("FineTuneConfig.threads", lambda v, _: FineTuneConfig(threads=v), r"threads must be >= 1 \(an integer\) or None"),
    ("NMSparsityConfig.n", lambda v, _: NMSparsityConfig(n=v, m=4), r"N:M needs integers"),
    ("NMSparsityConfig.m", lambda v, _: NMSparsityConfig(n=1, m=v), r"N:M needs integers"),
    ("NMSparsityConfig.mask_update_every", lambda v, _: NMSparsityConfig(mask_update_every=v),
     r"mask_update_every must be >= 1 \(an integer\)"),
    ("LowRankConfig.rank_multiple", lambda v, _: LowRankConfig(rank_multiple=v), r"rank_multiple must be >= 1"),
    ("Int8Config.max_samples", lambda v, _: Int8Config(max_samples=v), r"max_samples must be >= 1 \(an integer\)"),
    ("Int8Config.batch_size", lambda v, _: Int8Config(batch_size=v), r"batch_size must be >= 1 \(an integer\)"),
    ("Int8Config.float_convs_below_channels", lambda v, _: Int8Config(float_convs_below_channels=v),
     r"float_convs_below_channels must be >= 0 \(an integer\)"),
    ("LeanOptions.stats_samples", lambda v, _: LeanOptions(stats_samples=v), r"stats_samples must be >= 1"),
    ("ModelSpec.in_channels", lambda v, _: ModelSpec(v, 4, 8, (0.5,), (0.25,)), r"ModelSpec.in_channels must be"),
    ("ModelSpec.num_classes", lambda v, _: ModelSpec(1, v, 8, (0.5,), (0.25,)), r"ModelSpec.num_classes must be"),
    ("ModelSpec.image_size", lambda v, _: ModelSpec(1, 4, v, (0.5,), (0.25,)), r"ModelSpec.image_size must be"),
    ("ForeignInputSpec.shape", lambda v, _: ForeignInputSpec("x", (-1, v, 8, 8)), r"input shape dim 1 must be"),
    ("predict_logits(batch_size)", lambda v, _: predict_logits(TinyNet(), _data()[0], v), r"batch_size must be >= 1"),
    ("CalibrationReader(batch_size)", lambda v, _: CalibrationReader(_data()[0], {}, v), r"batch_size must be >= 1"),
    ("functional_forward(stats_samples)",
     lambda v, _: functional_forward(TinyNet(), torch.zeros(2, 1, 8, 8), {}, 0.0, stats_samples=v),
     r"stats_samples must be >= 1"),
    ("export_bundle(nm)", lambda v, tmp: _export(TinyNet(), tmp / "b", nm=(2, v)), r"N:M needs integers"),
]


@pytest.mark.parametrize("value", [True, 2.5, float("nan")], ids=["True", "2.5", "nan"])
@pytest.mark.parametrize(("factory", "match"), [case[1:] for case in INTEGER_FIELDS],
                         ids=[case[0] for case in INTEGER_FIELDS])
def test_integer_options_refuse_bools_and_floats_by_name(
    factory: Factory, match: str, value: object, tmp_path: Path, no_build: None
) -> None:
    """``True`` is an int to Python and ``2.5 >= 1``: every count of the exporter's API used to take them
    somewhere (a one-epoch run, a float batch size failing in ``range``, a shape silently truncated)."""
    with pytest.raises(ValueError, match=match):
        factory(value, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_numpy_integers_are_accepted_as_ints() -> None:
    config = TrainConfig(epochs=np.int64(2), threads=np.int32(1))
    assert (config.epochs, config.threads) == (2, 1) and type(config.epochs) is int and type(config.threads) is int
    assert type(ModelSpec(np.int64(1), 4, 8, (0.5,), (0.25,)).in_channels) is int
    assert ForeignInputSpec("x", np.array([-1, 1, 8, 8])).shape == (-1, 1, 8, 8)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda tmp: TrainConfig(lr=True), "lr must be positive"),
    (lambda tmp: TrainConfig(weight_decay=True), "weight_decay must be"),
    (lambda tmp: FineTuneConfig(lr=True), "lr must be positive"),
    (lambda tmp: FineTuneConfig(weight_decay=True), "weight_decay must be"),
    (lambda tmp: NMSparsityConfig(initial_flow=True), r"initial_flow must lie in \[0, 1\], got True"),
    (lambda tmp: NMSparsityConfig(freeze_at=True), r"freeze_at must lie in \[0, 1\], got True"),
    (lambda tmp: NMSparsityConfig(srste_lambda=True), "srste_lambda must be"),
    (lambda tmp: _export(TinyNet(), tmp / "b", golden_alpha=True), r"golden_alpha must lie in \[0, 1\], got True"),
], ids=["lr", "weight_decay", "ft-lr", "ft-weight_decay", "initial_flow", "freeze_at", "srste_lambda", "golden_alpha"])
def test_real_options_refuse_bools(factory: Any, match: str, tmp_path: Path, no_build: None) -> None:
    with pytest.raises(ValueError, match=match):
        factory(tmp_path)


def test_labels_given_as_one_string_are_refused(tmp_path: Path) -> None:
    """``labels="abcd"`` has the right length for 4 classes, but one-character labels are never what is meant."""
    with pytest.raises(ValueError, match=r"labels must be a list of 4 strings, got the single string 'abcd'"):
        _export(TinyNet(), tmp_path / "b", labels="abcd")
    assert not (tmp_path / "b").exists()
