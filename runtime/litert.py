"""LiteRT (``ai-edge-litert``) sessions: the :class:`runtime.session.Session` interface over a ``.tflite`` file.

What this session does beyond a bare interpreter:

* **Logical names.** A TFLite tensor is addressed by its signature key (litert-torch writes one signature,
  ``serving_default``, whose keys are the torch argument/output names, e.g. ``bn1_weight``), or by its
  tensor name when the model has no signature (older converters: ``input_1``, ``Identity``). Graph names
  that are not valid keys (``bn1.weight``) are mapped by ``io_names`` = ``{"inputs": {logical: key},
  "outputs": {logical: key}}``, given explicitly or read from the model's own flatbuffer metadata entry
  :data:`IO_NAMES_METADATA` (written by the exporter, so a bundle's file describes itself and its sha256
  covers the mapping). Unmapped keys keep their own name.
* **Batch resizing.** Models converted from torch have a static batch (usually 1). A batch of another size
  resizes every batched input (``resize_tensor_input`` + ``allocate_tensors``) on a separate interpreter
  cached per batch size (least recently used evicted beyond ``max_cached_batches``).
* **Quantized tensors.** A fed array whose dtype equals a quantized (int8/uint8) input tensor's dtype is
  passed as raw quantized values; any other dtype is taken as real values and quantized with the tensor's
  own scale and zero point (``q = clip(round(x / scale) + zero_point)``). Quantized outputs are dequantized
  to float32 (``(q - zero_point) * scale``) unless ``dequantize_outputs=False``.
* **Scalars.** torch scalars become shape ``[1]`` in TFLite; a size-1 feed is reshaped to the tensor's shape.

Parameters are only ever changed through graph inputs: ``set_tensor`` is never called on anything else
(on a constant weight it segfaults, see DESIGN.md). Instances are thread-safe (one lock around ``run``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BackendUnavailableError, InputError, ModelLoadError

log = logging.getLogger(__name__)

IO_NAMES_METADATA = "edgeloop_io_names"
DEFAULT_MAX_CACHED_BATCHES = 4
KERNELS = {"default": None, "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}

IoNames = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: its TFLite key and tensor index, static shape, dtype and quantization.

    ``batched`` inputs follow the fed batch size; ``scale``/``zero_point`` are None for float tensors.
    """

    key: str
    index: int
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: np.dtype
    scale: float | None
    zero_point: int | None
    batched: bool

    @property
    def quantized(self) -> bool:
        """Whether the tensor holds affine-quantized integers."""
        return self.scale is not None


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise BackendUnavailableError(
            "the LiteRT backend needs ai-edge-litert: pip install 'edgeloop[litert]'"
        ) from exc
    return Interpreter


def read_io_names_metadata(model: bytes) -> dict[str, dict[str, str]] | None:
    """The ``io_names`` mapping stored in the model's metadata entry :data:`IO_NAMES_METADATA`, or None."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:
        raise BackendUnavailableError("reading TFLite metadata needs ai-edge-litert") from exc
    root = schema.Model.GetRootAs(bytearray(model), 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry is None or (entry.Name() or b"").decode("utf-8", "replace") != IO_NAMES_METADATA:
            continue
        buffer = root.Buffers(entry.Buffer())
        data = buffer.DataAsNumpy() if buffer is not None else 0
        if isinstance(data, int):  # the flatbuffers API returns 0 for an empty vector
            raise ModelLoadError(f"TFLite metadata {IO_NAMES_METADATA!r} has no data")
        return _checked_io_names(json.loads(bytes(data).decode("utf-8")))
    return None


def _checked_io_names(raw: Any) -> dict[str, dict[str, str]]:
    if not isinstance(raw, Mapping):
        raise InputError(f"io_names must be a mapping with 'inputs' and 'outputs', got {type(raw).__name__}")
    out: dict[str, dict[str, str]] = {}
    for side in ("inputs", "outputs"):
        part = raw.get(side, {})
        if not isinstance(part, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in
                                                    part.items()):
            raise InputError(f"io_names[{side!r}] must map logical names to TFLite names, got {part!r}")
        if len(set(part.values())) != len(part):
            raise InputError(f"io_names[{side!r}] maps two logical names to one TFLite tensor: {dict(part)}")
        out[side] = dict(part)
    return out


def _tensor_info(key: str, d: Mapping[str, Any], static_batch: int | None) -> TensorInfo:
    qp = d.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", []), dtype=np.float64)
    zeros = np.asarray(qp.get("zero_points", []), dtype=np.int64)
    if scales.size > 1:
        raise ModelLoadError(f"TFLite tensor {key!r} is quantized per axis; graph inputs/outputs must not be")
    shape = tuple(int(s) for s in d["shape"])
    signature = tuple(int(s) for s in d.get("shape_signature", shape))
    batched = len(shape) >= 2 and (signature[0] == -1 or shape[0] == static_batch)
    scale = float(scales[0]) if scales.size == 1 and scales[0] > 0 else None
    return TensorInfo(key=key, index=int(d["index"]), shape=shape, shape_signature=signature,
                      dtype=np.dtype(d["dtype"]), scale=scale, zero_point=int(zeros[0]) if scale else None,
                      batched=batched)


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Real values ``x`` as ``info``'s quantized integers (round half to even, clipped to the dtype's range)."""
    if info.scale is None or info.zero_point is None:
        raise InputError(f"tensor {info.key!r} is not quantized")
    limits = np.iinfo(info.dtype)
    q = np.rint(np.asarray(x, dtype=np.float64) / info.scale) + info.zero_point
    return np.clip(q, limits.min, limits.max).astype(info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Quantized integers ``q`` of ``info`` as float32 real values."""
    if info.scale is None or info.zero_point is None:
        raise InputError(f"tensor {info.key!r} is not quantized")
    return ((q.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)).astype(np.float32)


class LiteRTSession:
    """A LiteRT interpreter behind the :class:`runtime.session.Session` interface (numpy by logical name).

    ``path``: a ``.tflite`` file, or the model's bytes (e.g. decoded from a packed bundle file); ``threads``:
    interpreter threads (None: LiteRT's default); ``io_names``:
    logical-name mapping (default: the model's metadata, else the TFLite names themselves);
    ``signature``: which signature to use when the model has several; ``kernels``: ``"default"`` (LiteRT's
    default, XNNPACK on CPU), ``"builtin"`` (built-in kernels, no delegate) or ``"reference"`` (reference
    kernels): the last two exist to measure how much int8 results depend on the kernels.
    """

    def __init__(
        self,
        path: Path | str | bytes,
        threads: int | None = None,
        io_names: IoNames | None = None,
        *,
        signature: str | None = None,
        dequantize_outputs: bool = True,
        max_cached_batches: int = DEFAULT_MAX_CACHED_BATCHES,
        kernels: str = "default",
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_cached_batches < 1:
            raise ValueError(f"max_cached_batches must be >= 1, got {max_cached_batches}")
        if isinstance(path, bytes):
            self.path, self._model = Path(f"<{len(path)}-byte TFLite model>"), path
        else:
            self.path = Path(path)
            try:
                self._model = self.path.read_bytes()
            except OSError as exc:
                raise ModelLoadError(f"LiteRT cannot read {self.path}: {exc}") from exc
        self._cls = _interpreter_class()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {sorted(KERNELS)}, got {kernels!r}")
        self._resolver: dict[str, Any] = {}
        if KERNELS[kernels] is not None:
            from ai_edge_litert.interpreter import OpResolverType

            self._resolver = {"experimental_op_resolver_type": getattr(OpResolverType, KERNELS[kernels])}
        self._threads = threads
        self._dequantize = dequantize_outputs
        self._max_cached = max_cached_batches
        base = self._new_interpreter()
        names = _checked_io_names(io_names) if io_names is not None else read_io_names_metadata(self._model)
        self._inputs, self._outputs = self._describe(base, signature, names or {"inputs": {}, "outputs": {}})
        batched = [i for i in self._inputs.values() if i.batched]
        self.static_batch: int | None = batched[0].shape[0] if batched else None
        self.input_names = list(self._inputs)
        self.output_names = list(self._outputs)
        self._interpreters: OrderedDict[int | None, Any] = OrderedDict({self.static_batch: base})
        # per interpreter (by batch), the immutable arrays its inputs were last set from: TFLite never overwrites
        # graph inputs, so feeding the same one again (a model's parameters, call after call) needs no copy
        self._fed: dict[int | None, dict[str, np.ndarray]] = {}
        self._checked: dict[str, np.ndarray] = {}  # per input, the last immutable array that passed _prepare as is
        self._lock = threading.Lock()

    def _new_interpreter(self) -> Any:
        try:
            interp = self._cls(model_content=self._model, num_threads=self._threads, **self._resolver)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load {self.path}: {exc}") from exc
        return interp

    def _describe(
        self, interp: Any, signature: str | None, names: IoNames
    ) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
        """Logical name → :class:`TensorInfo` for inputs and outputs, in the model's tensor order."""
        ins = {d["name"]: d for d in interp.get_input_details()}
        outs = {d["name"]: d for d in interp.get_output_details()}
        sigs = interp.get_signature_list()
        if sigs:
            if signature is None and len(sigs) > 1:
                raise ModelLoadError(f"{self.path} has signatures {sorted(sigs)}; choose one")
            runner = interp.get_signature_runner(signature)
            ins, outs = runner.get_input_details(), runner.get_output_details()
            primary = {d["index"] for d in interp.get_input_details()}
            if {d["index"] for d in ins.values()} != primary:
                raise ModelLoadError(f"{self.path}: signature {signature!r} is not the primary subgraph")
        elif signature is not None:
            raise ModelLoadError(f"{self.path} has no signatures; asked for {signature!r}")
        batch_dims = {int(d["shape"][0]) for d in ins.values() if len(d["shape"]) >= 2}
        static_batch = batch_dims.pop() if len(batch_dims) == 1 else None
        result = []
        for side, details in (("inputs", ins), ("outputs", outs)):
            to_logical = {key: logical for logical, key in names.get(side, {}).items()}
            unknown = sorted(set(to_logical) - set(details))
            if unknown:
                raise ModelLoadError(f"{self.path}: io_names {side} {unknown} are not in {sorted(details)}")
            infos = [(to_logical.get(k, k), _tensor_info(k, d, static_batch)) for k, d in details.items()]
            result.append(dict(sorted(infos, key=lambda item: item[1].index)))
        return result[0], result[1]

    def input_info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of logical input ``name``."""
        if name not in self._inputs:
            raise InputError(f"unknown input {name!r}; inputs are {self.input_names}")
        return self._inputs[name]

    def output_info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of logical output ``name``."""
        if name not in self._outputs:
            raise InputError(f"unknown output {name!r}; outputs are {self.output_names}")
        return self._outputs[name]

    def _prepare(self, name: str, value: np.ndarray) -> np.ndarray:
        info = self._inputs[name]
        arr = np.asarray(value)
        if (arr.dtype == info.dtype and arr.flags.c_contiguous and not info.quantized and arr.ndim == len(info.shape)
                and (arr.shape[1:] == info.shape[1:] if info.batched else arr.shape == info.shape)):
            return arr  # the common case, checked in one go (this runs for every input of every call)
        if arr.shape != info.shape and arr.size == 1 and int(np.prod(info.shape)) == 1:
            arr = arr.reshape(info.shape)  # torch scalar exported as [1]
        if arr.ndim != len(info.shape):
            raise InputError(f"input {name!r} has rank {arr.ndim}, graph expects {len(info.shape)} {list(info.shape)}")
        fixed = info.shape[1:] if info.batched else info.shape
        got = arr.shape[1:] if info.batched else arr.shape
        if got != fixed:
            raise InputError(f"input {name!r} has shape {arr.shape}, graph expects {list(info.shape)}")
        if info.quantized and arr.dtype != info.dtype:
            return quantize(arr, info)
        if arr.dtype != info.dtype:
            if np.issubdtype(info.dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"input {name!r} is {arr.dtype}; the graph wants integers ({info.dtype})")
            arr = arr.astype(info.dtype)
        return np.require(arr, requirements="C")  # not ascontiguousarray: that makes a 0-d array 1-d

    def _interpreter_for(self, batch: int | None) -> Any:
        """The interpreter whose batched inputs have ``batch`` rows (created, resized and cached on demand)."""
        if batch in self._interpreters:
            self._interpreters.move_to_end(batch)
            return self._interpreters[batch]
        interp = self._new_interpreter()
        try:
            for info in self._inputs.values():
                if info.batched:
                    interp.resize_tensor_input(info.index, [batch, *info.shape[1:]])
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{self.path.name} cannot run at batch size {batch}: {exc}") from exc
        self._interpreters[batch] = interp
        self._fed.pop(batch, None)
        while len(self._interpreters) > self._max_cached:
            evicted, _ = self._interpreters.popitem(last=False)
            self._fed.pop(evicted, None)
            log.debug("evicted the batch-%s interpreter of %s", evicted, self.path.name)
        return interp

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with ``feeds`` (exactly the graph's logical inputs); return every output by logical name."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._inputs]
        if missing or extra:
            raise InputError(f"graph inputs missing {missing}, unknown {extra}")
        return self.run_checked(feeds)

    def run_checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` for feeds that name exactly the graph's logical inputs (the caller checked them, e.g.
        :class:`runtime.model.AdaptableModel`); each value is still prepared and checked against its tensor."""
        checked = self._checked
        arrays = {name: value if checked.get(name) is value else self._prepare(name, value)
                  for name, value in feeds.items()}
        batches = {arr.shape[0] for name, arr in arrays.items() if self._inputs[name].batched}
        if len(batches) > 1:
            raise InputError(f"batched inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop() if batches else self.static_batch
        if batch is not None and batch < 1:
            raise InputError("the batch is empty")
        with self._lock:
            interp = self._interpreter_for(batch)
            fed = self._fed.setdefault(batch, {})
            for name, arr in arrays.items():
                if fed.get(name) is arr:
                    continue  # this very immutable array is already in the input tensor
                interp.set_tensor(self._inputs[name].index, arr)
                if _immutable(arr):
                    fed[name] = checked[name] = arr  # kept alive here, so its identity cannot pass to another array
                else:
                    fed.pop(name, None)
            interp.invoke()
            raw = {name: interp.get_tensor(info.index) for name, info in self._outputs.items()}
        if not self._dequantize:
            return raw
        return {n: dequantize(v, self._outputs[n]) if self._outputs[n].quantized else v for n, v in raw.items()}


def _immutable(arr: np.ndarray) -> bool:
    """Whether ``arr``'s values cannot change behind this session's back: read-only and owning its memory (a
    read-only view may look at memory someone else still writes)."""
    return not arr.flags.writeable and arr.flags.owndata
