"""The rewrite behind :mod:`exporter.onnx_graph`: each ``edgeloop::AlphaNorm`` marker into standard ONNX nodes.

Graph-editing helpers (producer/consumer maps, fresh names, shared constants), the expansion of one marker
(shift, moments, mix, normalisation, pool-first under an ``If``), :func:`expand_alpha_norms` for the
whole graph and :func:`split_batch_statistics` for the opt-in graph whose statistics come from the first k
samples. Everything here is plain ``onnx``; the choices and their measurements are in :mod:`exporter.onnx_graph`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.checks import require_optional_int

MARKER_DOMAIN = "edgeloop"
MARKER_OP = "AlphaNorm"


class GraphBuildError(RuntimeError):
    """The traced graph does not have the shape the lean rewrite expects (the caller may fall back)."""


@dataclass(frozen=True)
class LeanOptions:
    """Which rewrites :func:`expand_alpha_norms` applies (defaults: what measured fastest; the rest for ablations).

    ``shift``: subtract the source running mean through the producing convolution's bias; ``pool_first``:
    normalise after max pooling when γ ≥ 0 (guarded by an ``If``); ``gap_stats``: moments by
    ``GlobalAveragePool`` (else ``ReduceMean`` over (N, H, W)); ``mean_through_conv``: E[z] from the
    convolution of the batch-mean input where that input is at most half z's size (off: within noise, and
    it adds a convolution node that the int8 pass would quantize too). ``statistics=False``
    builds the reduced α = 0 graph: no batch statistics, no ``bnK.batch_*`` outputs, normalisation by the
    fed ``bnK.mean``/``bnK.var`` whatever α is (for measurements and a stats-free fast path).
    ``stats_samples=k`` (opt-in, off by default: it changes what ``bnK.batch_*`` are) takes the batch
    statistics from the first k samples of the batch only (all of them when the batch has at most k): the
    batch runs as two streams, the first k samples with statistics and the rest normalised by the same mixed
    statistics (see :func:`split_batch_statistics`).
    """

    shift: bool = True
    pool_first: bool = True
    gap_stats: bool = True
    mean_through_conv: bool = False
    statistics: bool = True
    stats_samples: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats_samples", require_optional_int("stats_samples", self.stats_samples, 1))
        if self.stats_samples is not None and not self.statistics:
            raise ValueError("stats_samples needs statistics=True (a graph without statistics has none to sample)")


# -- graph editing --------------------------------------------------------------------------------------------
class _Editor:
    """Producer/consumer maps, fresh names and new initializers over one ONNX graph."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.graph = proto.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {out: n for n in self.graph.node for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        inferred = onnx.shape_inference.infer_shapes(proto).graph
        self.types = {v.name: v.type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
        self._ids = itertools.count()
        self.drop: set[str] = set()  # first outputs of nodes an expansion replaced
        self._zero: str | None = None
        self._flat: str | None = None
        self._int_zero: str | None = None

    def sample_size(self, tensor: str) -> int | None:
        """Elements of one sample of ``tensor`` (the product of its static non-batch dims), or None."""
        t = self.types.get(tensor)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim[1:]
        if not dims or any(not d.HasField("dim_value") for d in dims):
            return None
        return int(np.prod([d.dim_value for d in dims]))

    def flat_shape(self) -> str:
        """The name of a shared int64 ``[-1]`` initializer (a Reshape target that flattens)."""
        if self._flat is None:
            self._flat = self.name("flat_shape")
            tensor = numpy_helper.from_array(np.array([-1], dtype=np.int64), self._flat)
            self.graph.initializer.append(tensor)
            self.inits[self._flat] = tensor
        return self._flat

    def int_zero(self) -> str:
        """The name of a shared int64 scalar 0 initializer."""
        if self._int_zero is None:
            self._int_zero = self.name("int_zero")
            tensor = numpy_helper.from_array(np.array(0, dtype=np.int64), self._int_zero)
            self.graph.initializer.append(tensor)
            self.inits[self._int_zero] = tensor
        return self._int_zero

    def zero(self) -> str:
        """The name of a shared float32 scalar 0 initializer."""
        if self._zero is None:
            self._zero = self.constant("zero", np.array(0.0, dtype=np.float32))
        return self._zero

    def name(self, hint: str) -> str:
        """A new unique tensor name."""
        return f"{hint}__{next(self._ids)}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        """A new float32 initializer; returns its name."""
        name = self.name(hint)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The single node reading ``tensor`` when it is not also a graph output, else None."""
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def value_info(self, name: str, tensor: str) -> onnx.ValueInfoProto:
        """A value info called ``name`` with the inferred type of ``tensor``."""
        if tensor not in self.types:
            raise GraphBuildError(f"no inferred type for {tensor!r}")
        info = onnx.ValueInfoProto()
        info.name = name
        info.type.CopyFrom(self.types[tensor])
        return info


class _Emitter:
    """Collects the nodes of one marker's expansion; ``op`` returns the new node's output names."""

    def __init__(self, editor: _Editor, prefix: str) -> None:
        self.ed = editor
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: object) -> str:
        """Add one single-output node; its output is ``out`` or a fresh name."""
        output = out or self.ed.name(f"{self.prefix}/{op_type}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.ed.name(self.prefix), **attrs))
        return output


# -- one marker -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Marker:
    """A marker node's tensors: input z, the fed γ, β, μ_ref, σ²_ref and α, outputs y, μ_b, σ²_b."""

    node: onnx.NodeProto
    layer: str
    eps: float

    @classmethod
    def parse(cls, node: onnx.NodeProto) -> _Marker:
        """Check arity and output names (``<layer>.batch_mean``/``.batch_var``)."""
        if len(node.input) != 6 or len(node.output) != 3:
            raise GraphBuildError(f"marker {node.name!r} has {len(node.input)} inputs, {len(node.output)} outputs")
        layer = node.output[1].removesuffix(".batch_mean")
        if node.output[1] == layer or node.output[2] != f"{layer}.batch_var":
            raise GraphBuildError(f"marker {node.name!r} outputs {list(node.output)} are not graph statistics")
        eps = next((a.f for a in node.attribute if a.name == "eps"), None)
        if eps is None:
            raise GraphBuildError(f"marker {node.name!r} has no eps attribute")
        return cls(node, layer, float(eps))

    def __getattr__(self, item: str) -> str:
        inputs = ("z", "weight", "bias", "mean", "var", "alpha")
        if item in inputs:
            return str(self.node.input[inputs.index(item)])
        outputs = ("y", "batch_mean", "batch_var")
        if item in outputs:
            return str(self.node.output[outputs.index(item)])
        raise AttributeError(item)


def _shift_conv(ed: _Editor, mk: _Marker, shift: np.ndarray | None) -> np.ndarray | None:
    """Subtract ``shift`` from z through its producing Conv's bias; the shift applied, or None if none was."""
    conv = ed.producer.get(mk.z)
    if shift is None or conv is None or conv.op_type != "Conv" or conv.input[1] not in ed.inits:
        return None
    if ed.consumers.get(mk.z, []) != [mk.node] or mk.z in ed.outputs:
        return None
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    if has_bias and conv.input[2] not in ed.inits:
        return None  # a computed bias: leave the convolution alone
    old = numpy_helper.to_array(ed.inits[conv.input[2]]) if has_bias else 0.0
    bias = ed.constant(f"{mk.layer}/conv_bias", np.asarray(old, dtype=np.float32) - shift.astype(np.float32))
    if len(conv.input) > 2:
        conv.input[2] = bias
    else:
        conv.input.append(bias)
    return shift.astype(np.float32)


def _channel_mean(em: _Emitter, pooled: str) -> str:
    """(N, C, 1, 1) → (C,), the mean over N (a flat ``ReduceMean`` over axis 0 is onnxruntime's fast case)."""
    return em.op("ReduceMean", [em.op("Flatten", [pooled])], axes=[0], keepdims=0)


def _mean_through_conv(ed: _Editor, em: _Emitter, z: str) -> str | None:
    """E[z] as the convolution of the batch-mean input, when z = Conv(x) and x has at most half z's elements.

    A convolution is affine in its input, so the mean of its outputs over (N, H, W) is the spatial mean of
    the convolution of the mean input image (zero padding is the same for every sample): one read of x
    and a one-image convolution instead of a read of z.
    """
    conv = ed.producer.get(z)
    if conv is None or conv.op_type != "Conv":
        return None
    x_size, z_size = ed.sample_size(conv.input[0]), ed.sample_size(z)
    if x_size is None or z_size is None or 2 * x_size > z_size:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    image = em.op("ReduceMean", [conv.input[0]], axes=[0], keepdims=1)
    mapped = em.op("Conv", [image, *conv.input[1:]], **attrs)
    return em.op("Reshape", [em.op("GlobalAveragePool", [mapped]), ed.flat_shape()])


def _moments(ed: _Editor, em: _Emitter, z: str, options: LeanOptions) -> tuple[str, str]:
    """E[z] and E[z²] over (N, H, W), each of shape (C,)."""
    if not options.gap_stats:
        mean = em.op("ReduceMean", [z], axes=[0, 2, 3], keepdims=0)
        return mean, em.op("ReduceMean", [em.op("Mul", [z, z])], axes=[0, 2, 3], keepdims=0)
    mean = _mean_through_conv(ed, em, z) if options.mean_through_conv else None
    if mean is None:
        mean = _channel_mean(em, em.op("GlobalAveragePool", [z]))
    square = em.op("Mul", [z, z])  # with pool-first, z's last reader: the squares may reuse z's buffer
    return mean, _channel_mean(em, em.op("GlobalAveragePool", [square]))


def _statistics(ed: _Editor, em: _Emitter, mk: _Marker, shift: str | None, options: LeanOptions) -> str:
    """Emit μ_b and σ²_b under the marker's output names; return the mean of the (shifted) z."""
    mean, second = _moments(ed, em, mk.z, options)
    em.op("Relu", [em.op("Sub", [second, em.op("Mul", [mean, mean])])], out=mk.batch_var)
    if shift is None:
        em.op("Identity", [mean], out=mk.batch_mean)
    else:
        em.op("Add", [mean, shift], out=mk.batch_mean)
    return mean


def _mixed(em: _Emitter, mk: _Marker, shifted_mean: str, shift: str | None) -> tuple[str, str]:
    """The α-mixed mean (of the shifted z) and variance: ref + α·(batch − ref)."""
    ref_mean = mk.mean if shift is None else em.op("Sub", [mk.mean, shift])
    mean = em.op("Add", [ref_mean, em.op("Mul", [mk.alpha, em.op("Sub", [shifted_mean, ref_mean])])])
    var = em.op("Add", [mk.var, em.op("Mul", [mk.alpha, em.op("Sub", [mk.batch_var, mk.var])])])
    return mean, var


def _pool_chain(ed: _Editor, mk: _Marker) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The ``Relu`` and ``MaxPool`` nodes when y feeds only a Relu that feeds only a plain MaxPool."""
    relu = ed.only_consumer(mk.y)
    if relu is None or relu.op_type != "Relu":
        return None
    pool = ed.only_consumer(relu.output[0])
    if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1:
        return None
    return relu, pool


def _normalize(em: _Emitter, mk: _Marker, x: str, mean: str, var: str, out: str | None = None) -> str:
    return em.op("BatchNormalization", [x, mk.weight, mk.bias, mean, var], out=out, epsilon=mk.eps)


def _recompute(ed: _Editor, em: _Emitter, z: str) -> str:
    """z again inside a branch: its producing Conv re-run there when it reads only outer names, else z itself.

    Reading z from a branch makes onnxruntime convert the convolution's blocked (NCHWc) output for the ``If``
    on every run, taken branch or not; re-running the Conv in the rarely taken branch costs nothing otherwise.
    """
    conv = ed.producer.get(z)
    if conv is None or conv.op_type != "Conv":
        return z
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    return em.op("Conv", list(conv.input), **attrs)


def _pool_first(ed: _Editor, em: _Emitter, mk: _Marker, z: str, pooled: str, stats: tuple[str, str],
                chain: tuple[onnx.NodeProto, onnx.NodeProto]) -> None:
    """``MaxPool → BN → ReLU`` when min(γ) ≥ 0, else the original ``BN → ReLU → MaxPool``, via an ``If``.

    With γ ≥ 0 the normalisation is a non-decreasing map per channel, so it commutes with max pooling (and
    ReLU does too). The pooled BN runs before the ``If`` and its shape feeds the condition: tools that sort
    nodes by their explicit inputs only (onnxruntime's quantizer does) then keep the ``If`` after every
    value its branches read.
    """
    relu, pool = chain
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    normalized = _normalize(em, mk, pooled, *stats)
    nonneg = em.op("GreaterOrEqual", [em.op("ReduceMin", [mk.weight], keepdims=0), ed.zero()])
    rows = em.op("Greater", [em.op("Shape", [normalized], start=0, end=1), ed.int_zero()])
    cond = em.op("And", [nonneg, rows])
    fast, slow = _Emitter(ed, f"{mk.layer}/pool_first"), _Emitter(ed, f"{mk.layer}/pool_last")
    fast_out = fast.op("Relu", [normalized])
    slow_out = slow.op("MaxPool", [slow.op("Relu", [_normalize(slow, mk, _recompute(ed, slow, z), *stats)])],
                       **attrs)
    branches = []
    for emitter, result in ((fast, fast_out), (slow, slow_out)):
        out = ed.value_info(result, pool.output[0])
        branches.append(helper.make_graph(emitter.nodes, ed.name(emitter.prefix), [], [out]))
    em.nodes.append(helper.make_node("If", [cond], [pool.output[0]], name=ed.name(f"{mk.layer}/If"),
                                     then_branch=branches[0], else_branch=branches[1]))
    ed.drop.update({relu.output[0], pool.output[0]})


def _expand(ed: _Editor, mk: _Marker, source_mean: np.ndarray | None, options: LeanOptions) -> list[onnx.NodeProto]:
    """The nodes replacing one marker (and, with pool-first, the Relu and MaxPool after it)."""
    em = _Emitter(ed, mk.layer)
    applied = _shift_conv(ed, mk, source_mean if options.shift and options.statistics else None)
    shift = None if applied is None else ed.constant(f"{mk.layer}/shift", applied)
    z = mk.z
    chain = _pool_chain(ed, mk) if options.pool_first else None
    pooled = None
    if chain is not None:  # pool before the squares, so z's buffer is free for them (in-place Mul)
        pooled = em.op("MaxPool", [z], **{a.name: helper.get_attribute_value(a) for a in chain[1].attribute})
    stats = (mk.mean, mk.var)  # without statistics: the fed reference, whatever α is
    if options.statistics:
        stats = _mixed(em, mk, _statistics(ed, em, mk, shift, options), shift)
    if chain is None or pooled is None:
        _normalize(em, mk, z, *stats, out=mk.y)
    else:
        _pool_first(ed, em, mk, z, pooled, stats, chain)
    return em.nodes


# -- the whole graph ------------------------------------------------------------------------------------------
def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs, or returned by ``graph``."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(attr.g)
    return names


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers nothing reads any more (e.g. a convolution bias the shift replaced)."""
    used = _names_read(graph)
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def expand_alpha_norms(
    proto: onnx.ModelProto, source_means: Mapping[str, np.ndarray], options: LeanOptions | None = None
) -> onnx.ModelProto:
    """Replace every marker of a :func:`trace_marked` graph in place; returns ``proto``.

    ``source_means`` maps layer names (``bn1``…) to the constant each layer's activations are shifted by.
    Raises :class:`GraphBuildError` when a marker is malformed or none is found.
    """
    options = options or LeanOptions()
    ed = _Editor(proto)
    nodes: list[onnx.NodeProto] = []
    markers = 0
    for node in list(proto.graph.node):
        if node.output and node.output[0] in ed.drop:
            continue
        if node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP:
            mk = _Marker.parse(node)
            nodes.extend(_expand(ed, mk, source_means.get(mk.layer), options))
            markers += 1
        else:
            nodes.append(node)
    if markers == 0:
        raise GraphBuildError("the traced graph holds no normalisation marker")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto.graph)
    del proto.graph.value_info[:]
    if not options.statistics:
        outputs = [o for o in proto.graph.output if not o.name.endswith((".batch_mean", ".batch_var"))]
        del proto.graph.output[:]
        proto.graph.output.extend(outputs)
    kept = [o for o in proto.opset_import if o.domain != MARKER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    if options.stats_samples is not None:
        split_batch_statistics(proto, options.stats_samples)
    return proto


# -- statistics from the first k samples: the batch as two streams --------------------------------------------
STATS_SAMPLES_KEY = "edgeloop.stats_samples"
"""``metadata_props`` key of a graph whose batch statistics come from the first k samples (value: k)."""

_BATCH_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"})


def _reduces_batch(node: onnx.NodeProto) -> bool:
    """True for a reduction whose ``axes`` attribute includes the batch axis (its output is per channel)."""
    if node.op_type not in _BATCH_REDUCTIONS:
        return False
    axes = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)
    return axes is not None and 0 in axes


def _outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads: its inputs and, for nodes with subgraphs, the outer names the subgraphs read."""
    names = list(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in attr.g.node for o in n.output}
            names.extend(n for n in _names_read(attr.g) if n not in inner)
    return names


def _renamed_graph(graph: onnx.GraphProto, rename: Mapping[str, str], suffix: str, batch: tuple[str, str]
                   ) -> onnx.GraphProto:
    """A copy of a subgraph with outer names mapped by ``rename``, every name it defines given ``suffix`` and
    the symbolic batch dimension ``batch[0]`` of its declared types renamed ``batch[1]``."""
    inner = {o for n in graph.node for o in n.output}
    local = {**rename, **{name: f"{name}{suffix}" for name in inner}}
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    out.name = f"{graph.name}{suffix}"
    del out.node[:]
    out.node.extend(_renamed_node(n, local, suffix, batch) for n in graph.node)
    for value in [*out.output, *out.value_info]:
        value.name = local.get(value.name, value.name)
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == batch[0]:
                dim.dim_param = batch[1]
    return out


def _renamed_node(node: onnx.NodeProto, rename: Mapping[str, str], suffix: str, batch: tuple[str, str]
                  ) -> onnx.NodeProto:
    """A copy of ``node`` with inputs and outputs mapped by ``rename`` (subgraphs included, see
    :func:`_renamed_graph`)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.name = f"{node.name}{suffix}"
    out.input[:] = [rename.get(n, n) for n in node.input]
    out.output[:] = [rename.get(n, n) for n in node.output]
    for attr in out.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            attr.g.CopyFrom(_renamed_graph(attr.g, rename, suffix, batch))
    return out


def split_batch_statistics(proto: onnx.ModelProto, samples: int) -> onnx.ModelProto:
    """Take an expanded lean graph's batch statistics from its first ``samples`` samples; returns ``proto``.

    The input is sliced into the first ``samples`` samples (stream A, the graph as it is) and the rest
    (stream B: a copy of every node that carries a batch, renamed, which reads the per-channel tensors of
    stream A — the statistics, their α-mix — instead of computing its own). ``logits`` and ``features``
    are the two streams' outputs concatenated in order; the ``bnK.batch_*`` outputs are those of stream A.
    A batch of at most ``samples`` samples leaves stream B empty, and is exactly the unsplit graph. The
    graph records ``samples`` in its ``metadata_props`` (:data:`STATS_SAMPLES_KEY`).
    """
    graph = proto.graph
    source = graph.input[0].name
    a_in, b_in = f"{source}__first", f"{source}__rest"
    batched = {source}
    cloned: list[onnx.NodeProto] = []
    for node in graph.node:
        if any(n in batched for n in _outer_reads(node)) and not _reduces_batch(node):
            batched.update(o for o in node.output if o)
            cloned.append(node)
    outputs = [o.name for o in graph.output if o.name in batched]
    a_names = {source: a_in, **{o: f"{o}__a" for o in outputs}}
    b_names = {name: f"{name}__b" for name in batched} | {source: b_in}
    # each stream's batch is its own size: the subgraphs' declared types must not share the input's symbol
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    stream_a = [_renamed_node(n, a_names, "", (symbol, f"{symbol}_first")) for n in graph.node]
    stream_b = [_renamed_node(n, b_names, "__b", (symbol, f"{symbol}_rest")) for n in cloned]
    # stream B's statistics nodes (read only by stream A's per-channel reductions) are dead: drop them
    wanted = {b_names[o] for o in outputs}
    live: list[onnx.NodeProto] = []
    for node in reversed(stream_b):
        if any(o in wanted for o in node.output):
            live.append(node)
            wanted.update(_outer_reads(node))
    ints = {name: numpy_helper.from_array(np.array([v], dtype=np.int64), f"{source}__{name}")
            for name, v in (("zero", 0), ("k", samples), ("end", np.iinfo(np.int64).max))}
    graph.initializer.extend(ints.values())
    first, k, end = (t.name for t in ints.values())
    prelude = [helper.make_node("Slice", [source, first, k, first], [a_in], name=f"{source}/first"),
               helper.make_node("Slice", [source, k, end, first], [b_in], name=f"{source}/rest")]
    joins = [helper.make_node("Concat", [a_names[o], b_names[o]], [o], name=f"{o}/concat", axis=0) for o in outputs]
    del graph.node[:]
    graph.node.extend([*prelude, *stream_a, *reversed(live), *joins])
    entry = next((p for p in proto.metadata_props if p.key == STATS_SAMPLES_KEY), None) or proto.metadata_props.add()
    entry.key, entry.value = STATS_SAMPLES_KEY, str(samples)
    for value in graph.output:
        if value.name.endswith((".batch_mean", ".batch_var")):
            value.doc_string = f"over the first {samples} samples of the batch (all of a smaller batch)"
    return proto
