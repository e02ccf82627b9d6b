"""The backprop baselines of the TTA benchmark (Tent, EATA): what they adapt and what EATA's filters keep."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.baselines import (
    EATA,
    EATAConfig,
    Tent,
    TentConfig,
    backprop_method,
    fisher_information,
    norm_param_names,
    softmax_entropy,
)
from edgeloop.data import corrupt


@pytest.fixture(scope="module")
def model(digits_model: tuple[Any, Any, dict[str, Any]]) -> torch.nn.Module:
    return copy.deepcopy(digits_model[0]).eval()


@pytest.fixture(scope="module")
def noisy_batch(digits_arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    return corrupt(digits_arrays[2][:64], "gaussian_noise", 5, seed=0)


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_tent_changes_only_norm_affine_parameters(model: torch.nn.Module, noisy_batch: np.ndarray) -> None:
    before = _params(model)
    tent = Tent(model)
    logits = tent.predict(noisy_batch)
    assert logits.shape == (64, 10)
    after = _params(tent.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norm = set(norm_param_names(model))
    assert norm and changed and changed <= norm
    assert all(torch.equal(v, _params(model)[k]) for k, v in before.items())  # the original is untouched
    tent.reset()
    assert all(torch.equal(v, _params(tent.model)[k]) for k, v in before.items())


def test_tent_reduces_entropy_on_a_corrupted_batch(model: torch.nn.Module, noisy_batch: np.ndarray) -> None:
    tent = Tent(model, TentConfig(lr=1e-2))
    x = torch.from_numpy(np.array(noisy_batch))
    with torch.no_grad():
        start = float(softmax_entropy(tent.model(x)).mean())
    for _ in range(5):
        tent.predict(noisy_batch)
    with torch.no_grad():
        end = float(softmax_entropy(tent.model(x)).mean())
    assert end < start


def test_eata_filters_unreliable_and_redundant_samples(model: torch.nn.Module, noisy_batch: np.ndarray) -> None:
    eata = EATA(model, 10, [noisy_batch[:32]], EATAConfig(d_margin=0.4))
    assert eata.e_margin == pytest.approx(0.4 * math.log(10))
    confident = torch.full((3, 10), -5.0)
    confident[0, 0] = confident[1, 3] = confident[2, 7] = 5.0
    uncertain = torch.zeros((2, 10))  # uniform: entropy ln 10 > E0
    keep, ent = eata.select(torch.cat([confident, uncertain]))
    assert keep.tolist() == [0, 1, 2]
    assert bool((ent[3:] > eata.e_margin).all())
    eata.average = confident[0].softmax(dim=0)  # a sample predicting what the average predicts is redundant
    keep, _ = eata.select(confident)
    assert keep.tolist() == [1, 2]


def test_eata_adapts_only_norm_parameters_and_fisher_is_nonnegative(
    model: torch.nn.Module, noisy_batch: np.ndarray
) -> None:
    eata = backprop_method("eata", model, 10, [noisy_batch[:32], noisy_batch[32:]])
    assert all(bool((f >= 0).all()) for f in eata.fisher)
    before = _params(model)
    for _ in range(3):
        eata.predict(noisy_batch)
    changed = {k for k, v in _params(eata.model).items() if not torch.equal(before[k], v)}
    assert changed <= set(norm_param_names(model))
    assert eata.used_both <= eata.used_reliable <= 3 * 64


def test_fisher_needs_a_batch(model: torch.nn.Module) -> None:
    tent = Tent(model)
    with pytest.raises(ValueError):
        fisher_information(tent.model, tent.params, [])
    with pytest.raises(ValueError):
        backprop_method("eata", model, 10)
