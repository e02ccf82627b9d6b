"""The base class of forward-only test-time adaptation methods: state, transactions, the registry.

A :class:`TTAMethod` owns its state as a dict of numpy arrays with :meth:`~TTAMethod.reset`,
:meth:`~TTAMethod.snapshot` and :meth:`~TTAMethod.restore`; a concrete method overrides one
:meth:`~TTAMethod.forward_and_adapt` (the shape of mariodoebler/test-time-adaptation). Every batch runs as a
transaction: the input is validated first, and if anything fails the state is put back as it was, so a bad
batch never leaves a half-adapted state behind.

Methods serve two kinds of model (see :mod:`device_agents.tta.models`): an adaptable graph
(``runtime.AdaptableModel``: normalisation parameters and statistics as graph inputs, batch statistics and
features as outputs) and, for the methods that only read outputs, a ``runtime.predictor.Predictor`` on a folded
or foreign bundle. Methods never own the model's parameters: cloud updates replace them through
``AdaptableModel.set_params`` and every method reads the current ones on each call.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from device_agents.tta.models import ModelCapabilityError, check_batch, describe_model, has_features, is_adaptable
from device_agents.tta.snapshots import StateLayout, TTASnapshot
from runtime.model import entropy


@dataclass(frozen=True)
class TTAOutput:
    """Predictions of one batch.

    ``logits`` (N, K): raw logits, or log-probabilities where the method (LAME) or the model (one that outputs
    probabilities) has no logits; ``probs`` (N, K): softmax of ``logits``, rows summing to 1; ``features``
    (N, D): the penultimate features, or None for a model without them.
    """

    logits: np.ndarray
    features: np.ndarray | None
    probs: np.ndarray


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row divided by ln K, so values lie in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    if k < 2:
        raise ValueError(f"need at least 2 classes for a normalised entropy, got {k}")
    return entropy(p) / math.log(k)


@dataclass(frozen=True)
class TTAConfig:
    """Settings shared by every method; ``episodic`` resets the state before every batch."""

    episodic: bool = False


class TTAMethod(abc.ABC):
    """Base class: owns the state dict, reset/snapshot/restore, the episodic flag, the drift hook and the
    per-batch transaction (validate → adapt → commit, or roll back on any error).

    Subclasses set ``requires_adaptable`` (needs graph inputs for normalisation statistics) and
    ``requires_features`` (needs penultimate features) so that a model that cannot serve them is refused
    with :class:`ModelCapabilityError` before any state changes.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TTAConfig]] = TTAConfig
    requires_adaptable: ClassVar[bool] = False
    requires_features: ClassVar[bool] = False
    state_layout: ClassVar[StateLayout] = StateLayout()
    """The keys this method's state may hold (:meth:`restore` refuses others); by default none (stateless). Its
    ``statistics`` prefix is where the state keeps a running estimate of normalisation statistics
    (``<prefix><layer>.ema_mean`` and ``.ema_sq``, the layout of
    :class:`~device_agents.tta.statistics.StatisticsMix`): α-BN at the top level, the methods that build on it
    under ``stats.``."""

    def __init__(self, config: TTAConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self._state: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def episodic(self) -> bool:
        """Whether the state is reset before every batch."""
        return self.config.episodic

    def reset(self) -> None:
        """Forget everything adapted so far; the next batch starts from the model's current parameters."""
        self._state = {}
        self._state_replaced()

    def snapshot(self) -> TTASnapshot:
        """A deep copy of the state (numpy arrays only), tagged with this method's name (:class:`TTASnapshot`)."""
        self._state_replaced()
        return TTASnapshot(self.name, {k: v.copy() for k, v in self._state.items()})

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the state with a copy of ``state`` (as returned by :meth:`snapshot`, of this method).

        Refused, leaving the state as it was: something that is not a mapping of names to numeric numpy arrays
        (``TypeError``); a snapshot another method took (``ValueError`` naming both methods); a state this
        method never holds — keys of another method's state, or keys without those they come with, e.g. a
        running mean without its second moment (``ValueError`` naming them, and the methods whose state it
        looks like)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"TTA method {self.name!r} restores a snapshot (a mapping of names to numpy arrays), "
                            f"got {type(state).__name__}")
        if isinstance(state, TTASnapshot) and state.method != self.name:
            raise ValueError(f"a snapshot of TTA method {state.method!r} cannot be restored into TTA method "
                             f"{self.name!r}; the state of {self.name!r} is left as it was")
        for key, value in state.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings, got {key!r}")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"state entry {key!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype.kind not in "biuf":
                raise TypeError(f"state entry {key!r} must be a numeric numpy array, got dtype {value.dtype}")
        problem = self.state_layout.problem(state)
        if problem is not None:
            owners = [name for name, cls in sorted(TTA_METHODS.items())
                      if name != self.name and cls.state_layout.problem(state) is None]
            hint = f" (it looks like the state of TTA method {' or '.join(map(repr, owners))})" if owners else ""
            raise ValueError(f"not a state of TTA method {self.name!r}: {problem}{hint}; its state is left as "
                             "it was")
        self._state = {k: v.copy() for k, v in state.items()}
        self._state_replaced()

    def _state_replaced(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Hook: drop any object derived from the state arrays (rebuilt from them on the next batch)."""

    def adapted_params(self, model: Any) -> dict[str, np.ndarray]:
        """What this method has learned, as manifest-named adaptable parameters of ``model`` (float32 copies),
        for a federated contribution: ``<layer>.mean`` / ``<layer>.var`` from the running statistics estimate
        (mean E[z], variance E[z²] - E[z]²) of each layer the state holds one for. Methods that adapt more
        (FOA's scale/shift) add it. Empty when nothing was adapted yet, after a reset, or on a model without
        an adaptable graph. Reads the state only: no forward pass, nothing changes.
        """
        prefix = self.state_layout.statistics
        if prefix is None or not is_adaptable(model):
            return {}
        out: dict[str, np.ndarray] = {}
        for name in model.params:
            if not name.endswith(".mean"):
                continue
            layer = name[: -len(".mean")]
            mean, sq = self._state.get(f"{prefix}{layer}.ema_mean"), self._state.get(f"{prefix}{layer}.ema_sq")
            if mean is not None and sq is not None:
                m = np.asarray(mean, dtype=np.float64)
                out[f"{layer}.mean"] = m.astype(np.float32)
                out[f"{layer}.var"] = np.maximum(np.asarray(sq, np.float64) - m**2, 0.0).astype(np.float32)
        return out

    def on_drift(self) -> None:
        """Hook for the drift policy: by default re-anchor on the model's current parameters (reset)."""
        self.reset()

    def on_params_changed(self) -> None:
        """Hook called after the model's parameters were replaced (a cloud update): by default reset."""
        self.reset()

    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelCapabilityError` naming ``model`` when it cannot serve this method."""
        if self.requires_adaptable and not is_adaptable(model):
            raise ModelCapabilityError(
                f"TTA method {self.name!r} needs an adaptable graph (normalisation statistics as graph inputs); "
                f"{describe_model(model)} is not one"
            )
        if self.requires_features and not has_features(model):
            raise ModelCapabilityError(
                f"TTA method {self.name!r} needs penultimate features, but {describe_model(model)} declares no "
                "features output (manifest outputs.features is null)"
            )

    def predict(self, model: Any, x: np.ndarray) -> TTAOutput:
        """Adapt on and predict one batch; reset first when episodic (after the input was validated)."""
        return self._transaction(model, x, reset_first=self.episodic)

    def adapt_and_predict(self, model: Any, x: np.ndarray) -> TTAOutput:
        """One continual step on ``x`` (ignores ``episodic``): validate, adapt, commit or roll back."""
        return self._transaction(model, x, reset_first=False)

    def _transaction(self, model: Any, x: np.ndarray, *, reset_first: bool) -> TTAOutput:
        self.check_model(model)
        batch = check_batch(model, x)
        saved = {k: v.copy() for k, v in self._state.items()}
        try:
            if reset_first:
                self.reset()
            out = self.forward_and_adapt(model, batch)
            if not np.isfinite(out.logits).all():
                # a finite batch gave non-finite outputs (a broken model or parameters): nothing is committed, so
                # statistics, supports and searches are not poisoned for the batches after it
                raise FloatingPointError(f"TTA method {self.name!r}: {describe_model(model)} returned non-finite "
                                         "outputs for this batch; the method's state is left as it was")
            return out
        except BaseException:
            self._state = saved
            self._state_replaced()
            raise

    @abc.abstractmethod
    def forward_and_adapt(self, model: Any, x: np.ndarray) -> TTAOutput:
        """Predict the validated batch ``x`` and update the state; forward passes only.

        Called inside the transaction of :meth:`predict`/:meth:`adapt_and_predict`: ``x`` already passed
        the model's input checks, and an exception restores the state.
        """


TTA_METHODS: dict[str, type[TTAMethod]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_tta_method(name: str, cls: type[TTAMethod]) -> type[TTAMethod]:
    """Add ``cls`` to :data:`TTA_METHODS` under ``name``; duplicate or malformed names raise ``ValueError``."""
    if not _NAME.match(name):
        raise ValueError(f"TTA method name {name!r} must match {_NAME.pattern}")
    if name in TTA_METHODS:
        raise ValueError(f"TTA method {name!r} is already registered as {TTA_METHODS[name].__name__}")
    if not (isinstance(cls, type) and issubclass(cls, TTAMethod)):
        raise TypeError(f"TTA method {name!r} must be a TTAMethod subclass, got {cls!r}")
    TTA_METHODS[name] = cls
    return cls


def create_tta_method(name: str, config: TTAConfig | None = None) -> TTAMethod:
    """Instantiate the registered method ``name`` with ``config`` (its default config when None)."""
    if name not in TTA_METHODS:
        raise ValueError(f"unknown TTA method {name!r}; registered: {sorted(TTA_METHODS)}")
    return TTA_METHODS[name](config)
