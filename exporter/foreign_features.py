"""The penultimate-features output of a foreign model: found in the graph and added as a model output.

``features="auto"`` walks back from the class-score output through ops that do not mix features
(Softmax, Reshape, (De)Quantize, a bias Add, Identity) to the last FullyConnected / Gemm / MatMul and takes
its data input; a tensor name picks the tensor explicitly. The tensor must be (N, D) at run time.

* ONNX: an ``Identity`` node copies the tensor to a new graph output ``features``.
* TFLite: the tensor joins the primary subgraph's outputs (the flatbuffer is rewritten with
  ``ai_edge_litert``'s object API) and, when the model has a SignatureDef, the signature gains an output
  ``features``. A quantized tensor stays quantized: the runtime dequantizes outputs.

No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES = "features"
AUTO = "auto"
_ONNX_PASS = {"Softmax", "LogSoftmax", "Reshape", "Flatten", "Identity", "DequantizeLinear", "QuantizeLinear",
              "Sigmoid", "Add"}
_ONNX_DENSE = {"Gemm", "MatMul"}
_TFLITE_PASS = ("SOFTMAX", "LOG_SOFTMAX", "RESHAPE", "DEQUANTIZE", "QUANTIZE", "LOGISTIC", "SQUEEZE")
_TFLITE_DENSE = ("FULLY_CONNECTED", "BATCH_MATMUL")
_LISTED = 60  # tensor names quoted in an error at most


class ForeignModelError(ValueError):
    """The foreign model cannot be wrapped: unsupported, or it does not match the given spec."""


@dataclass(frozen=True)
class AddedFeatures:
    """The rewritten model, the features tensor's name in the source graph and its output key."""

    data: bytes
    tensor: str
    key: str


def _available(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_LISTED])
    return shown + (f", … {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _unknown(features: str, where: str, names: list[str]) -> ForeignModelError:
    return ForeignModelError(f"{where} has no tensor {features!r} computed by the graph to use as features; "
                             f"available tensors: {_available(names)}")


def _not_found(where: str, walked: list[str], names: list[str]) -> ForeignModelError:
    return ForeignModelError(f"{where}: no FullyConnected/Gemm/MatMul produces the scores (walked back through "
                             f"{' <- '.join(walked)}); name the penultimate tensor with features=NAME "
                             f"(--features NAME; available tensors: {_available(names)}) or pass features=None "
                             "(--features none)")


# -- ONNX -----------------------------------------------------------------------------------------------------
def _onnx_constants(graph: Any) -> set[str]:
    """Initializers and every tensor computed from constants only (nodes are in topological order)."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in const for i in node.input if i)):
            const.update(node.output)
    return const


def _onnx_penultimate(graph: Any, score: str, where: str, names: list[str]) -> str:
    producers = {o: n for n in graph.node for o in n.output}
    const = _onnx_constants(graph)
    tensor, walked = score, [score]
    while (node := producers.get(tensor)) is not None:
        walked.append(node.op_type)
        data = [i for i in node.input if i and i not in const]
        if node.op_type in _ONNX_DENSE and data and node.input[0] == data[0]:
            return data[0]
        if node.op_type not in _ONNX_PASS or len(data) != 1:
            break
        tensor = data[0]
    raise _not_found(where, walked, names)


def onnx_with_features(proto: Any, score: str, features: str, where: str) -> tuple[Any, str]:
    """A copy of ``proto`` with a graph output :data:`FEATURES` (an Identity of the chosen tensor) and the
    chosen tensor's name."""
    import onnx
    from onnx import helper

    graph = proto.graph
    const = _onnx_constants(graph)
    names = [o for n in graph.node for o in n.output if o and o not in const]
    tensor = _onnx_penultimate(graph, score, where, names) if features == AUTO else features
    if tensor not in names:
        raise _unknown(tensor, where, names)
    taken = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {o for n in graph.node
                                                                                    for o in n.output}
    if FEATURES in taken:
        raise ForeignModelError(f"{where} already has a tensor named {FEATURES!r}; rename it or pass features=None "
                                "(--features none)")
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    info = inferred.get(tensor)
    elem = info.type.tensor_type.elem_type if info is not None else onnx.TensorProto.FLOAT
    if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise ForeignModelError(f"{where}: features tensor {tensor!r} is "
                                f"{onnx.helper.tensor_dtype_to_np_dtype(elem)}, not floating point; name a "
                                "float tensor (e.g. after DequantizeLinear)")
    dims: list[Any] = [None, None]
    if info is not None and info.type.tensor_type.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim]
        if len(dims) != 2:
            raise ForeignModelError(f"{where}: features tensor {tensor!r} has rank {len(dims)}; it must be (N, D)")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.node.append(helper.make_node("Identity", [tensor], [FEATURES], name=f"{FEATURES}_output"))
    copy.graph.output.append(helper.make_tensor_value_info(FEATURES, elem, dims))
    onnx.checker.check_model(copy)
    return copy, tensor


# -- TFLite ---------------------------------------------------------------------------------------------------
def _op_name(schema: Any, root: Any, op: Any) -> str:
    code = root.operatorCodes[op.opcodeIndex]
    value = max(code.builtinCode, code.deprecatedBuiltinCode)
    return next((k for k, v in vars(schema.BuiltinOperator).items() if v == value and not k.startswith("_")),
                str(value))


def _tflite_penultimate(schema: Any, root: Any, sub: Any, score: int, where: str, names: list[str]) -> int:
    producers = {int(o): op for op in sub.operators or [] for o in (op.outputs if op.outputs is not None else [])}
    tensor, walked = score, [sub.tensors[score].name.decode()]
    while (op := producers.get(tensor)) is not None:
        kind = _op_name(schema, root, op)
        walked.append(kind)
        if kind in _TFLITE_DENSE:
            return int(op.inputs[0])
        if kind not in _TFLITE_PASS:
            break
        tensor = int(op.inputs[0])
    raise _not_found(where, walked, names)


def tflite_with_features(data: bytes, score_key: str, features: str, where: str) -> AddedFeatures:
    """``data`` with the chosen tensor added to the primary subgraph's outputs (and its signature, as
    :data:`FEATURES`). ``score_key``: the score output's signature key, or tensor name without signature."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sub = root.subgraphs[0]
    tensor_names = [t.name.decode() for t in sub.tensors]
    produced = sorted({int(o) for op in sub.operators or [] for o in (op.outputs if op.outputs is not None else [])})
    names = [tensor_names[i] for i in produced]
    signature = next((s for s in root.signatureDefs or [] if s.subgraphIndex == 0), None)
    outputs = [int(i) for i in sub.outputs]
    if signature is not None:
        keys = {t.name.decode(): int(t.tensorIndex) for t in signature.outputs}
        if FEATURES in keys:
            raise ForeignModelError(f"{where}: signature already has an output {FEATURES!r}; pass features=None "
                                    "(--features none)")
        score = keys[score_key]
    else:
        score = next(i for i in outputs if tensor_names[i] == score_key)
    if features == AUTO:
        index = _tflite_penultimate(schema, root, sub, score, where, names)
    elif features in names:
        index = produced[names.index(features)]
    else:
        raise _unknown(features, where, names)
    if len(sub.tensors[index].shape) != 2:
        raise ForeignModelError(f"{where}: features tensor {tensor_names[index]!r} has shape "
                                f"{list(sub.tensors[index].shape)}; it must be (N, D)")
    if index not in outputs:
        sub.outputs = np.asarray([*outputs, index], dtype=np.int32)
    key = tensor_names[index]
    if signature is not None:
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = FEATURES, index
        signature.outputs.append(entry)
        key = FEATURES
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return AddedFeatures(bytes(builder.Output()), tensor_names[index], key)
