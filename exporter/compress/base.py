"""The lifecycle every compression pass shares, layer selection with ``exclude`` globs, and the pass registry.

Modelled on PyTorch's ``torch.ao.pruning`` sparsifiers (``prepare`` → ``step`` → ``squash_mask``): a pass is
built from a frozen, validated config and then

1. :meth:`CompressionPass.prepare` validates the model (every layer it cannot handle raises
   :class:`UnsupportedLayerError` unless the config's ``exclude`` lists it) and inserts masks or factorizations;
2. :meth:`CompressionPass.step` (once per optimizer step of a fine-tune) and :meth:`CompressionPass.calibrate`
   are the hooks of an optional short fine-tune (:mod:`exporter.compress.finetune`);
3. :meth:`CompressionPass.finalize` makes the change permanent (masks multiplied in and removed, factors left as
   plain ``nn.Linear``/``nn.Conv2d`` modules) so the model exports like any other;
4. :meth:`CompressionPass.report` returns a JSON-ready dict for the bundle manifest.

Passes change the model **in place** (``copy.deepcopy`` it first to keep the original). Normalization layers
are never compressed and never replaced: the adaptable graph (:mod:`exporter.adaptable`) depends on the
``BatchNorm2d`` modules, their names and order.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import nn
from torch.nn.utils import parametrize

from runtime.checks import is_finite_number

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


class CompressionError(RuntimeError):
    """A compression pass was used out of order or produced a model that fails its own checks."""


class UnsupportedLayerError(ValueError):
    """A pass cannot compress a layer that the config does not exclude; names the layer path, type and pass."""

    def __init__(self, pass_name: str, path: str, layer_type: str, reason: str, others: Sequence[str] = ()) -> None:
        self.pass_name, self.path, self.layer_type, self.reason = pass_name, path, layer_type, reason
        shown = path or "<root>"
        more = f" (also unsupported: {', '.join(others)})" if others else ""
        super().__init__(
            f"{pass_name}: layer {shown!r} ({layer_type}) is not supported: {reason}{more}; "
            f"leave it uncompressed by listing it in the config's exclude, e.g. exclude=({shown!r},) "
            f"(on the command line: --exclude {shown})"
        )


def validate_exclude(exclude: Sequence[str] | str) -> tuple[str, ...]:
    """Check ``exclude`` is a sequence of non-empty glob strings; return it as a tuple."""
    if isinstance(exclude, str):
        raise ValueError(f"exclude must be a sequence of module-path globs, not the string {exclude!r}")
    if not isinstance(exclude, Iterable):
        raise ValueError(f"exclude must be a sequence of module-path globs, got {exclude!r}")
    patterns = tuple(exclude)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"exclude entries must be non-empty strings, got {bad!r}")
    return patterns


def is_excluded(path: str, patterns: Sequence[str]) -> str | None:
    """The first glob of ``patterns`` that matches ``path`` or one of its ancestors (``a.b`` for ``a.b.c``)."""
    parts = path.split(".") if path else [""]
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


@dataclass(frozen=True)
class LayerSelection:
    """The layers a pass will compress (path → module, in registration order), the excluded paths and, for a
    target registered under more than one path (one module object shared, e.g. ``self.b = self.a``), its
    other paths (``aliases``: first path → the others; a pass must change the module under every one)."""

    targets: dict[str, nn.Module]
    excluded: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path each module of ``model`` is registered under, keyed by ``id(module)``, in registration order
    (``named_modules`` lists a shared module only under its first path)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _shared_exclusion(pass_name: str, paths: list[str], matched: list[str | None]) -> bool:
    """Whether a module registered under ``paths`` is excluded; ``ValueError`` naming its paths when ``exclude``
    matches some of them but not all (one module object cannot be both compressed and left alone)."""
    if all(m is None for m in matched):
        return False
    if all(m is not None for m in matched):
        return True
    hit = [p for p, m in zip(paths, matched, strict=True) if m is not None]
    missed = [p for p, m in zip(paths, matched, strict=True) if m is None]
    raise ValueError(f"{pass_name}: one module is registered as {' and '.join(repr(p) for p in paths)}; exclude "
                     f"matches {hit} but not {missed}: exclude every path of a shared module or none")


def select_layers(
    model: nn.Module, pass_name: str, targets: tuple[type[nn.Module], ...], exclude: Sequence[str]
) -> LayerSelection:
    """Find the layers of ``model`` a pass compresses; every other module with its own parameters is an error.

    A module is a target when it is an instance of ``targets``; normalization layers and modules without
    parameters of their own are passed over; anything else holding parameters (a ``Conv1d``, an
    ``Embedding``, a bare ``nn.Parameter`` on a container …) raises :class:`UnsupportedLayerError` unless a
    glob of ``exclude`` matches its path or an ancestor's. Globs that match no module raise ``ValueError``
    (a typo would otherwise silently compress the layer it meant to protect). A module registered under
    several paths is one target under its first path (its other paths in ``aliases``); ``exclude`` must match
    all of its paths or none (``ValueError`` naming them).
    """
    used: set[str] = set()
    found: dict[str, nn.Module] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    excluded: list[str] = []
    unsupported: list[tuple[str, nn.Module]] = []
    all_paths = module_paths(model)
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise CompressionError(f"{pass_name}: layer {path!r} is parametrized (a pass is still prepared on it); "
                                   "finalize that pass first")
        if ".parametrizations." in f".{path}.":
            continue
        paths = all_paths[id(module)]
        matched = [is_excluded(p, exclude) for p in paths]
        used.update(m for m in matched if m is not None)
        own = any(True for _ in module.parameters(recurse=False))
        if not own or isinstance(module, NORM_TYPES):
            continue
        if _shared_exclusion(pass_name, paths, matched):
            excluded.append(path)
        elif isinstance(module, targets):
            found[path] = module
            if len(paths) > 1:
                aliases[path] = tuple(paths[1:])
        else:
            unsupported.append((path, module))
    unused = [p for p in exclude if p not in used]
    if unused:
        raise ValueError(f"{pass_name}: exclude patterns {unused} match no module of {type(model).__name__}")
    if unsupported:
        _raise_unsupported(pass_name, unsupported, targets)
    return LayerSelection(found, tuple(excluded), aliases)


def _raise_unsupported(
    pass_name: str, unsupported: list[tuple[str, nn.Module]], targets: tuple[type[nn.Module], ...]
) -> None:
    path, module = unsupported[0]
    names = ", ".join(t.__name__ for t in targets)
    raise UnsupportedLayerError(pass_name, path, type(module).__name__, f"the pass compresses only {names}",
                                [p or "<root>" for p, _ in unsupported[1:]])


def parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module owning the child at ``path`` and the child's attribute name."""
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def finite_fraction(value: float, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """Check ``low < value <= high`` and finite; return it as float."""
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low < value <= high:
        raise ValueError(f"{name} must lie in ({low}, {high}], got {value!r}")
    return float(value)


class CompressionPass(ABC):
    """One compression pass with the ``prepare`` → ``step``/``calibrate`` → ``finalize`` → ``report`` lifecycle.

    Subclasses set :attr:`name` (registry key), :attr:`order` (position in the pipeline: low-rank 0,
    sparsity 1; int8 quantization, order 2, is applied by the exporter after export) and :attr:`config_type`
    (a frozen dataclass with at least an ``exclude`` field), and implement
    :meth:`_prepare`, :meth:`_finalize` and :meth:`_report`. One instance compresses one model once.
    """

    name: ClassVar[str]
    order: ClassVar[int]
    config_type: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config
        self.state = "new"
        self.excluded: tuple[str, ...] = ()
        self.notes: dict[str, Any] = {}

    def _require(self, state: str, action: str) -> None:
        if self.state != state:
            raise CompressionError(f"{self.name}: cannot {action} in state {self.state!r} (needs {state!r})")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Validate ``model`` and insert this pass's masks or factorizations (in place); return the model."""
        self._require("new", "prepare")
        model = self._prepare(model)
        self.state = "prepared"
        return model

    def step(self, progress: float) -> None:
        """Hook called after every optimizer step of a fine-tune; ``progress`` in [0, 1] is the schedule's
        position. The default does nothing."""
        self._require("prepared", "step")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"{self.name}: progress must lie in [0, 1], got {progress!r}")

    def calibrate(self, model: nn.Module, x: np.ndarray) -> None:
        """Hook for passes that need data without training (statistics, ranks); the default does nothing."""
        self._require("prepared", "calibrate")

    def finalize(self, model: nn.Module) -> nn.Module:
        """Make the compression permanent and check it; return the model of plain, exportable modules."""
        self._require("prepared", "finalize")
        model = self._finalize(model)
        self.state = "finalized"
        return model

    def note(self, key: str, value: Any) -> None:
        """Attach extra information (e.g. fine-tune metrics) to the report."""
        self.notes[key] = value

    def report(self) -> dict[str, Any]:
        """JSON-ready description of what the pass did, for the bundle manifest."""
        self._require("finalized", "report")
        out = {"pass": self.name, "config": config_dict(self.config), "excluded": list(self.excluded)}
        out.update(self._report())
        out.update(self.notes)
        return out

    @abstractmethod
    def _prepare(self, model: nn.Module) -> nn.Module: ...

    @abstractmethod
    def _finalize(self, model: nn.Module) -> nn.Module: ...

    @abstractmethod
    def _report(self) -> dict[str, Any]: ...


PASSES: dict[str, type[CompressionPass]] = {}


def register_pass(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Add a pass class under its ``name``; duplicate or invalid names are rejected. Usable as a decorator."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ValueError(f"invalid compression pass name {name!r} on {cls.__name__}")
    if name in PASSES:
        raise ValueError(f"compression pass {name!r} is already registered ({PASSES[name].__name__})")
    if not issubclass(cls, CompressionPass):
        raise TypeError(f"{cls.__name__} is not a CompressionPass")
    if "exclude" not in getattr(getattr(cls, "config_type", None), "__dataclass_fields__", {}):
        raise TypeError(f"{cls.__name__}.config_type must be a dataclass with an 'exclude' field")
    PASSES[name] = cls
    return cls


def create_pass(name: str, config: Any = None) -> CompressionPass:
    """Instantiate the registered pass ``name`` with ``config`` (None: the pass's default config)."""
    if name not in PASSES:
        raise ValueError(f"unknown compression pass {name!r}; registered: {sorted(PASSES)}")
    return PASSES[name](config)
