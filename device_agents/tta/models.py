"""What TTA methods need from a model, for both kinds the runtime serves (numpy only, no torch).

* an **adaptable graph** (``runtime.AdaptableModel`` or anything with its ``params`` / ``forward(x, alpha,
  params) -> ForwardResult`` surface): normalisation parameters and statistics are graph inputs, per-layer batch
  statistics and the penultimate features are outputs;
* a **predictor** (``runtime.predictor.Predictor``) on a folded or foreign bundle: ``predict(x) ->
  PredictResult(scores, probs, features | None, kind)``; features only when the manifest names them.

Source statistics come from the bundle's manifest (``source_statistics``) when the model has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.model import check_batch as check_array
from runtime.model import softmax


class ModelCapabilityError(ValueError):
    """The model cannot serve a TTA method (e.g. it has no adaptable graph or no features output)."""


def is_adaptable(model: Any) -> bool:
    """Whether ``model`` exposes the adaptable-graph surface (``params`` and ``forward``). ``params`` is looked
    up without being read: on :class:`runtime.model.AdaptableModel` reading it copies every parameter."""
    has_params = hasattr(type(model), "params") or "params" in getattr(model, "__dict__", {})
    return callable(getattr(model, "forward", None)) and has_params


def has_features(model: Any) -> bool:
    """Whether ``model`` returns penultimate features (always true for an adaptable graph)."""
    if is_adaptable(model):
        return True
    manifest = getattr(model, "manifest", None)
    return bool(getattr(manifest, "features_output", None))


def describe_model(model: Any) -> str:
    """A short name for error messages: model entry, graph kind and bundle, when known."""
    bundle = getattr(model, "bundle", None)
    entry, manifest = getattr(bundle, "model", None), getattr(bundle, "manifest", None)
    if entry is not None and manifest is not None:
        return f"model {entry.name!r} ({entry.graph} graph, {entry.format}) of bundle {manifest.name!r}"
    return f"model {type(model).__name__}"


def check_batch(model: Any, x: np.ndarray) -> np.ndarray:
    """Validate ``x`` with the model's own ``check_input`` (shape, dtype, range, NaN/inf, empty batch), or —
    for a model without one — a generic check; return the validated array. Raises ``runtime.InputError``."""
    check = getattr(model, "check_input", None)
    if callable(check):
        return np.asarray(check(x))
    return check_array(x)


def reference_params(model: Any) -> Mapping[str, np.ndarray]:
    """The model's current adaptable parameters for reading: a read-only view where the model has one
    (:attr:`runtime.model.AdaptableModel.params_view`, no copies), else ``model.params``."""
    view = getattr(model, "params_view", None)
    return view if view is not None else model.params


def forward_validated(model: Any, x: np.ndarray, alpha: float = 0.0,
                      params: Mapping[str, np.ndarray] | None = None) -> Any:
    """``model.forward`` for a batch the TTA transaction has validated with the model's own checks: through
    :meth:`runtime.model.AdaptableModel.forward_validated` where the model has it (the checks are not
    repeated), else ``model.forward``."""
    run = getattr(model, "forward_validated", None)
    return run(x, alpha, params) if run is not None else model.forward(x, alpha=alpha, params=params)


def source_pass(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(logits, probs, features)`` of the unadapted model on a batch the TTA transaction validated: α = 0 on an
    adaptable graph (its current parameters; :func:`forward_validated`, the checks are not repeated),
    ``predict`` on a predictor. A model that outputs probabilities gets log-probabilities as ``logits``."""
    if is_adaptable(model):
        result = forward_validated(model, x, 0.0)
        return result.logits, softmax(result.logits), result.features
    result = model.predict(x)
    probs = np.asarray(result.probs, dtype=np.float64)
    logits = result.scores if result.kind == "logits" else np.log(np.clip(probs, 1e-12, None)).astype(np.float32)
    features = None if result.features is None else np.asarray(result.features, dtype=np.float32)
    return np.asarray(logits, dtype=np.float32), probs, features


def source_feature_stats(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Source penultimate-feature mean and variance from the manifest, or None."""
    manifest = getattr(model, "manifest", None)
    stats = getattr(manifest, "source_feature_stats", None)
    return stats() if callable(stats) else None


def declared_input(model: Any) -> tuple[str, tuple[str, ...]]:
    """``(layout, invariances)`` of the model's input as its manifest declares them (``NCHW`` and none for a
    model without a manifest)."""
    spec = getattr(getattr(model, "manifest", None), "input", None)
    return str(getattr(spec, "layout", "NCHW")), tuple(getattr(spec, "invariances", ()))


def source_layer_stats(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-layer source running mean and variance from the manifest (``Manifest.source_layer_stats``: the
    recorded source statistics, or the initial ``mean``/``var`` they equal); layers it does not list fall back to
    the model's current reference statistics (``params``)."""
    recorder = getattr(getattr(model, "manifest", None), "source_layer_stats", None)
    recorded = recorder() if callable(recorder) else {}
    params = model.params
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in params:
        if not name.endswith(".mean"):
            continue
        layer = name[: -len(".mean")]
        entry = recorded.get(layer)
        if entry:
            stats[layer] = (np.asarray(entry[0], np.float64), np.asarray(entry[1], np.float64))
        else:
            stats[layer] = (params[name].astype(np.float64), params[f"{layer}.var"].astype(np.float64))
    return stats


def source_class_means(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Class-conditional source feature means (K, D) from the bundle's statistics file and which classes the
    source samples covered (K,) bool (a class of count 0 records a placeholder zero mean), or None."""
    bundle = getattr(model, "bundle", None)
    loader = getattr(getattr(bundle, "manifest", None), "class_gaussians", None)
    if bundle is None or not callable(loader):
        return None
    gaussians = loader(bundle.root)
    if gaussians is None:
        return None
    return np.asarray(gaussians[0], dtype=np.float32), np.asarray(gaussians[2]).reshape(-1) > 0


def graph_layer_order(model: Any) -> list[str]:
    """Normalisation layer names in graph order (the manifest's ``adaptable.layers``), or sorted by name for
    a model without a manifest."""
    layers = getattr(getattr(model, "manifest", None), "layers", None)
    if layers:
        return [layer.name for layer in layers]
    return sorted(name[: -len(".mean")] for name in model.params if name.endswith(".mean"))
