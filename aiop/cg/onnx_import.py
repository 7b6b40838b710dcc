"""ONNX → :class:`~aiop.cg.graph.ComputeGraph`.

Pipeline: load (external data included) → ``onnx.checker`` → fix the data
inputs' shapes (``input_shape``) → shape inference with data propagation →
constant folding (initializers, ``Constant``, ``Shape`` of static tensors and
every node whose inputs are all constant, evaluated with ONNX's reference
implementation) → keep the nodes that carry data from a graph input to a graph
output, bypassing ``Identity`` → one CG node per kept ONNX node.

Parameters are counted from the *initializers* a node's constant inputs derive
from (so a weight that the exporter transposed, cast or expanded is still
counted once, under its own name), which is also how CG nodes map back to a
PyTorch module's ``named_parameters()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper, shape_inference

from aiop.cg.flops import node_flops
from aiop.cg.graph import (
    SMALL_CONSTANT,
    CGError,
    ComputeGraph,
    ConstTensor,
    Edge,
    Node,
    TensorSpec,
)
from aiop.cg.vocab import OP_VOCAB

log = logging.getLogger(__name__)

# Input positions that carry shapes, axes or scalars rather than data.
_NON_DATA_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}),
    "Pad": frozenset({1, 2, 3}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Split": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "ReduceSum": frozenset({1}),
    "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}),
    "Clip": frozenset({1, 2}),
    "Dropout": frozenset({1, 2}),
    "TopK": frozenset({1}),
    "OneHot": frozenset({1, 2}),
    "ConstantOfShape": frozenset({0}),
}
# Inputs that are running statistics (buffers), not learned parameters.
_BUFFER_INPUTS: dict[str, frozenset[int]] = {"BatchNormalization": frozenset({3, 4})}
# Ops that disappear from the CG when their data input passes straight through.
_PASS_THROUGH = frozenset({"Identity"})
_WEIGHT_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
    }
)
_SOURCE_OP_ALIASES = {"Upsample": "Resize", "ReduceL2": "ReduceL2"}

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def load_onnx(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Load and validate an ONNX model from a path, raw bytes or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        if not model:
            raise CGError("empty ONNX data (0 bytes)")
        try:
            proto = onnx.load_from_string(bytes(model))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise CGError(f"not an ONNX model: {_first_line(exc)}") from None
    else:
        path = Path(model)
        if not path.is_file():
            raise CGError(f"no such file: {path}")
        if path.stat().st_size == 0:
            raise CGError(f"{path}: empty file")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except (DecodeError, ValueError, RuntimeError, OSError) as exc:
            raise CGError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node:
        raise CGError("the ONNX model has no graph nodes (empty, truncated or not ONNX)")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CGError(f"invalid ONNX model: {_first_line(exc)}") from None
    return proto


def from_onnx(
    model: str | Path | bytes | onnx.ModelProto,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    name: str | None = None,
) -> ComputeGraph:
    """Build a :class:`ComputeGraph` from an ONNX model.

    ``input_shape`` fixes the shape of the data input (one shape) or of every
    data input (a list of shapes), replacing symbolic dimensions; it is
    required when the file's inputs have no static shape.
    """
    proto = load_onnx(model)
    if name is None:
        name = Path(model).stem if isinstance(model, (str, Path)) else proto.graph.name
    return _Importer(proto, input_shape, name or "").run()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


@dataclass
class _TensorInfo:
    shape: tuple[int, ...] | None
    dtype: str


@dataclass
class _Const:
    value: np.ndarray | None  # None when constant but not evaluated
    origins: frozenset[str] = field(default_factory=frozenset)  # initializer names


class _Importer:
    def __init__(
        self,
        proto: onnx.ModelProto,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
        name: str,
    ) -> None:
        self.proto = proto
        self.input_shape = input_shape
        self.name = name
        self.info: dict[str, _TensorInfo] = {}
        self.consts: dict[str, _Const] = {}
        self.init_sizes: dict[str, int] = {}

    # -- steps --------------------------------------------------------------
    def run(self) -> ComputeGraph:
        graph = self.proto.graph
        init_names = {t.name for t in graph.initializer}
        data_inputs = [i for i in graph.input if i.name not in init_names]
        if not data_inputs:
            raise CGError("the ONNX graph has no data inputs (every input is an initializer)")
        self._fix_input_shapes(data_inputs)
        self._infer_shapes()
        for t in graph.initializer:
            arr = numpy_helper.to_array(t) if t.data_type != onnx.TensorProto.UNDEFINED else None
            self.consts[t.name] = _Const(arr, frozenset({t.name}))
            self.init_sizes[t.name] = math.prod(t.dims)
            self.info.setdefault(t.name, _TensorInfo(tuple(t.dims), _dtype(t.data_type)))
        self._fold_constants()
        if self._fill_missing_shapes():
            self._infer_shapes(refold=True)
        return self._build(data_inputs)

    def _fix_input_shapes(self, data_inputs: list[onnx.ValueInfoProto]) -> None:
        shapes: list[Sequence[int]] | None = None
        if self.input_shape is not None:
            given = list(self.input_shape)
            if given and all(isinstance(d, (int, np.integer)) for d in given):
                shapes = [given]  # one shape
            else:
                shapes = [list(s) for s in given]
            if len(shapes) != len(data_inputs):
                raise CGError(
                    f"--input-shape gives {len(shapes)} shape(s) but the graph has "
                    f"{len(data_inputs)} data input(s): {[i.name for i in data_inputs]}"
                )
        for k, vi in enumerate(data_inputs):
            tt = vi.type.tensor_type
            if shapes is not None:
                dims = [int(d) for d in shapes[k]]
                if any(d <= 0 for d in dims):
                    raise CGError(f"input shape {dims} must be positive")
                declared = tt.shape.dim
                if declared and len(declared) != len(dims):
                    raise CGError(
                        f"input '{vi.name}' has rank {len(declared)} but --input-shape gives "
                        f"{len(dims)} dimensions"
                    )
                for d, size in zip(declared, dims):
                    if d.HasField("dim_value") and d.dim_value != size and d.dim_value > 0:
                        log.debug(
                            "overriding static dim %d of %s with %d", d.dim_value, vi.name, size
                        )
                del tt.shape.dim[:]
                for size in dims:
                    tt.shape.dim.add().dim_value = size
            dims_known = tt.HasField("shape") and all(
                d.HasField("dim_value") and d.dim_value > 0 for d in tt.shape.dim
            )
            if not dims_known:
                shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                         for d in tt.shape.dim] if tt.HasField("shape") else "unknown"  # fmt: skip
                raise CGError(
                    f"input '{vi.name}' has no static shape ({shown}): pass --input-shape N,C,H,W"
                )

    def _infer_shapes(self, refold: bool = False) -> None:
        try:
            inferred = shape_inference.infer_shapes(
                _without_weights(self.proto), strict_mode=False, data_prop=True
            )
        except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
            raise CGError(f"ONNX shape inference failed: {_first_line(exc)}") from None
        # Keep our proto (with weights); take the inferred value_info only.
        del self.proto.graph.value_info[:]
        self.proto.graph.value_info.extend(inferred.graph.value_info)
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                shape = None
            else:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                shape = tuple(dims) if all(d >= 0 for d in dims) else None
            prev = self.info.get(vi.name)
            if shape is None and prev is not None and prev.shape is not None:
                continue
            self.info[vi.name] = _TensorInfo(shape, _dtype(tt.elem_type))
        if refold:
            self._fold_constants()

    def _fold_constants(self) -> None:
        """Evaluate every node whose inputs are all constant (and Shape of static tensors)."""
        for node in self.proto.graph.node:
            if all(o in self.consts for o in node.output if o):
                continue
            op = node.op_type
            if op == "Constant":
                self._set_const(node.output[0], _constant_value(node), frozenset())
                continue
            if op in ("Shape", "Size") and node.input[0] not in self.consts:
                shape = self._shape(node.input[0])
                if shape is None:
                    continue
                if op == "Size":
                    self._set_const(
                        node.output[0], np.array(math.prod(shape), np.int64), frozenset()
                    )
                    continue
                attrs = _attrs(node)
                start, end = attrs.get("start", 0), attrs.get("end", len(shape))
                self._set_const(node.output[0], np.array(shape[start:end], np.int64), frozenset())
                continue
            inputs = [i for i in node.input if i]
            if not inputs or not all(i in self.consts for i in inputs):
                continue
            if (
                op == "RandomNormalLike"
                or op.startswith("Random")
                or node.domain not in ("", "ai.onnx")
            ):
                continue
            origins = frozenset().union(*(self.consts[i].origins for i in inputs))
            values = self._evaluate(node)
            for k, out in enumerate(node.output):
                if out:
                    self._set_const(out, values[k] if values is not None else None, origins)

    def _set_const(self, name: str, value: np.ndarray | None, origins: frozenset[str]) -> None:
        self.consts[name] = _Const(value, origins)
        if value is not None:
            self.info[name] = _TensorInfo(tuple(int(d) for d in value.shape), _np_dtype(value))

    def _evaluate(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        feeds = {}
        for i in node.input:
            if i:
                value = self.consts[i].value
                if value is None:
                    return None
                feeds[i] = value
        try:
            from onnx.reference import ReferenceEvaluator

            opset = [o for o in self.proto.opset_import]
            inputs = [helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None)
                      for i in feeds]  # fmt: skip
            outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                       for o in node.output if o]  # fmt: skip
            g = helper.make_graph([node], "fold", inputs, outputs)
            m = helper.make_model(g, opset_imports=opset, ir_version=self.proto.ir_version)
            return [np.asarray(v) for v in ReferenceEvaluator(m).run(None, feeds)]
        except Exception as exc:  # reference ops raise anything; folding is best effort
            log.debug("could not fold %s (%s): %s", node.name, node.op_type, exc)
            return None

    def _fill_missing_shapes(self) -> bool:
        """Write folded constants back as initializers so shape inference can see them.

        Returns True when the graph changed and shapes should be inferred again.
        """
        missing = [
            o
            for n in self.proto.graph.node
            for o in n.output
            if o and o not in self.consts and self._shape(o) is None
        ]
        if not missing:
            return False
        graph = self.proto.graph
        have = {t.name for t in graph.initializer}
        changed = False
        for name, const in self.consts.items():
            if const.value is None or name in have or const.origins:
                continue
            graph.initializer.append(numpy_helper.from_array(np.asarray(const.value), name))
            changed = True
        if changed:
            # Drop nodes whose outputs are now initializers, so inference reads the values.
            def superseded(n: onnx.NodeProto) -> bool:
                return all(
                    o in self.consts and self.consts[o].value is not None for o in n.output if o
                )

            keep = [n for n in graph.node if not superseded(n)]
            del graph.node[:]
            graph.node.extend(keep)
        return changed

    def _shape(self, tensor: str) -> tuple[int, ...] | None:
        info = self.info.get(tensor)
        return info.shape if info else None

    # -- CG construction ----------------------------------------------------
    def _build(self, data_inputs: list[onnx.ValueInfoProto]) -> ComputeGraph:
        graph = self.proto.graph
        nodes: list[Node] = []
        producer: dict[str, int] = {}  # tensor -> CG node index
        alias: dict[str, str] = {}  # Identity outputs -> their input

        for vi in data_inputs:
            shape = self._shape(vi.name) or ()
            dtype = self.info[vi.name].dtype
            producer[vi.name] = len(nodes)
            nodes.append(Node(vi.name, "Input", "Input", [], [shape], [dtype], outputs=[vi.name]))

        onnx_nodes = [n for n in graph.node if not all(o in self.consts for o in n.output if o)]
        live = self._live_nodes(onnx_nodes)
        counted: set[str] = set()
        unknown_ops: dict[str, int] = {}
        edges: list[Edge] = []
        constants: dict[str, ConstTensor] = {}
        weights: dict[str, np.ndarray] = {}
        out_port: dict[str, int] = {}  # tensor -> which output of its producer
        for node in onnx_nodes:
            if id(node) not in live:
                continue
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] not in self.consts:
                alias[node.output[0]] = alias.get(node.input[0], node.input[0])
                continue
            op = _SOURCE_OP_ALIASES.get(node.op_type, node.op_type)
            source_op = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            )
            if node.domain not in ("", "ai.onnx"):
                op = source_op
            if op not in OP_VOCAB:
                unknown_ops[op] = unknown_ops.get(op, 0) + 1
            attrs = _attrs(node)
            non_data = _NON_DATA_INPUTS.get(node.op_type, frozenset())
            buffer_pos = _BUFFER_INPUTS.get(node.op_type, frozenset())
            in_shapes: list[tuple[int, ...]] = []
            params = buffers = 0
            param_names: list[str] = []
            srcs: list[tuple[int, tuple[int, ...], str, int, int]] = []
            input_names = [alias.get(t, t) for t in node.input]
            for pos, tensor in enumerate(input_names):
                if not tensor:
                    continue
                const = self.consts.get(tensor)
                if const is not None and tensor not in constants:
                    constants[tensor] = self._const_tensor(tensor, const, weights)
                if pos in non_data:
                    continue
                shape = self._shape(tensor)
                in_shapes.append(shape if shape is not None else ())
                if const is not None:
                    size = self._origin_size(const, counted, scalar_ok=node.op_type in _WEIGHT_OPS)
                    if pos in buffer_pos:
                        buffers += size
                    else:
                        params += size
                        param_names.extend(sorted(const.origins - set(param_names)))
                    counted |= const.origins if size else set()
                    continue
                if tensor in producer:
                    dtype = self.info[tensor].dtype if tensor in self.info else "float32"
                    srcs.append(
                        (producer[tensor], shape or (), dtype, out_port.get(tensor, 0), pos)
                    )
            out_shapes, out_dtypes = [], []
            for out in node.output:
                if not out:
                    continue
                info = self.info.get(out)
                out_shapes.append(info.shape if info and info.shape is not None else ())
                out_dtypes.append(info.dtype if info else "float32")
            if node.op_type in ("Conv", "ConvTranspose") and "kernel_shape" not in attrs:
                w = in_shapes[1] if len(in_shapes) > 1 else ()
                attrs["kernel_shape"] = list(w[2:])
            affine = not (node.op_type == "InstanceNormalization" and params == 0)
            flops = node_flops(op, attrs, in_shapes, out_shapes, affine=affine)
            index = len(nodes)
            nodes.append(
                Node(
                    name=node.name or f"{node.op_type}_{index}",
                    op=op,
                    source_op=source_op,
                    input_shapes=in_shapes,
                    output_shapes=out_shapes,
                    output_dtypes=out_dtypes,
                    attrs=attrs,
                    params=params,
                    buffers=buffers,
                    flops=flops,
                    param_names=param_names,
                    scope=_scope(node.name),
                    inputs=input_names,
                    outputs=list(node.output),
                )
            )
            for src, shape, dtype, src_port, dst_port in srcs:
                edges.append(Edge(src, index, shape, dtype, src_port, dst_port))
            for port, out in enumerate(node.output):
                if out:
                    producer[out] = index
                    out_port[out] = port

        for op, count in unknown_ops.items():
            log.warning(
                "op %s (%d node(s)) is not in the CG vocabulary: kept as out-of-vocabulary",
                op,
                count,
            )
        outputs = []
        for vi in graph.output:
            tensor = alias.get(vi.name, vi.name)
            info = self.info.get(tensor) or self.info.get(vi.name)
            outputs.append(
                TensorSpec(
                    tensor, info.shape or () if info else (), info.dtype if info else "float32"
                )
            )
        missing = [
            n.name for n in nodes if any(s == () for s in n.output_shapes) and n.op != "Input"
        ]
        cg = ComputeGraph(
            nodes=nodes,
            edges=edges,
            inputs=[
                TensorSpec(n.name, n.output_shapes[0], n.output_dtypes[0])
                for n in nodes
                if n.op == "Input"
            ],
            outputs=outputs,
            name=self.name,
            source="onnx",
            meta={
                "opset": max(
                    (o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")),
                    default=0,
                ),
                "producer": self.proto.producer_name,
                "unknown_ops": sorted(unknown_ops),
                "unknown_shapes": len(missing),
            },
            constants=constants,
            weights=weights,
        )
        if missing:
            log.warning(
                "%d node(s) have no static output shape, e.g. %s", len(missing), missing[:3]
            )
        cg.validate()
        return cg

    def _const_tensor(
        self, name: str, const: _Const, weights: dict[str, np.ndarray]
    ) -> ConstTensor:
        info = self.info.get(name)
        value = None
        if const.value is not None:
            arr = np.asarray(const.value)
            shape, dtype = tuple(int(d) for d in arr.shape), _np_dtype(arr)
            if arr.size <= SMALL_CONSTANT and not const.origins:  # a literal, not a weight
                value = arr.reshape(-1).tolist()
            else:
                weights[name] = arr
        else:
            shape = info.shape or () if info else ()
            dtype = info.dtype if info else "float32"
        return ConstTensor(shape, dtype, value, sorted(const.origins))

    def _origin_size(self, const: _Const, counted: set[str], scalar_ok: bool) -> int:
        """Elements of the initializers behind a constant input not already counted."""
        fresh = [o for o in const.origins if o not in counted]
        size = sum(self.init_sizes.get(o, 0) for o in fresh)
        if not scalar_ok and size <= 1 and not any(_is_named_parameter(o) for o in fresh):
            # a scalar literal (Add 1.0, Div by sqrt(d)) that an exporter stored as an
            # initializer is not a parameter; a named one (CLIP's logit_scale) is
            return 0
        if not scalar_ok and not any(self._is_float_init(o) for o in fresh):
            return 0
        return size

    def _is_float_init(self, name: str) -> bool:
        info = self.info.get(name)
        return bool(info and info.dtype.startswith(("float", "bfloat")))

    def _live_nodes(self, onnx_nodes: list[onnx.NodeProto]) -> set[int]:
        """Nodes that carry data to a graph output (through data inputs only)."""
        producer = {o: n for n in onnx_nodes for o in n.output if o}
        live: set[int] = set()
        stack = [o.name for o in self.proto.graph.output]
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            node = producer.get(tensor)
            if node is None or id(node) in live:
                continue
            live.add(id(node))
            non_data = _NON_DATA_INPUTS.get(node.op_type, frozenset())
            stack.extend(t for p, t in enumerate(node.input) if t and p not in non_data)
        return live


_SMALL_INITIALIZER = 64  # elements; small ones may be shapes that data propagation needs


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are declared graph inputs instead of data.

    Shape inference serialises the model it is given; on ResNet-50 the 100 MB of
    weights dominated its time, and it needs only their shapes.
    """
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    g.value_info.extend(proto.graph.value_info)
    declared = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        small = math.prod(t.dims) <= _SMALL_INITIALIZER
        if small and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _is_named_parameter(name: str) -> bool:
    """Initializer names that exporters generate for literals ('onnx::Mul_12', '/x/Const')."""
    return not name.startswith(("onnx::", "/", "_v_", "ortshared_")) and not name.isdigit()


def _dtype(elem_type: int) -> str:
    return _ONNX_DTYPES.get(elem_type, "float32")


def _np_dtype(value: np.ndarray) -> str:
    name = np.asarray(value).dtype.name
    return {"float32": "float32", "float16": "float16", "float64": "float64"}.get(name, name)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = "<graph>"
            continue
        if a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.SPARSE_TENSOR):
            continue
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, Iterable) and not isinstance(value, str):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        out[a.name] = value
    return out


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def _scope(node_name: str) -> str:
    """Module path from a TorchScript-exporter node name ('/layer1/layer1.0/conv1/Conv')."""
    parts = [p for p in node_name.split("/") if p]
    return "/".join(parts[:-1])
