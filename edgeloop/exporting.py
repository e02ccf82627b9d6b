"""The export job behind ``edgeloop export``: load a model, compress it, export every format, write a bundle.

A model is a checkpoint of a registered architecture (``student.pt``) or a Python import path
(``package.module:factory`` — an ``nn.Module`` instance, or a callable returning one). Compression runs in
the fixed order low-rank → N:M sparsity (each with a short fine-tune on the dataset's training split) →
int8 at export time. Torch is imported only inside these functions.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from runtime.manifest import checked_invariances

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
TFLITE_INT8 = ("static", "dynamic")


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``edgeloop export`` was asked to do; validated at construction."""

    model: str
    out: Path
    dataset: str | None = None
    int8: bool = True
    sparsity: str | None = None
    low_rank: str | None = None
    exclude: tuple[str, ...] = ()
    fine_tune_epochs: int = 3
    formats: tuple[str, ...] = ("onnx",)
    folded: bool = True
    tflite_int8: str = "static"
    pack: bool = True
    calibration_samples: int = 256
    name: str | None = None
    overwrite: bool = False
    seed: int = 0
    key_path: Path | None = None
    trainable: bool = False
    invariances: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(self.formats)}")
        if self.tflite_int8 not in TFLITE_INT8:
            raise ValueError(f"tflite_int8 must be one of {TFLITE_INT8}, got {self.tflite_int8!r}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}")
        if self.calibration_samples < 8:
            raise ValueError(f"calibration_samples must be >= 8, got {self.calibration_samples}")
        if self.invariances is not None:
            object.__setattr__(self, "invariances", checked_invariances(self.invariances))


@dataclass(frozen=True)
class LoadedModel:
    """A torch model with what the bundle needs to know about it."""

    model: Any
    arch: str
    spec: Any
    sha256: str
    dataset: str | None
    invariances: tuple[str, ...] = ()


def load_model(source: str, dataset: str | None) -> LoadedModel:
    """Load a checkpoint path or a ``module:attr`` import path (then ``dataset`` gives the input spec)."""
    from exporter.checkpoint import load_checkpoint

    path = Path(source)
    if path.is_file():
        model, info = load_checkpoint(path)
        meta = info["meta"]
        try:
            invariances = checked_invariances(meta.get("invariances", ()))
        except ValueError as exc:
            raise ValueError(f"{path}: checkpoint meta: {exc}") from exc
        return LoadedModel(model, info["arch"], info["spec"], info["sha256"], meta.get("dataset"), invariances)
    if ":" not in source:
        raise FileNotFoundError(f"model {source!r} is neither a checkpoint file nor an import path 'module:attr'")
    return _import_model(source, dataset)


def _import_from_cwd(module_name: str) -> Any:
    """Import ``module_name`` the way ``python -m`` would: the working directory first on the path (a console
    script like ``edgeloop`` leaves it out, so ``my_models.py`` beside the user would not be found)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def _import_model(source: str, dataset: str | None) -> LoadedModel:
    import torch
    from torch import nn

    from edgeloop.data import load_dataset
    from exporter.bundle import check_finite_weights
    from exporter.models import ModelSpec, with_feature_split

    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model import path {source!r} must look like 'module:attr'")
    try:  # the user's module: any failure of it (a SyntaxError, an exception at import) is theirs to fix
        module = _import_from_cwd(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import model {source!r}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise ValueError(f"cannot import model {source!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as exc:
            raise ValueError(f"calling {source!r} to build the model failed: {type(exc).__name__}: {exc}") from exc
    else:
        raise ValueError(f"{source!r} is a {type(obj).__name__}: it must be an nn.Module or a callable returning one")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source!r} gave a {type(model).__name__}, not a torch nn.Module")
    if dataset is None:
        raise ValueError(f"an imported model ({source}) needs --dataset to define its input")
    check_finite_weights(model)
    train = load_dataset(dataset, "train", limit=16)
    c, h = int(train.x.shape[1]), int(train.x.shape[2])
    spec = ModelSpec(c, len(train.labels), h, (0.0,) * c, (1.0,) * c)
    example = torch.from_numpy(np.array(train.x[:4]))
    try:
        model = with_feature_split(model.eval(), example)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    except Exception as exc:  # the user's forward on the dataset's images
        raise ValueError(f"{source}: running it on {dataset} images of shape {tuple(example.shape)} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    digest = hashlib.sha256(repr(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())).encode())
    return LoadedModel(model.eval(), f"import:{source}", spec, digest.hexdigest(), dataset)


def compress(
    loaded: LoadedModel, request: ExportRequest, train_x: np.ndarray, train_y: np.ndarray
) -> list[dict[str, Any]]:
    """Apply the requested low-rank and N:M passes in order (in place), fine-tuning each; return reports."""
    from exporter.compress import FineTuneConfig, LowRank, LowRankConfig, NMSparsity, NMSparsityConfig, compose
    from exporter.compress.nm import parse_pattern

    passes: list[Any] = []
    if request.low_rank:
        multiple = parse_pattern(request.sparsity)[1] if request.sparsity else 1
        passes.append(LowRank(LowRankConfig.from_string(request.low_rank, rank_multiple=multiple,
                                                        exclude=request.exclude)))
    if request.sparsity:
        passes.append(NMSparsity(NMSparsityConfig.from_string(request.sparsity, exclude=request.exclude)))
    if not passes:
        return []
    tune = FineTuneConfig(epochs=request.fine_tune_epochs, seed=request.seed) if request.fine_tune_epochs else None
    data = (train_x, train_y) if tune else None
    _, reports = compose(loaded.model, passes, train_data=data, fine_tune=tune)
    return reports


def _model_input(path: Path, fmt: str) -> tuple[str, list[int], str]:
    """Name, shape (batch as given by the model) and dtype of a foreign model's single input."""
    if fmt == "onnx":
        import onnx

        from exporter.foreign import load_onnx_model

        graph = load_onnx_model(path).graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ValueError(f"{path} has {len(inputs)} graph inputs; a foreign model must have exactly one")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type).name
        return inputs[0].name, dims, dtype
    from runtime.litert import LiteRTSession

    session = LiteRTSession(path)
    if len(session.input_names) != 1:
        raise ValueError(f"{path} has {len(session.input_names)} inputs; a foreign model must have exactly one")
    info = session.input_info(session.input_names[0])
    return session.input_names[0], [int(d) for d in info.shape], np.dtype(info.dtype).name


def to_model_input(x: np.ndarray, layout: str, value_range: tuple[float, float], dtype: str) -> np.ndarray:
    """Convert [0, 1] NCHW images to a foreign model's layout, value range and dtype."""
    lo, hi = value_range
    out = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
    out = lo + out * (hi - lo)
    return np.round(out).astype(dtype) if dtype in ("uint8", "int8") else out.astype(np.float32)


# golden vectors travel with every device download: at most this many bytes of uint8 inputs (k/255), and
# between GOLDEN_MIN and GOLDEN_MAX samples (8 digits or MNIST images, 2 CIFAR images)
GOLDEN_INPUT_BUDGET = 8192
GOLDEN_MIN, GOLDEN_MAX = 2, 8
SOURCE_SAMPLES = 2048  # training images behind a bundle's source statistics


def golden_count(sample_shape: tuple[int, ...]) -> int:
    """How many golden samples of ``sample_shape`` a bundle carries (see ``GOLDEN_INPUT_BUDGET``)."""
    return int(np.clip(GOLDEN_INPUT_BUDGET // max(1, math.prod(sample_shape)), GOLDEN_MIN, GOLDEN_MAX))


def wrap_foreign(
    path: Path, fmt: str, *, out: Path, dataset: str, layout: str = "NCHW",
    value_range: tuple[float, float] = (0.0, 1.0), dtype: str | None = None, output_kind: str = "logits",
    name: str | None = None, overwrite: bool = False, key_path: Path | None = None, features: str | None = "auto",
    source_samples: int = SOURCE_SAMPLES, invariances: tuple[str, ...] = (), output_name: str | None = None,
) -> Path:
    """Wrap a foreign ONNX or TFLite classifier into a signed bundle, with golden vectors from ``dataset``'s
    test split and — when it exposes ``features`` (``"auto"``, a tensor name, or None; see
    :func:`exporter.foreign.wrap_onnx`) — source statistics from up to ``source_samples`` training images
    (a seeded class-stratified subset), fed as the model takes them (:func:`to_model_input`). ``invariances``
    are declared in the manifest's input block (see :data:`runtime.manifest.INVARIANCES`); ``output_name`` names
    the class scores of a model with several outputs. A model with a static batch larger than
    :func:`golden_count` gets golden vectors for its whole batch (its golden check runs one batch)."""
    from edgeloop.data import load_dataset
    from edgeloop.pipeline import signing_key
    from exporter.foreign import ForeignInputSpec, wrap_onnx, wrap_tflite

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"foreign model not found: {path}")
    input_name, dims, model_dtype = _model_input(path, fmt)
    dtype = dtype or ("float32" if model_dtype.startswith("float") else model_dtype)
    test = load_dataset(dataset, "test", limit=64)
    count = max(golden_count(test.x.shape[1:]), dims[0] if dims else 0)  # a static batch: one whole batch
    if count > len(test):
        test = load_dataset(dataset, "test", limit=count)
    golden = to_model_input(test.x[:count], layout, value_range, dtype)
    shape = [-1, *golden.shape[1:]]
    if len(dims) != len(shape):
        raise ValueError(f"{path}: model input {input_name!r} has rank {len(dims)}, {dataset} gives {len(shape)}")
    spec = ForeignInputSpec(name=input_name, shape=shape, dtype=dtype, layout=layout, value_range=value_range,
                            invariances=tuple(invariances))
    source: dict[str, Any] = {}
    if features is not None and source_samples > 0:
        train = load_dataset(dataset, "train", limit=source_samples)  # seeded, class-stratified; decodes only these
        source = {"source_x": to_model_input(train.x, layout, value_range, dtype), "source_y": np.asarray(train.y)}
    wrap = wrap_onnx if fmt == "onnx" else wrap_tflite
    return wrap(path, out, labels=test.labels, input_spec=spec, output_kind=output_kind, golden_x=golden,
                signing_key=signing_key(key_path), name=name or path.stem, overwrite=overwrite, features=features,
                output_name=output_name, **source)


class ExportSplit(NamedTuple):
    """Which images an export draws (:func:`export_split`): training indices for int8 calibration and for the
    source statistics, and a permutation of the test indices whose head gives the golden and parity images."""

    calibration: np.ndarray
    held_out: np.ndarray
    source: np.ndarray


def export_split(seed: int, train_size: int, test_size: int, calibration_samples: int = 256) -> ExportSplit:
    """The draws :func:`run_export` makes with ``seed`` (calibration, test permutation, source sample, in that
    order), for tools that must know which images a bundle's statistics came from (the drift benchmark)."""
    rng = np.random.default_rng(seed)
    calibration = rng.choice(train_size, size=min(calibration_samples, train_size), replace=False)
    held_out = rng.permutation(test_size)
    # source statistics describe the training distribution; test images stay for golden/parity and streams
    source = rng.choice(train_size, size=min(SOURCE_SAMPLES, train_size), replace=False)
    return ExportSplit(calibration, held_out, source)


def _check_dataset_fits(loaded: LoadedModel, source: str, dataset: str, shape: tuple[int, ...], classes: int) -> None:
    """The dataset's images and classes must be what the model takes: found before any fine-tune, not after."""
    spec = loaded.spec
    takes = (spec.in_channels, spec.image_size, spec.image_size)
    if tuple(shape) != takes or classes != spec.num_classes:
        raise ValueError(f"dataset {dataset} gives images of shape {tuple(shape)} in {classes} classes; the model "
                         f"({loaded.arch} from {source}) takes {takes} in {spec.num_classes} classes: pass the "
                         "--dataset it was trained on")


def run_export(request: ExportRequest) -> Path:
    """Load, compress, export and sign: the whole ``edgeloop export`` job. Returns the bundle path."""
    from edgeloop.data import load_dataset
    from edgeloop.pipeline import default_signing_key_path, signing_key
    from exporter.bundle import export_bundle
    from exporter.bundle_dir import check_out_dir, out_path
    from exporter.compress.nm import parse_pattern

    check_out_dir(out_path(request.out), request.overwrite)  # before minutes of fine-tuning, not after
    key_path = request.key_path or default_signing_key_path()
    key = signing_key(key_path) if key_path.exists() else None  # a key that cannot sign: found now; a missing
    # one is created only for a bundle that was built
    loaded = load_model(request.model, request.dataset)
    dataset = request.dataset or loaded.dataset
    if not dataset:
        raise ValueError(f"{request.model} records no dataset; pass --dataset")
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    _check_dataset_fits(loaded, request.model, dataset, train.x.shape[1:], len(train.labels))
    reports = compress(loaded, request, train.x, train.y)
    split = export_split(request.seed, len(train), len(test), request.calibration_samples)
    k = golden_count(test.x.shape[1:])
    calib, golden, parity = train.x[split.calibration], test.x[split.held_out[:k]], test.x[split.held_out[8:264]]
    source = split.source
    compression = {"passes": reports} if reports else None
    return export_bundle(
        (loaded.model, loaded.arch, loaded.spec, loaded.sha256), request.out, labels=train.labels,
        calibration_x=calib, golden_x=golden, source_x=train.x[source], source_y=train.y[source], int8=request.int8,
        name=request.name or f"{loaded.arch}-{dataset}", overwrite=request.overwrite,
        signing_key=key or signing_key(key_path), formats=request.formats, folded=request.folded,
        tflite_int8=request.tflite_int8, parity_x=parity, compression=compression,
        nm=parse_pattern(request.sparsity) if request.sparsity else None, pack=request.pack,
        trainable=request.trainable,
        invariances=loaded.invariances if request.invariances is None else request.invariances,
    )
