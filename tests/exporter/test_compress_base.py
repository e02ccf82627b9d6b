"""Compression-pass lifecycle, configs, registry, exclude globs, named errors and pipeline order."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from exporter.adaptable import norm_layers
from exporter.compress import (
    PASSES,
    CompressionError,
    FineTuneConfig,
    Int8AtExport,
    LowRank,
    LowRankConfig,
    NMSparsity,
    NMSparsityConfig,
    UnsupportedLayerError,
    compose,
    create_pass,
    register_pass,
)
from exporter.compress.base import is_excluded
from exporter.models import ModelSpec, build_model
from exporter.train import torch_threads

SPEC = ModelSpec(1, 10, 8, (0.3,), (0.4,))


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Single-threaded torch: on the shared 2-core CPUs this is far faster for these small models."""
    with torch_threads(1):
        yield


def test_exclude_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"exclude patterns \['feature.0'\] match no module"):
        NMSparsity(NMSparsityConfig(exclude=("feature.0",))).prepare(build_model("small_cnn", SPEC))


def test_exclude_matches_ancestors_and_globs() -> None:
    assert is_excluded("stem.0", ("stem",)) == "stem"
    assert is_excluded("stages.1.conv2", ("stages.*.conv2",)) == "stages.*.conv2"
    assert is_excluded("stages.1.conv2", ("stages.2",)) is None
    assert is_excluded("classifier", ("class",)) is None  # whole path components, not prefixes of names


def test_grouped_convolution_is_unsupported_for_low_rank() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 4, 5, 5))
    with pytest.raises(UnsupportedLayerError, match=r"low_rank: layer '0' \(Conv2d\).*groups=2.*exclude=\('0',\)"):
        LowRank().prepare(model)


def test_nm_indivisible_input_dimension_suggests_exclude() -> None:
    with pytest.raises(UnsupportedLayerError) as err:
        NMSparsity().prepare(build_model("small_cnn", SPEC))
    message = str(err.value)
    assert err.value.path == "features.0" and "C_in·kh·kw = 9 is not divisible by M=4" in message
    assert "exclude=('features.0',)" in message


@pytest.mark.parametrize(
    ("factory", "bad"),
    [
        (lambda: NMSparsityConfig(n=4, m=4), "1 <= N < M"),
        (lambda: NMSparsityConfig(n=0, m=4), "1 <= N < M"),
        (lambda: NMSparsityConfig(method="magic"), "method"),
        (lambda: NMSparsityConfig(freeze_at=1.5), "freeze_at"),
        (lambda: NMSparsityConfig(exclude="features.0"), "not the string"),
        (lambda: NMSparsityConfig.from_string("2-4"), "look like '2:4'"),
        (lambda: LowRankConfig(energy=0.9, budget=0.5), "not both"),
        (lambda: LowRankConfig(energy=0.0), r"energy must lie in \(0.0, 1.0\]"),
        (lambda: LowRankConfig(budget=float("nan")), "finite"),
        (lambda: LowRankConfig(rank_multiple=0), "rank_multiple"),
        (lambda: LowRankConfig.from_string("rank=3"), "energy=0.95"),
        (lambda: FineTuneConfig(epochs=0), "epochs"),
        (lambda: FineTuneConfig(batch_size=1), "batch_size"),
    ],
)
def test_configs_are_validated(factory: object, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        factory()  # type: ignore[operator]


def test_configs_are_frozen_and_parse_cli_strings() -> None:
    config = NMSparsityConfig.from_string("1:8", exclude=["stem"])
    assert (config.n, config.m, config.exclude, config.pattern) == (1, 8, ("stem",), "1:8")
    with pytest.raises(AttributeError):
        config.n = 2  # type: ignore[misc]
    assert LowRankConfig().energy == 0.95 and LowRankConfig.from_string("budget=0.5").budget == 0.5


def test_registry_is_explicit_and_rejects_duplicates() -> None:
    assert PASSES["low_rank"] is LowRank and PASSES["nm_sparsity"] is NMSparsity
    with pytest.raises(ValueError, match="already registered"):
        register_pass(LowRank)

    class Nameless(NMSparsity):
        name = "bad name!"

    with pytest.raises(ValueError, match="invalid compression pass name"):
        register_pass(Nameless)
    with pytest.raises(ValueError, match="unknown compression pass 'prune'"):
        create_pass("prune")
    assert isinstance(create_pass("nm_sparsity", NMSparsityConfig(n=1, m=4)), NMSparsity)


def test_compose_enforces_pipeline_order() -> None:
    model = build_model("small_cnn", SPEC)
    with pytest.raises(ValueError, match="low_rank → nm_sparsity → int8"):
        compose(model, [NMSparsity(), LowRank()])
    with pytest.raises(ValueError, match="low_rank → nm_sparsity → int8"):
        compose(model, [Int8AtExport(), LowRank()])
    with pytest.raises(ValueError, match="once"):
        compose(model, [LowRank(), LowRank()])
    with pytest.raises(ValueError, match="both train_data and a fine_tune config"):
        compose(model, [LowRank()], fine_tune=FineTuneConfig())


def test_compose_low_rank_then_sparsity_then_int8_marker() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", SPEC).eval()
    layers = norm_layers(model)
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    y = np.arange(32, dtype=np.int64) % 10
    passes = [LowRank(LowRankConfig(energy=0.9, rank_multiple=4, exclude=("features.0",))),
              NMSparsity(NMSparsityConfig(exclude=("features.0",))), Int8AtExport()]
    out, reports = compose(copy.deepcopy(model), passes, (x, y), FineTuneConfig(epochs=1, batch_size=16))
    assert [r["pass"] for r in reports] == ["low_rank", "nm_sparsity", "int8"]
    assert json.loads(json.dumps(reports)) == reports  # manifest-ready
    assert norm_layers(out) == layers and not out.training
    sparse = reports[1]["layers"]
    factored = [p for p in reports[0]["layers"]]
    assert factored and all(f"{p}.0" in sparse and f"{p}.1" in sparse for p in factored)
    assert all(v["sparsity"] >= 0.5 for v in sparse.values())
    assert reports[1]["fine_tune"]["steps"] == 2 and out(torch.from_numpy(x)).shape == (32, 10)


def test_low_rank_factor_width_must_be_divisible_for_nm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 3) @ torch.randn(3, 8))  # rank 3
    compose(model, [LowRank(LowRankConfig(energy=1.0))])
    assert model[0][1].in_features == 3
    with pytest.raises(UnsupportedLayerError, match=r"'0.1' \(Linear\).*in_features = 3.*rank_multiple=4"):
        NMSparsity().prepare(model)


def test_second_pass_while_first_is_prepared_is_refused() -> None:
    model = build_model("small_cnn", SPEC)
    NMSparsity(NMSparsityConfig(exclude=("features.0",))).prepare(model)
    with pytest.raises(CompressionError, match=r"'features\.3' is parametrized"):
        LowRank().prepare(model)
