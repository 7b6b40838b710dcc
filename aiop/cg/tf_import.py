"""Frozen TensorFlow GraphDef (``.pb``) → :class:`~aiop.cg.graph.ComputeGraph`, without TensorFlow.

The file is parsed with the message classes of :mod:`aiop.cg.tf_graphdef`
(binary, or text format for ``.pbtxt``). Nodes are visited in topological
order; each TF tensor becomes either a constant (weights, shapes, axes; decoded
lazily with numpy) or a symbolic tensor produced by a CG node. Shapes are
inferred here from the ``Placeholder`` shape (or ``input_shape``) for the ops
frozen CNN graphs contain; ``_output_shapes`` attrs are used for ops we do not
know, and checked against our inference otherwise.

The CG matches what :func:`aiop.cg.onnx_import.from_onnx` gives for the same
network exported from PyTorch (DESIGN.md: the CG describes training):

* NHWC feature maps become NCHW shapes; HWIO / depthwise filters become ONNX
  ``(O, I/group, kh, kw)`` weights; ``SAME``/``VALID`` padding becomes explicit
  ONNX ``pads`` (begin..., end...). Attributes carry ONNX names.
* AIO-P-style simplification: ``Const``/``Identity``/``NoOp`` and shape
  plumbing (``Shape``, ``Pack``, ``StridedSlice`` on constants ...) are folded
  away; weights, ``BiasAdd`` and ``FusedBatchNorm`` statistics become node
  params/buffers (Conv2D + BiasAdd → one ``Conv`` with bias; BN stays a
  ``BatchNormalization`` with 2C params and 2C buffers); single-input
  Concat/AddN vanish.
* A zero ``Pad`` feeding a convolution or pooling is folded into that op's
  ``pads`` (what PyTorch exports for ``padding=``; for max-pooling this is
  exact on non-negative inputs, the Keras ResNet ZeroPadding2D + MaxPool case,
  and the same shapes and FLOPs otherwise); other pads (``MirrorPad``,
  non-zero constants, pads of batch/channels) stay ``Pad`` nodes.
* ``Relu6`` → ``Clip``; ``MatMul`` with constant weights (+ ``BiasAdd``) →
  ``Gemm`` with ``transB=1``; ``Mean`` over H, W → ``GlobalAveragePool`` (plus
  ``Flatten`` when dims are not kept); ``Reshape`` to ``(N, -1)`` → ``Flatten``.
* Unknown ops are kept under their TF name (the vocabulary's OOV slot) with
  their shapes, and a warning; float constants feeding them count as params.

For :mod:`aiop.cg.to_torch` every node also records its operands as the ONNX
op of ``Node.op`` takes them (``Node.inputs``: computed tensors named after
their TF node, ``name:port`` for further outputs; constants by key) and its
``Node.outputs``; constants go to ``ComputeGraph.constants`` and their values
(weights) to ``ComputeGraph.weights`` in ONNX layout: HWIO kernels as OIHW,
depthwise HWIM as ``(C·M, 1, kh, kw)``, Dense ``(K, N)`` as Gemm's ``(N, K)``,
constants broadcast against NHWC feature maps as NCHW. Learned weights carry
their TF node's name in ``param_names``; BatchNorm statistics a training graph
leaves empty start at 0 and 1.

NHWC is turned into NCHW once, at the graph input, and the whole network runs
NCHW, as a PyTorch port of it would: ops whose result depends on NHWC element
order (a Reshape or Keras Flatten of a feature map, a Squeeze/ExpandDims or
slice that changes the rank, a Mean that drops spatial axes, elementwise ops
broadcasting lower-rank tensors against a map) carry ``_perm_in``/``_perm_out``
attributes: the builder permutes to NHWC and back around just that op. Those
permutations are views; the copies they cause (reshaping a permuted map) are
the ones PyTorch pays too, so the built module's memory is that of the network
in PyTorch rather than of TF's kernels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from aiop.cg import tf_graphdef as pb
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

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

_DTYPES: dict[int, str] = {
    pb.DT_FLOAT: "float32",
    pb.DT_DOUBLE: "float64",
    pb.DT_INT32: "int32",
    pb.DT_UINT8: "uint8",
    pb.DT_INT16: "int16",
    pb.DT_INT8: "int8",
    pb.DT_STRING: "string",
    pb.DT_INT64: "int64",
    pb.DT_BOOL: "bool",
    pb.DT_BFLOAT16: "bfloat16",
    pb.DT_HALF: "float16",
    pb.DATA_TYPES["DT_UINT16"]: "uint16",
    pb.DATA_TYPES["DT_UINT32"]: "uint32",
    pb.DATA_TYPES["DT_UINT64"]: "uint64",
}
# numpy dtype of tensor_content, little-endian as TF writes it; bfloat16 is widened.
_NP_DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float64": "<f8",
    "int32": "<i4",
    "uint8": "u1",
    "int16": "<i2",
    "int8": "i1",
    "int64": "<i8",
    "bool": "?",
    "float16": "<f2",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
}

# Ops that hand their first input through unchanged.
_PASS_THROUGH = frozenset(
    {"Identity", "StopGradient", "Snapshot", "PreventGradient", "CheckNumerics",
     "PlaceholderWithDefault", "EnsureShape", "Enter", "Exit"}
)  # fmt: skip
# Ops with no data output worth a node (control plumbing, asserts, savers).
_DROPPED = frozenset({"NoOp", "Assert", "Print", "PrintV2", "SaveV2", "RestoreV2"})
# Variables mean the graph was saved before freezing: its weights are not in the file.
_VARIABLE_OPS = frozenset({"VariableV2", "Variable", "VarHandleOp", "ReadVariableOp"})
_ACTIVATIONS: dict[str, str] = {
    "Relu": "Relu",
    "Relu6": "Clip",
    "Sigmoid": "Sigmoid",
    "Tanh": "Tanh",
    "Elu": "Elu",
    "Selu": "Selu",
    "Softplus": "Softplus",
    "LeakyRelu": "LeakyRelu",
    "Erf": "Erf",
}
_UNARY: dict[str, str] = {
    "Sqrt": "Sqrt",
    "Exp": "Exp",
    "Log": "Log",
    "Neg": "Neg",
    "Abs": "Abs",
    "Reciprocal": "Reciprocal",
    "Inv": "Reciprocal",
    "Rsqrt": "Rsqrt",
    "Square": "Square",
    "Floor": "Floor",
}
_UNARY_FNS: dict[str, Callable[[Any], Any]] = {
    "Sqrt": np.sqrt,
    "Exp": np.exp,
    "Log": np.log,
    "Neg": np.negative,
    "Abs": np.abs,
    "Reciprocal": np.reciprocal,
    "Inv": np.reciprocal,
    "Rsqrt": lambda a: 1 / np.sqrt(a),
    "Square": np.square,
    "Floor": np.floor,
}
_BINARY: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "Add": ("Add", np.add),
    "AddV2": ("Add", np.add),
    "Sub": ("Sub", np.subtract),
    "Mul": ("Mul", np.multiply),
    "RealDiv": ("Div", np.true_divide),
    "Div": ("Div", np.true_divide),
    "FloorDiv": ("FloorDiv", np.floor_divide),
    "Maximum": ("Max", np.maximum),
    "Minimum": ("Min", np.minimum),
    "Pow": ("Pow", np.power),
    "SquaredDifference": ("SquaredDifference", lambda a, b: (a - b) ** 2),
}
_REDUCE: dict[str, tuple[str, Callable[..., Any]]] = {
    "Mean": ("ReduceMean", np.mean),
    "Sum": ("ReduceSum", np.sum),
    "Max": ("ReduceMax", np.max),
    "Min": ("ReduceMin", np.min),
    "Prod": ("ReduceProd", np.prod),
}
# Constant folding stops at this many elements: weights fold fine, a corrupt or hostile
# shape (a splat constant of 10^12 elements) gives a shape-only constant instead of an OOM.
_MAX_FOLD = 1 << 25
_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclass
class _Const:
    """A constant tensor (weights, shapes, axes), decoded on first use."""

    name: str  # the TF node it comes from (param name)
    shape: Shape
    dtype: str
    proto: Any = None  # TensorProto
    array: np.ndarray | None = None

    def value(self) -> np.ndarray:
        if self.array is None:
            if self.proto is None:
                raise CGError(f"the value of '{self.name}' cannot be computed without running TF")
            self.array = _decode_tensor(self.proto, self.name)
        return self.array

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Sym:
    """A tensor computed by CG node ``node`` (output ``port``); ``shape`` in TF layout."""

    node: int
    port: int
    shape: Shape
    dtype: str
    # A zero Pad not yet emitted: (source tensor, ((top, bottom), (left, right))).
    pending_pad: tuple[_Sym, tuple[tuple[int, int], tuple[int, int]]] | None = None
    pad_of: str = ""  # the TF Pad node behind ``pending_pad``
    pad_node: _Sym | None = None  # the Pad node once some consumer needed it


_Value = _Const | _Sym
# An operand of an emitted node, in ONNX input order: a computed tensor, the key of a
# constant already registered (see _Importer.const_key), or None for an absent input.
_Operand = _Sym | str | None

# Constant layouts: TF's weight layouts → ONNX's (what aiop.cg.to_torch builds from).
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


class _OnnxShape(tuple):
    """A weight shape already in ONNX layout (never permuted like NHWC feature maps)."""


def from_tf_pb(
    model: str | Path | bytes,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
) -> ComputeGraph:
    """Build a :class:`ComputeGraph` from a frozen TF GraphDef (path or serialized bytes).

    ``input_shape`` (NCHW like the rest of aiop, converted to the graph's
    layout) fixes the shape of the first data input; it is needed when the
    ``Placeholder`` has no static shape. An unknown batch dimension becomes 1.
    Every failure is a :class:`CGError` with a one-line message.
    """
    graph_def, label = _load(model)
    if name is None:
        name = Path(model).stem if isinstance(model, (str, Path)) else "tf_graph"
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if shape is not None and (not shape or any(d <= 0 for d in shape)):
        raise CGError(f"input shape {list(shape)} must be positive integers")
    return _Importer(graph_def, shape, name, label).run()


def load_graphdef(model: str | Path | bytes) -> Any:
    """Parse a GraphDef from a path or bytes (binary, or text format); raise :class:`CGError`."""
    return _load(model)[0]


def _load(model: str | Path | bytes) -> tuple[Any, str]:
    if isinstance(model, (bytes, bytearray)):
        data, label, text_hint = bytes(model), "GraphDef bytes", False
    else:
        path = Path(model)
        label = str(path)
        if not path.is_file():
            raise CGError(f"no such file: {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CGError(f"{path}: cannot read ({exc.strerror or exc})") from None
        text_hint = path.suffix.lower() in (".pbtxt", ".txt")
    if not data:
        raise CGError(f"{label}: empty file, not a TensorFlow GraphDef")
    graph_def = pb.GraphDef()
    try:
        if text_hint:
            text_format.Parse(data.decode("utf-8"), graph_def)
        else:
            graph_def.ParseFromString(data)
    except (DecodeError, text_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        raise CGError(
            f"{label}: not a TensorFlow GraphDef (truncated or corrupt: {first})"
        ) from None
    except RecursionError:
        raise CGError(f"{label}: not a TensorFlow GraphDef (nesting too deep)") from None
    if not graph_def.node:
        raise CGError(f"{label}: no graph nodes (empty, truncated or not a frozen GraphDef)")
    if any(not n.op for n in graph_def.node):
        raise CGError(f"{label}: a node without an op (not a TensorFlow GraphDef)")
    return graph_def, label


# -- TensorProto / attr helpers -----------------------------------------------------
def _dtype_name(dt: int) -> str:
    if dt > pb.REF_OFFSET:
        dt -= pb.REF_OFFSET
    return _DTYPES.get(dt, f"dt{dt}")


def _shape_proto(sp: Any) -> Shape | None:
    """Dims of a TensorShapeProto (-1 where unknown); None for an unknown rank."""
    if sp.unknown_rank:
        return None
    return tuple(int(d.size) for d in sp.dim)


def _decode_tensor(t: Any, name: str) -> np.ndarray:
    dtype = _dtype_name(t.dtype)
    shape = _shape_proto(t.tensor_shape) or ()
    n = math.prod(shape)
    if dtype == "string":
        vals = list(t.string_val)
        return np.array(vals + [b""] * (n - len(vals)) if vals else [b""] * n, object).reshape(
            shape
        )
    if t.tensor_content:
        raw = t.tensor_content
        if dtype == "bfloat16":
            arr = _bf16(np.frombuffer(raw, "<u2"))
        elif dtype in _NP_DTYPES:
            arr = np.frombuffer(raw, _NP_DTYPES[dtype])
        else:
            raise CGError(f"constant '{name}' has unsupported dtype {dtype}")
        if arr.size != n:
            raise CGError(
                f"constant '{name}': {arr.size} values for shape {list(shape)} (corrupt tensor)"
            )
        return arr.reshape(shape)
    if dtype == "float16":
        vals = np.array(list(t.half_val), np.uint16).view(np.float16)
    elif dtype == "bfloat16":
        vals = _bf16(np.array(list(t.half_val), np.uint16))
    elif dtype in ("float32",):
        vals = np.array(list(t.float_val), np.float32)
    elif dtype == "float64":
        vals = np.array(list(t.double_val), np.float64)
    elif dtype in ("int32", "int16", "int8", "uint8", "uint16"):
        vals = np.array(list(t.int_val), _NP_DTYPES[dtype])
    elif dtype == "int64":
        vals = np.array(list(t.int64_val), np.int64)
    elif dtype == "bool":
        vals = np.array(list(t.bool_val), bool)
    elif dtype == "uint32":
        vals = np.array(list(t.uint32_val), np.uint32)
    elif dtype == "uint64":
        vals = np.array(list(t.uint64_val), np.uint64)
    else:
        raise CGError(f"constant '{name}' has unsupported dtype {dtype}")
    if vals.size > n:
        raise CGError(f"constant '{name}': {vals.size} values for shape {list(shape)}")
    if vals.size < n:
        if n > _MAX_FOLD:
            raise CGError(f"constant '{name}' of shape {list(shape)} is too large to expand")
        # TF fills the rest with the last value given (zeros when none is given).
        fill = vals[-1] if vals.size else vals.dtype.type(0)
        vals = np.concatenate([vals, np.full(n - vals.size, fill, vals.dtype)])
    return vals.reshape(shape)


def _bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _attr(nd: Any, key: str) -> Any | None:
    return nd.attr.get(key)


def _attr_i(nd: Any, key: str, default: int) -> int:
    a = _attr(nd, key)
    return int(a.i) if a is not None and a.WhichOneof("value") == "i" else default


def _attr_f(nd: Any, key: str, default: float) -> float:
    a = _attr(nd, key)
    return float(a.f) if a is not None and a.WhichOneof("value") == "f" else default


def _attr_b(nd: Any, key: str, default: bool) -> bool:
    a = _attr(nd, key)
    return bool(a.b) if a is not None and a.WhichOneof("value") == "b" else default


def _attr_s(nd: Any, key: str, default: str) -> str:
    a = _attr(nd, key)
    if a is None or a.WhichOneof("value") != "s":
        return default
    return a.s.decode("utf-8", errors="replace")


def _attr_ints(nd: Any, key: str, default: Sequence[int]) -> list[int]:
    a = _attr(nd, key)
    if a is None or a.WhichOneof("value") != "list":
        return list(default)
    return [int(v) for v in a.list.i]


def _attr_type(nd: Any, *keys: str) -> str | None:
    for key in keys:
        a = _attr(nd, key)
        if a is not None and a.WhichOneof("value") == "type":
            return _dtype_name(a.type)
    return None


def _output_shapes(nd: Any) -> list[Shape | None] | None:
    a = _attr(nd, "_output_shapes")
    if a is None or a.WhichOneof("value") != "list":
        return None
    return [_shape_proto(s) for s in a.list.shape]


def _split_input(ref: str) -> tuple[str, int]:
    name, _, port = ref.partition(":")
    return name, int(port) if port.isdigit() else 0


def _scope(name: str) -> str:
    return name.rpartition("/")[0]


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int, int]:
    """TF SAME padding: (output size, pad begin, pad end); the extra pixel goes at the end."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return out, total // 2, total - total // 2


def _window(size: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    out = (size + pad[0] + pad[1] - ((k - 1) * d + 1)) // s + 1
    if out <= 0:
        raise CGError(f"window {k} (stride {s}, dilation {d}) does not fit an input of {size}")
    return out


def _broadcast(a: Shape, b: Shape) -> Shape:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(a, b))
    except ValueError:
        raise CGError(f"shapes {list(a)} and {list(b)} do not broadcast") from None


def _to_layout(arr: np.ndarray, layout: str) -> np.ndarray:
    """A TF constant in the ONNX layout named by ``layout`` (see ``_Importer.const_key``)."""
    if not layout:
        return arr
    if layout == "conv":
        return arr.transpose(3, 2, 0, 1)
    if layout == "depthwise":
        kh, kw, cin, mult = arr.shape
        # TF's output channel c·M + m is the (c, m) filter: one group per input channel.
        return arr.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None]
    if layout == "convT":
        return arr.transpose(3, 2, 0, 1)
    if layout == "gemm":
        return arr.T
    if layout == "nchw":
        full = arr.reshape((1,) * (4 - arr.ndim) + arr.shape) if arr.ndim < 4 else arr
        return full.transpose(_NHWC_TO_NCHW)
    raise CGError(f"internal: unknown constant layout {layout!r}")  # pragma: no cover


# -- the importer -------------------------------------------------------------------
class _Importer:
    def __init__(self, graph_def: Any, input_shape: Shape | None, name: str, label: str) -> None:
        self.gd = graph_def
        self.input_shape = input_shape
        self.name = name
        self.label = label
        self.by_name: dict[str, Any] = {}
        for nd in graph_def.node:
            if nd.name in self.by_name:
                raise CGError(f"{label}: two nodes named '{nd.name}'")
            self.by_name[nd.name] = nd
        variables = [nd.name for nd in graph_def.node if nd.op in _VARIABLE_OPS]
        if variables:
            raise CGError(
                f"{label}: not a frozen graph ({len(variables)} variable op(s), e.g. "
                f"'{variables[0]}'): freeze it first (convert_variables_to_constants)"
            )
        # Layout: a graph is NHWC unless its ops say NCHW (TF's CPU kernels want NHWC).
        self.nhwc = not any(
            _attr_s(nd, "data_format", "NHWC").startswith("NC") for nd in graph_def.node
        )
        self.consumers = self._count_consumers()
        self.values: dict[tuple[str, int], _Value] = {}
        self.nodes: list[Node] = []
        self.edges: list[Edge] = []
        self.batch = 1
        self.input_used = False
        self.unknown: dict[str, int] = {}
        self.folded_pads = 0
        self.shape_mismatch = 0
        self.current = ""
        # What the PyTorch builder needs: tensor names per node output, constants, weights.
        self.out_names: list[list[str]] = []
        self.tensor_names: set[str] = set()
        self.constants: dict[str, ConstTensor] = {}
        self.weights: dict[str, np.ndarray] = {}

    # -- driver -----------------------------------------------------------------
    def run(self) -> ComputeGraph:
        order = self._topological_order()
        for nd in order:
            self.current = f"{nd.name} ({nd.op})"
            try:
                outs = self._convert(nd)
            except CGError as exc:
                raise CGError(f"{self.label}: node {self.current}: {exc}") from None
            except Exception as exc:  # a corrupt file can trip anything: report one line
                raise CGError(
                    f"{self.label}: node {self.current}: cannot convert ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
                ) from None
            for port, value in enumerate(outs):
                self.values[(nd.name, port)] = value
            self._check_shapes(nd, outs)
            if self._fanout((nd.name, 0)) == 0:
                # A Pad that ends the graph has no consumer to fold into: emit it.
                for value in outs:
                    if isinstance(value, _Sym):
                        self.materialize(value)
        if not any(n.op == "Input" for n in self.nodes):
            raise CGError(f"{self.label}: no Placeholder feeds the graph (nothing to import)")
        if len(self.nodes) < 2:
            raise CGError(f"{self.label}: the graph computes nothing from its inputs")
        for op, count in sorted(self.unknown.items()):
            log.warning(
                "TF op %s (%d node(s)) is not in the CG vocabulary: kept as out-of-vocabulary",
                op,
                count,
            )
        if self.shape_mismatch:
            log.warning(
                "%d node(s): inferred shapes differ from the file's _output_shapes",
                self.shape_mismatch,
            )
        has_succ = {e.src for e in self.edges}
        outputs = [
            TensorSpec(n.name, n.output_shapes[0], n.output_dtypes[0])
            for i, n in enumerate(self.nodes)
            if i not in has_succ and n.op != "Input"
        ]
        versions = self.gd.versions
        cg = ComputeGraph(
            nodes=self.nodes,
            edges=self.edges,
            inputs=[
                TensorSpec(n.name, n.output_shapes[0], n.output_dtypes[0])
                for n in self.nodes
                if n.op == "Input"
            ],
            outputs=outputs,
            name=self.name,
            source="tf",
            meta={
                "format": "tf_graphdef",
                "producer": int(versions.producer) if self.gd.HasField("versions") else 0,
                "layout": "NHWC" if self.nhwc else "NCHW",
                "tf_nodes": len(self.gd.node),
                "unknown_ops": sorted(self.unknown),
                "folded_pads": self.folded_pads,
            },
            constants=self.constants,
            weights=self.weights,
        )
        cg.validate()
        return cg

    def _count_consumers(self) -> dict[tuple[str, int], list[str]]:
        out: dict[tuple[str, int], list[str]] = {}
        for nd in self.gd.node:
            for ref in nd.input:
                if not ref.startswith("^"):
                    out.setdefault(_split_input(ref), []).append(nd.name)
        return out

    def _fanout(self, key: tuple[str, int], depth: int = 0) -> int:
        """Data consumers of a TF tensor, looking through Identity-like nodes."""
        total = 0
        for c in self.consumers.get(key, []):
            nd = self.by_name[c]
            if nd.op in _PASS_THROUGH and depth < 64 and _split_input(nd.input[0]) == key:
                total += self._fanout((c, 0), depth + 1)
            else:
                total += 1
        return total

    def _topological_order(self) -> list[Any]:
        """Nodes after their data inputs (file order where free); iterative, so deep graphs work."""
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        order: list[Any] = []
        for root in self.gd.node:
            if state.get(root.name):
                continue
            stack: list[tuple[Any, int]] = [(root, 0)]
            state[root.name] = 1
            while stack:
                nd, i = stack[-1]
                refs = [r for r in nd.input if not r.startswith("^")]
                if i < len(refs):
                    stack[-1] = (nd, i + 1)
                    src = _split_input(refs[i])[0]
                    if src not in self.by_name:
                        raise CGError(
                            f"{self.label}: node '{nd.name}' reads '{refs[i]}', which no node "
                            "produces (truncated or not frozen)"
                        )
                    s = state.get(src, 0)
                    if s == 1:
                        raise CGError(
                            f"{self.label}: the graph has a cycle through '{src}' (control flow "
                            "loops are not supported)"
                        )
                    if s == 0:
                        state[src] = 1
                        stack.append((self.by_name[src], 0))
                    continue
                state[nd.name] = 2
                order.append(nd)
                stack.pop()
        return order

    def _check_shapes(self, nd: Any, outs: list[_Value]) -> None:
        if self.input_shape is not None:
            return  # the file's shapes were for another input size
        declared = _output_shapes(nd)
        if not declared:
            return
        for value, want in zip(outs, declared):
            if not isinstance(value, _Sym) or want is None:
                continue
            if len(want) != len(value.shape) or any(
                w >= 0 and w != g for w, g in zip(want[1:], value.shape[1:])
            ):
                log.debug("%s: inferred %s, file says %s", nd.name, value.shape, want)
                self.shape_mismatch += 1

    # -- layout -----------------------------------------------------------------
    def cg_shape(self, shape: Shape) -> Shape:
        """TF-layout shape → CG (NCHW) shape."""
        if self.nhwc and len(shape) == 4:
            return (shape[0], shape[3], shape[1], shape[2])
        return tuple(shape)

    def cg_axis(self, axis: int, rank: int) -> int:
        axis = self._norm_axis(axis, rank)
        return (0, 2, 3, 1)[axis] if self.nhwc and rank == 4 else axis

    @staticmethod
    def _norm_axis(axis: int, rank: int) -> int:
        if not -rank <= axis < max(rank, 1):
            raise CGError(f"axis {axis} out of range for rank {rank}")
        return axis + rank if axis < 0 else axis

    def _hw(self, shape: Shape) -> tuple[int, int]:
        return (shape[1], shape[2]) if self.nhwc else (shape[2], shape[3])

    def _c(self, shape: Shape) -> int:
        return shape[3] if self.nhwc else shape[1]

    def _nhwc(self, n: int, h: int, w: int, c: int) -> Shape:
        return (n, h, w, c) if self.nhwc else (n, c, h, w)

    def _spatial(self, values: Sequence[int]) -> tuple[int, int]:
        """(h, w) entries of a 4-element strides/ksize/dilations attr in the graph's layout."""
        if len(values) != 4:
            raise CGError(f"expected 4 window values, got {list(values)}")
        return (values[1], values[2]) if self.nhwc else (values[2], values[3])

    # -- node emission ----------------------------------------------------------
    def emit(
        self,
        nd: Any,
        op: str,
        data: Sequence[_Sym],
        input_shapes: Sequence[Shape],
        out_shapes: Sequence[Shape],
        out_dtypes: Sequence[str] | None = None,
        attrs: dict[str, Any] | None = None,
        params: int = 0,
        buffers: int = 0,
        param_names: Sequence[str] = (),
        suffix: str = "",
        operands: Sequence[_Operand] | None = None,
    ) -> list[_Sym]:
        """Append one CG node (shapes in TF layout) with edges from ``data``; its outputs.

        ``operands`` lists the node's inputs in ONNX order for ``Node.inputs``
        (computed tensors and registered constant keys); by default the ``data``
        tensors alone.
        """
        attrs = attrs or {}
        data = [self.materialize(s) for s in data]
        if operands is None:
            operands = data
        inputs = [
            "" if v is None else v if isinstance(v, str) else self.tensor_name(v) for v in operands
        ]
        dtypes = list(out_dtypes or [data[0].dtype if data else "float32"] * len(out_shapes))
        cg_in = [tuple(s) if isinstance(s, _OnnxShape) else self.cg_shape(s) for s in input_shapes]
        cg_out = [self.cg_shape(s) for s in out_shapes]
        index = len(self.nodes)
        self.nodes.append(
            Node(
                name=nd.name + suffix,
                op=op,
                source_op=nd.op,
                input_shapes=cg_in,
                output_shapes=cg_out,
                output_dtypes=dtypes,
                attrs=attrs,
                params=params,
                buffers=buffers,
                flops=node_flops(op, attrs, cg_in, cg_out),
                param_names=list(param_names),
                scope=_scope(nd.name),
                inputs=inputs,
                outputs=self._new_names(nd.name + suffix, len(out_shapes)),
            )
        )
        seen: set[tuple[int, int]] = set()
        for s in data:
            if (s.node, s.port) in seen:
                continue  # Mul(x, x): one tensor, one consumer, one edge
            seen.add((s.node, s.port))
            self.edges.append(Edge(s.node, index, self.cg_shape(s.shape), s.dtype))
        return [_Sym(index, p, tuple(sh), dt) for p, (sh, dt) in enumerate(zip(out_shapes, dtypes))]

    def _new_names(self, base: str, n: int) -> list[str]:
        """Unique tensor names for a node's outputs: ``base``, ``base:1``, ..."""
        names = []
        for port in range(n):
            name = base if port == 0 else f"{base}:{port}"
            k = 2
            while name in self.tensor_names:
                name, k = f"{base}_{k}" + (f":{port}" if port else ""), k + 1
            self.tensor_names.add(name)
            names.append(name)
        self.out_names.append(names)
        return names

    def tensor_name(self, s: _Sym) -> str:
        return self.out_names[self.materialize(s).node][s.port]

    def const_key(self, c: _Const, layout: str = "", *, param: bool = False, rank: int = 0) -> str:
        """Register constant ``c`` in ONNX layout (for ``Node.inputs``); return its key.

        ``layout``: ``"conv"`` HWIO → OIHW, ``"depthwise"`` HWIM → (I·M, 1, H, W),
        ``"convT"`` (H, W, out, in) → (in, out, H, W), ``"gemm"`` (K, N) → (N, K),
        ``"nchw"`` an operand broadcast against a 4-D NHWC tensor (``rank``: that
        tensor's rank) moved to NCHW (a per-channel ``(C,)`` becomes ``(C, 1, 1)``).
        ``param``: a learned weight (``param_names`` = the TF node's name); other
        constants of at most ``SMALL_CONSTANT`` elements keep their values in the CG.
        """
        if layout == "nchw" and not (self.nhwc and rank == 4 and c.size > 1):
            layout = ""
        key = f"{c.name}#{layout}" if layout else c.name
        if key in self.constants:
            if param and not self.constants[key].param_names:
                self.constants[key].param_names = [c.name]
            return key
        try:
            arr: np.ndarray | None = np.asarray(c.value())
        except CGError:
            arr = None  # a value TF would compute at run time: shape only, initialised
        shape = tuple(c.shape)
        if arr is not None:
            arr = _to_layout(arr, layout)
            shape = tuple(int(d) for d in arr.shape)
        else:  # the layout's shape from a stand-in of the same shape (no data)
            stand_in = np.broadcast_to(np.zeros((), np.int8), shape)
            shape = tuple(_to_layout(stand_in, layout).shape)
        dtype = c.dtype if c.dtype in _NP_DTYPES or c.dtype == "bfloat16" else "float32"
        value = None
        if arr is not None:
            if not param and arr.size <= SMALL_CONSTANT and arr.dtype != object:
                value = arr.reshape(-1).tolist()
            elif arr.dtype != object:
                self.weights[key] = np.ascontiguousarray(arr)
        self.constants[key] = ConstTensor(shape, dtype, value, [c.name] if param else [])
        return key

    def filled_const(self, base: str, shape: Shape, fill: float) -> str:
        """A constant made up here (absent BatchNorm statistics): ``fill`` everywhere."""
        key = base
        k = 2
        while key in self.constants:
            key, k = f"{base}_{k}", k + 1
        self.constants[key] = ConstTensor(tuple(shape), "float32", None, [])
        self.weights[key] = np.full(shape, fill, np.float32)
        return key

    def operand(
        self, v: _Value, layout: str = "", *, param: bool = False, rank: int = 0
    ) -> _Operand:
        """A value as an operand: a computed tensor, or a registered constant's key."""
        if isinstance(v, _Sym):
            return self.materialize(v)
        return self.const_key(v, layout, param=param, rank=rank)

    @staticmethod
    def spread(shape: Shape) -> bool:
        """Whether an NHWC 4-D shape orders its elements unlike its NCHW view (H·W > 1, C > 1)."""
        return len(shape) == 4 and shape[1] * shape[2] > 1 and shape[3] > 1

    def _broadcast_attrs(self, ins: Sequence[_Value], out: Shape) -> dict[str, Any]:
        """Elementwise ops mixing a 4-D NHWC tensor with lower-rank computed ones (which
        broadcast against NHWC's trailing axes) run on the NHWC view."""
        if not (self.nhwc and len(out) == 4):
            return {}
        syms = [v for v in ins if isinstance(v, _Sym)]
        if all(len(v.shape) in (0, 4) or math.prod(v.shape) == 1 for v in syms):
            return {}
        return {"_perm_in": list(_NCHW_TO_NHWC), "_perm_out": list(_NHWC_TO_NCHW)}

    def _slice_attrs(self, index: tuple[Any, ...], shape: Shape, out: Shape) -> dict[str, Any]:
        """Slice-1 attributes (starts/ends/axes/steps) of a numpy-style TF index.

        A slice that keeps the rank is written in the CG's axes; one that drops
        (shrink) or adds axes runs on TF's layout and reshapes to its result.
        """
        rank = len(shape)
        real = sum(1 for i in index if i is not None and i is not Ellipsis)
        full: list[Any] = []
        for i in index:
            full += [slice(None)] * (rank - real) if i is Ellipsis else [i]
        full += [slice(None)] * (rank - sum(1 for i in full if i is not None))
        starts, ends, axes, steps = [], [], [], []
        axis = 0
        for i in full:
            if i is None:
                continue
            n = shape[axis]
            if isinstance(i, slice):
                b, e, st = i.indices(n)
                if st < 0 and e < 0:
                    e = -(n + 1)  # "before the first element" (ONNX's INT_MIN end)
            else:
                b = int(i) + n if int(i) < 0 else int(i)
                e, st = b + 1, 1
            if (b, e, st) != (0, n, 1):
                starts.append(b)
                ends.append(e)
                axes.append(axis)
                steps.append(st)
            axis += 1
        changes_rank = len(out) != rank
        if not changes_rank:
            axes = [self.cg_axis(a, rank) for a in axes]
        attrs: dict[str, Any] = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
        if changes_rank:
            attrs["_out_shape"] = list(out)
            keeps = full[0] is not None and 0 not in axes and out and out[0] == shape[0]
            attrs["_keeps_batch"] = int(bool(keeps))
            if self.nhwc and rank == 4:
                attrs["_perm_in"] = list(_NCHW_TO_NHWC)
            if self.nhwc and len(out) == 4:
                attrs["_perm_out"] = list(_NHWC_TO_NCHW)
        return attrs

    def materialize(self, s: _Sym) -> _Sym:
        """A tensor whose zero Pad was kept pending: emit the Pad node now (once)."""
        if s.pending_pad is None:
            return s
        if s.pad_node is None:
            src, ((t, b), (le, r)) = s.pending_pad
            # ONNX pads: begins then ends, in the CG's (NCHW) axis order.
            attrs = {"mode": "constant", "pads": [0, 0, t, le, 0, 0, b, r]}
            nd = self.by_name[s.pad_of]
            s.pad_node = self.emit(nd, "Pad", [src], [src.shape], [s.shape], attrs=attrs)[0]
        return s.pad_node

    # -- per-op conversion ------------------------------------------------------
    def _inputs(self, nd: Any) -> list[_Value]:
        vals = []
        for ref in nd.input:
            if ref.startswith("^"):
                continue
            key = _split_input(ref)
            if key not in self.values:
                raise CGError(f"input '{ref}' has no value (its producer has fewer outputs)")
            vals.append(self.values[key])
        return vals

    def _convert(self, nd: Any) -> list[_Value]:
        op = nd.op
        if op == "Const":
            a = _attr(nd, "value")
            if a is None or a.WhichOneof("value") != "tensor":
                raise CGError("Const without a tensor value")
            t = a.tensor
            shape = _shape_proto(t.tensor_shape)
            if shape is None or any(d < 0 for d in shape):
                raise CGError("Const with an unknown shape")
            return [_Const(nd.name, shape, _dtype_name(t.dtype), proto=t)]
        if op in ("Placeholder", "PlaceholderV2"):
            return [self._placeholder(nd)]
        if op in _DROPPED:
            return []
        ins = self._inputs(nd)
        if op in _PASS_THROUGH:
            if not ins:
                raise CGError("Identity-like node without an input")
            return [ins[0]]
        if op == "IdentityN":
            return list(ins)
        handler = _HANDLERS.get(op)
        if handler is not None:
            return handler(self, nd, ins)
        return self._unknown(nd, ins)

    def _placeholder(self, nd: Any) -> _Value:
        dtype = _attr_type(nd, "dtype") or "float32"
        if self._fanout((nd.name, 0)) == 0:
            log.debug("placeholder %s is not used; left out", nd.name)
            return _Const(nd.name, (), dtype)
        declared: Shape | None = None
        a = _attr(nd, "shape")
        if a is not None and a.WhichOneof("value") == "shape":
            declared = _shape_proto(a.shape)
        if declared is None or (a is not None and not a.shape.dim and not a.shape.unknown_rank):
            declared = (_output_shapes(nd) or [None])[0] or declared
        shape: Shape
        if self.input_shape is not None and not self.input_used:
            given = self.input_shape
            if len(given) == 4:
                given = self._nhwc(given[0], given[2], given[3], given[1])
            if declared is not None and declared and len(declared) != len(given):
                raise CGError(
                    f"input '{nd.name}' has rank {len(declared)} but the input shape gives "
                    f"{len(given)} dimensions"
                )
            shape = tuple(given)
            self.input_used = True
        else:
            if declared is None or any(d < 0 for d in declared[1:]):
                shown = "unknown rank" if declared is None else list(declared)
                raise CGError(
                    f"input '{nd.name}' has no static shape ({shown}): pass input_shape "
                    "(N, C, H, W), e.g. --input-shape 1,3,224,224"
                )
            shape = tuple(declared)
            if shape and shape[0] < 0:
                shape = (self.batch, *shape[1:])
        self.batch = shape[0] if shape else 1
        return self.emit(nd, "Input", [], [], [shape], [dtype])[0]

    def _unknown(self, nd: Any, ins: list[_Value]) -> list[_Value]:
        data = [v for v in ins if isinstance(v, _Sym)]
        declared = _output_shapes(nd) or []
        shapes: list[Shape] = []
        for s in declared:
            if s is None or any(d < 0 for d in s[1:]):
                shapes = []
                break
            shapes.append(tuple(self.batch if (i == 0 and d < 0) else d for i, d in enumerate(s)))
        if not data:
            # A source op we cannot run (random numbers, variables): a constant of unknown value.
            return [_Const(nd.name, shapes[0] if shapes else (), "float32")]
        self.unknown[nd.op] = self.unknown.get(nd.op, 0) + 1
        if not shapes:
            log.warning(
                "%s (%s): no static _output_shapes; assuming its input's shape", nd.name, nd.op
            )
            shapes = [data[0].shape]
        consts = [v for v in ins if isinstance(v, _Const)]
        weights = [c for c in consts if c.dtype.startswith(("float", "bfloat")) and c.size > 1]
        dtype = _attr_type(nd, "T", "dtype") or data[0].dtype
        operands = [self.operand(v, param=v in weights) for v in ins]
        return list(
            self.emit(
                nd,
                nd.op,
                data,
                [v.shape for v in ins],
                shapes,
                [dtype] * len(shapes),
                params=sum(c.size for c in weights),
                param_names=[c.name for c in weights],
                operands=operands,
            )
        )

    # -- helpers for handlers ---------------------------------------------------
    @staticmethod
    def _sym(v: _Value, what: str) -> _Sym:
        if not isinstance(v, _Sym):
            raise CGError(f"{what} is a constant; expected a computed tensor")
        return v

    @staticmethod
    def _const(v: _Value, what: str) -> _Const:
        if not isinstance(v, _Const):
            raise CGError(f"{what} must be a constant in a frozen graph")
        return v

    @staticmethod
    def _ints(v: _Value, what: str) -> list[int]:
        arr = _Importer._const(v, what).value()
        return [int(x) for x in np.asarray(arr).reshape(-1)]

    def _shape_only(self, nd: Any, shape: Sequence[int]) -> list[_Value] | None:
        """A constant too large to compute: keep its shape (weights still count)."""
        if any(d < 0 for d in shape):
            raise CGError(f"negative dimension in {list(shape)}")
        if math.prod(shape) <= _MAX_FOLD:
            return None
        dtype = _attr_type(nd, "T", "dtype") or "float32"
        return [_Const(nd.name, tuple(int(d) for d in shape), dtype)]

    def _fold(self, nd: Any, array: Any) -> list[_Value]:
        arr = np.asarray(array)
        dtype = _attr_type(nd, "T", "dtype", "out_type", "DstT") or arr.dtype.name
        return [_Const(nd.name, tuple(int(d) for d in arr.shape), dtype, array=arr)]

    def _unpad(self, x: _Sym) -> tuple[_Sym, tuple[tuple[int, int], tuple[int, int]]]:
        """Split a tensor into (source, extra spatial pads) when a zero Pad can fold into us."""
        if x.pending_pad is not None and x.pad_node is None:
            self.folded_pads += 1
            return x.pending_pad
        return self.materialize(x), ((0, 0), (0, 0))

    def _window_attrs(
        self,
        nd: Any,
        x: _Sym,
        kernel: tuple[int, int],
        strides: tuple[int, int],
        dilations: tuple[int, int],
    ) -> tuple[_Sym, tuple[int, int], list[int]]:
        """Resolve TF padding for a 2-D window op: (source tensor, (Ho, Wo), ONNX pads)."""
        src, extra = self._unpad(x)
        if len(src.shape) != 4:
            raise CGError(f"expected a 4-D input, got shape {list(src.shape)}")
        h, w = self._hw(src.shape)
        hp, wp = h + sum(extra[0]), w + sum(extra[1])
        mode = _attr_s(nd, "padding", "VALID")
        if mode == "SAME":
            ho, pt, pb_ = _same_pads(hp, kernel[0], strides[0], dilations[0])
            wo, pl, pr = _same_pads(wp, kernel[1], strides[1], dilations[1])
        elif mode == "VALID":
            pt = pb_ = pl = pr = 0
            ho = _window(hp, kernel[0], strides[0], dilations[0], (0, 0))
            wo = _window(wp, kernel[1], strides[1], dilations[1], (0, 0))
        elif mode == "EXPLICIT":
            ep = _attr_ints(nd, "explicit_paddings", [0] * 8)
            if len(ep) != 8:
                raise CGError(f"explicit_paddings must have 8 values, got {ep}")
            pairs = [(ep[2 * i], ep[2 * i + 1]) for i in range(4)]
            (pt, pb_), (pl, pr) = (pairs[1], pairs[2]) if self.nhwc else (pairs[2], pairs[3])
            ho = _window(hp, kernel[0], strides[0], dilations[0], (pt, pb_))
            wo = _window(wp, kernel[1], strides[1], dilations[1], (pl, pr))
        else:
            raise CGError(f"padding {mode!r} is not supported")
        pads = [pt + extra[0][0], pl + extra[1][0], pb_ + extra[0][1], pr + extra[1][1]]
        return src, (ho, wo), pads

    def _merge_bias(self, x: _Sym, b: _Const, key: tuple[str, int]) -> bool:
        """Fold a constant bias into the Conv/Gemm that produced ``x``, if it is theirs alone."""
        if x.pending_pad is not None or x.port != 0:
            return False
        node = self.nodes[x.node]
        if node.op not in _BIAS_OPS or len(node.input_shapes) != 2:
            return False
        channels = node.output_shapes[0][1] if node.output_shapes[0] else -1
        if b.size != channels or len([d for d in b.shape if d != 1]) > 1:
            return False
        if self._fanout(key) != 1 or any(e.src == x.node for e in self.edges):
            return False
        node.input_shapes.append((channels,))
        node.inputs.append(self.const_key(b, param=True))
        node.params += channels
        node.param_names.append(b.name)
        node.flops = node_flops(node.op, node.attrs, node.input_shapes, node.output_shapes)
        return True


# -- handlers: each returns the TF node's output values, in port order -----------------
def _h_conv2d(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = self._sym(ins[0], "the convolution input")
    w = ins[1]
    kh, kw, cin_f, cout = w.shape
    depthwise = nd.op == "DepthwiseConv2dNative"
    strides = self._spatial(_attr_ints(nd, "strides", [1, 1, 1, 1]))
    dil = self._spatial(_attr_ints(nd, "dilations", [1, 1, 1, 1]))
    src, (ho, wo), pads = self._window_attrs(nd, x, (kh, kw), strides, dil)
    cin = self._c(src.shape)
    if depthwise:
        if cin_f != cin:
            raise CGError(f"depthwise filter has {cin_f} input channels, the input has {cin}")
        group, out_c, onnx_w = cin, cin * cout, _OnnxShape((cin * cout, 1, kh, kw))
    else:
        if cin_f <= 0 or cin % cin_f:
            raise CGError(f"filter has {cin_f} input channels, the input has {cin}")
        group, out_c, onnx_w = cin // cin_f, cout, _OnnxShape((cout, cin_f, kh, kw))
    attrs = {
        "dilations": list(dil),
        "group": group,
        "kernel_shape": [kh, kw],
        "pads": pads,
        "strides": list(strides),
    }
    data = [src] + ([w] if isinstance(w, _Sym) else [])
    is_const = isinstance(w, _Const)
    if not is_const:
        raise CGError("a convolution filter computed at run time is not supported")
    layout = "depthwise" if depthwise else "conv"
    return list(
        self.emit(
            nd,
            "Conv",
            data,
            [src.shape, onnx_w],
            [self._nhwc(src.shape[0], ho, wo, out_c)],
            attrs=attrs,
            params=w.size if is_const else 0,
            param_names=[w.name] if is_const else [],
            operands=[src, self.const_key(w, layout, param=True)],
        )
    )


def _h_conv_transpose(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    sizes, w, xv = ins[0], ins[1], ins[2]
    x = self.materialize(self._sym(xv, "the transposed-convolution input"))
    out_shape = tuple(self._ints(sizes, "input_sizes"))
    kh, kw, cout, cin = w.shape
    strides = self._spatial(_attr_ints(nd, "strides", [1, 1, 1, 1]))
    dil = self._spatial(_attr_ints(nd, "dilations", [1, 1, 1, 1]))
    pads, out_pad = [0, 0, 0, 0], [0, 0]
    for i, (size_in, size_out, k, s, d) in enumerate(
        zip(self._hw(x.shape), self._hw(out_shape), (kh, kw), strides, dil)
    ):
        total = s * (size_in - 1) + (k - 1) * d + 1 - size_out
        if total >= 0:
            pads[i], pads[i + 2] = total // 2, total - total // 2
        else:
            out_pad[i] = -total
    attrs = {
        "dilations": list(dil),
        "group": 1,
        "kernel_shape": [kh, kw],
        "output_padding": out_pad,
        "pads": pads,
        "strides": list(strides),
    }
    if not isinstance(w, _Const):
        raise CGError("a transposed-convolution filter computed at run time is not supported")
    return list(
        self.emit(
            nd,
            "ConvTranspose",
            [x],
            [x.shape, _OnnxShape((cin, cout, kh, kw))],
            [out_shape],
            attrs=attrs,
            params=w.size,
            param_names=[w.name],
            operands=[x, self.const_key(w, "convT", param=True)],
        )
    )


def _h_bias_add(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x, b = ins[0], ins[1]
    if isinstance(x, _Const) and isinstance(b, _Const):
        return self._fold(nd, x.value() + b.value())
    x = self._sym(x, "the BiasAdd input")
    if isinstance(b, _Const) and self._merge_bias(x, b, _split_input(nd.input[0])):
        return [x]
    x = self.materialize(x)
    is_const = isinstance(b, _Const)
    # BiasAdd adds along the channel axis: NHWC's last (moved to NCHW's second by the
    # "nchw" layout), or NCHW's second in an NCHW graph, where (C,) must become (C, 1, 1).
    bkey: _Operand
    if is_const and not self.nhwc and len(x.shape) == 4:
        b3 = _Const(b.name, (b.size, 1, 1), b.dtype, array=b.value().reshape(-1, 1, 1))
        bkey = self.const_key(b3, param=True)
    else:
        bkey = self.operand(b, "nchw", param=is_const, rank=len(x.shape))
    return list(
        self.emit(
            nd,
            "Add",
            [x] + ([b] if isinstance(b, _Sym) else []),
            [x.shape, b.shape],
            [x.shape],
            params=b.size if is_const else 0,
            param_names=[b.name] if is_const else [],
            operands=[x, bkey],
        )
    )


def _h_batch_norm(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = self.materialize(self._sym(ins[0], "the batch-norm input"))
    c = self._c(x.shape) if len(x.shape) == 4 else x.shape[-1]
    learned = [v for v in ins[1:3] if isinstance(v, _Const) and v.size]
    stats = [v for v in ins[3:5] if isinstance(v, _Const)]
    attrs = {
        "epsilon": _attr_f(nd, "epsilon", 1e-4),
        "momentum": 0.8999999761581421,  # float32(0.9), as PyTorch's training export records
        "training_mode": 1,  # a CG describes training (DESIGN.md)
    }
    # ONNX operands: scale, bias, mean, var; statistics a training graph leaves empty
    # start at 0 and 1 (what nn.BatchNorm2d starts from), an absent scale/offset at 1/0.
    operands: list[_Operand] = [x]
    for pos, fill, learned_pos in ((1, 1.0, True), (2, 0.0, True), (3, 0.0, False),
                                   (4, 1.0, False)):  # fmt: skip
        v = ins[pos] if pos < len(ins) else None
        if isinstance(v, _Sym):
            operands.append(self.materialize(v))
        elif isinstance(v, _Const) and v.size == c:
            operands.append(self.const_key(v, param=learned_pos))
        else:
            key = self.filled_const(f"{nd.name}/{('scale', 'offset', 'mean', 'variance')[pos - 1]}",
                                    (c,), fill)  # fmt: skip
            if learned_pos:
                self.constants[key].param_names = [key]
            operands.append(key)
    # Same outputs as a training-mode ONNX BatchNormalization: y, running mean, running var.
    outs = self.emit(
        nd,
        "BatchNormalization",
        [x] + [v for v in ins[1:5] if isinstance(v, _Sym)],
        [x.shape, (c,), (c,), (c,), (c,)],
        [x.shape, (c,), (c,)],
        [x.dtype, "float32", "float32"],
        attrs=attrs,
        params=sum(v.size for v in learned) if learned else 2 * c,
        buffers=sum(v.size for v in stats) or 2 * c,  # empty in training graphs: still 2C
        param_names=[v.name for v in learned],
        operands=operands,
    )
    return [outs[0], outs[1], outs[2], outs[1], outs[2], outs[1]]


def _h_activation(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    if isinstance(x, _Const):  # not computed here: keep the shape, the value is never needed
        return [_Const(nd.name, x.shape, x.dtype)]
    op = _ACTIVATIONS[nd.op]
    attrs: dict[str, Any] = {}
    if nd.op == "LeakyRelu":
        attrs["alpha"] = _attr_f(nd, "alpha", 0.2)
    elif nd.op == "Elu":
        attrs["alpha"] = 1.0
    elif nd.op == "Relu6":
        attrs.update(min=0.0, max=6.0)  # Clip-6's attributes (what ReLU6 computes)
    return list(self.emit(nd, op, [x], [x.shape], [x.shape], attrs=attrs))


def _h_unary(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    if isinstance(x, _Const):
        return self._fold(nd, _UNARY_FNS[nd.op](x.value()))
    x = self.materialize(x)
    return list(self.emit(nd, _UNARY[nd.op], [x], [x.shape], [x.shape]))


def _h_softmax(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    if isinstance(ins[0], _Const):
        return [_Const(nd.name, ins[0].shape, ins[0].dtype)]
    x = self.materialize(ins[0])
    axis = self.cg_axis(-1, len(x.shape))
    return list(self.emit(nd, "Softmax", [x], [x.shape], [x.shape], attrs={"axis": axis}))


def _h_binary(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    if len(ins) != 2:
        raise CGError(f"{nd.op} needs two inputs, got {len(ins)}")
    a, b = ins
    op, fn = _BINARY[nd.op]
    if isinstance(a, _Const) and isinstance(b, _Const):
        big = self._shape_only(nd, _broadcast(a.shape, b.shape))
        return big or self._fold(nd, fn(a.value(), b.value()))
    # A constant bias added to a Conv/Gemm output is that op's bias (Keras writes BiasAdd,
    # other exporters Add).
    if op == "Add":
        for x, c, pos in ((a, b, 0), (b, a, 1)):
            if (
                isinstance(x, _Sym)
                and isinstance(c, _Const)
                and c.dtype.startswith("float")
                and self._merge_bias(x, c, _split_input(nd.input[pos]))
            ):
                return [x]
    data = [self.materialize(v) for v in ins if isinstance(v, _Sym)]
    a_shape = a.shape if isinstance(a, _Const) else self.materialize(a).shape
    b_shape = b.shape if isinstance(b, _Const) else self.materialize(b).shape
    out = _broadcast(a_shape, b_shape)
    dtype = _attr_type(nd, "T") or data[0].dtype
    attrs = self._broadcast_attrs(ins, out)
    layout = "" if attrs else "nchw"  # on the NHWC view constants keep TF's layout
    operands = [self.operand(v, layout, rank=len(out)) for v in (a, b)]
    return list(
        self.emit(nd, op, data, [a_shape, b_shape], [out], [dtype], attrs=attrs, operands=operands)
    )


def _h_add_n(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    if all(isinstance(v, _Const) for v in ins):
        return self._fold(nd, sum(v.value() for v in ins))  # type: ignore[union-attr]
    if len(ins) == 1:
        return [ins[0]]  # single-input sum: plumbing (AIO-P prunes it)
    data = [self.materialize(v) for v in ins if isinstance(v, _Sym)]
    shapes = [v.shape if isinstance(v, _Const) else self.materialize(v).shape for v in ins]
    out = shapes[0]
    for s in shapes[1:]:
        out = _broadcast(out, s)
    attrs = self._broadcast_attrs(ins, out)
    layout = "" if attrs else "nchw"
    operands = [self.operand(v, layout, rank=len(out)) for v in ins]
    return list(self.emit(nd, "Add", data, shapes, [out], attrs=attrs, operands=operands))


def _h_matmul(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    a, b = ins[0], ins[1]
    batched = nd.op.startswith("BatchMatMul")
    ta = _attr_b(nd, "adj_x" if batched else "transpose_a", False)
    tb = _attr_b(nd, "adj_y" if batched else "transpose_b", False)
    if isinstance(a, _Const) and isinstance(b, _Const):
        av, bv = a.value(), b.value()
        return self._fold(
            nd, (np.swapaxes(av, -1, -2) if ta else av) @ (np.swapaxes(bv, -1, -2) if tb else bv)
        )
    a_shape = list(a.shape if isinstance(a, _Const) else self.materialize(a).shape)
    b_shape = list(b.shape)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise CGError(f"MatMul of shapes {a_shape} and {b_shape}")
    if ta:
        a_shape[-2], a_shape[-1] = a_shape[-1], a_shape[-2]
    if tb:
        b_shape[-2], b_shape[-1] = b_shape[-1], b_shape[-2]
    if a_shape[-1] != b_shape[-2]:
        raise CGError(f"MatMul inner dimensions differ: {a_shape} @ {b_shape}")
    batch = _broadcast(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    out = (*batch, a_shape[-2], b_shape[-1])
    if isinstance(b, _Const) and isinstance(a, _Sym) and len(b.shape) == 2 and not ta:
        # Dense layer: the Gemm PyTorch's Linear exports (weight (N, K), transB=1).
        k, n = b_shape
        x = self.materialize(a)
        if len(x.shape) == 2:
            return list(
                self.emit(
                    nd,
                    "Gemm",
                    [x],
                    [x.shape, _OnnxShape((n, k))],
                    [out],
                    attrs={"alpha": 1.0, "beta": 1.0, "transB": 1},
                    params=b.size,
                    param_names=[b.name],
                    operands=[x, self.const_key(b, "" if tb else "gemm", param=True)],
                )
            )
    data = [self.materialize(v) for v in (a, b) if isinstance(v, _Sym)]
    consts = [v for v in (a, b) if isinstance(v, _Const) and v.size > 1]
    attrs: dict[str, Any] = {}
    operands: list[_Operand] = []
    for v, t, flag in ((a, ta, "_adj_a"), (b, tb, "_adj_b")):
        if isinstance(v, _Const) and t and len(v.shape) == 2:
            operands.append(self.const_key(v, "gemm", param=v in consts))  # stored transposed
            continue
        if t:
            attrs[flag] = 1
        operands.append(self.operand(v, param=v in consts))
    if self.nhwc and any(len(v.shape) == 4 for v in data):
        # 4-D operands (attention heads) multiply over TF's last two axes: use TF's layout.
        attrs["_perm_in"] = list(_NCHW_TO_NHWC)
        if len(out) == 4:
            attrs["_perm_out"] = list(_NHWC_TO_NCHW)
    return list(
        self.emit(
            nd,
            "MatMul",
            data,
            [tuple(a_shape), tuple(b_shape)],
            [out],
            attrs=attrs,
            params=sum(c.size for c in consts),
            param_names=[c.name for c in consts],
            operands=operands,
        )
    )


def _h_pool(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = self._sym(ins[0], "the pooling input")
    if nd.op.endswith("V2"):
        ksize, strides4 = self._ints(ins[1], "ksize"), self._ints(ins[2], "strides")
    else:
        ksize = _attr_ints(nd, "ksize", [1, 1, 1, 1])
        strides4 = _attr_ints(nd, "strides", [1, 1, 1, 1])
    k, s = self._spatial(ksize), self._spatial(strides4)
    avg = nd.op.startswith("AvgPool")
    padded = x.pending_pad is not None and x.pad_node is None
    src, (ho, wo), pads = self._window_attrs(nd, x, k, s, (1, 1))
    out = self._nhwc(src.shape[0], ho, wo, self._c(src.shape))
    if avg and (ho, wo) == (1, 1) and tuple(k) == self._hw(src.shape) and not any(pads):
        # A window over the whole map is global pooling (what AdaptiveAvgPool2d(1) exports).
        return list(self.emit(nd, "GlobalAveragePool", [src], [src.shape], [out]))
    attrs: dict[str, Any] = {"kernel_shape": list(k), "pads": pads, "strides": list(s)}
    if avg and padded:
        attrs["count_include_pad"] = 1  # the folded zeros were averaged in TF too
    op = "AveragePool" if avg else "MaxPool"
    return list(self.emit(nd, op, [src], [src.shape], [out], attrs=attrs))


def _h_reduce(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x, axes_v = ins[0], ins[1]
    keep = _attr_b(nd, "keep_dims", _attr_b(nd, "keepdims", False))
    op, fn = _REDUCE[nd.op]
    axes_raw = self._ints(axes_v, "reduction axes")
    if isinstance(x, _Const):
        return self._fold(nd, fn(x.value(), axis=tuple(axes_raw), keepdims=keep))
    x = self.materialize(x)
    if not axes_raw:
        return [x]  # TF reduces over no axis: the identity
    rank = len(x.shape)
    axes = sorted({self._norm_axis(a, rank) for a in axes_raw})
    out_keep = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    out = out_keep if keep else tuple(d for i, d in enumerate(x.shape) if i not in axes)
    spatial = (1, 2) if self.nhwc else (2, 3)
    if rank == 4 and tuple(axes) == spatial and nd.op in ("Mean", "Max"):
        gop = "GlobalAveragePool" if nd.op == "Mean" else "GlobalMaxPool"
        pooled = self.emit(nd, gop, [x], [x.shape], [out_keep])[0]
        if keep:
            return [pooled]
        # Keras' GlobalAveragePooling2D drops H, W: PyTorch writes pool + flatten(1).
        return list(
            self.emit(
                nd, "Flatten", [pooled], [out_keep], [out], attrs={"axis": 1}, suffix="/flatten"
            )
        )
    attrs: dict[str, Any] = {
        "axes": sorted(self.cg_axis(a, rank) for a in axes),
        "keepdims": int(keep),
    }
    if self.nhwc and rank == 4 and not keep:
        # The axes left keep NCHW's order in PyTorch; TF's result has them in NHWC's.
        left = [t for t in _NHWC_TO_NCHW if t not in axes]
        perm = [left.index(t) for t in sorted(left)]
        if perm != sorted(perm):
            attrs["_perm_out"] = perm
    return list(self.emit(nd, op, [x], [x.shape], [out], attrs=attrs))


def _concat_axis(self: _Importer, nd: Any, ins: list[_Value]) -> tuple[list[_Value], int]:
    if nd.op == "Concat":
        return ins[1:], self._ints(ins[0], "concat axis")[0]
    return ins[:-1], self._ints(ins[-1], "concat axis")[0]


def _h_concat(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    parts, axis = _concat_axis(self, nd, ins)
    if not parts:
        raise CGError("Concat without inputs")
    if all(isinstance(v, _Const) for v in parts):
        return self._fold(nd, np.concatenate([v.value() for v in parts], axis=axis))  # type: ignore[union-attr]
    if len(parts) == 1:
        return [parts[0]]  # single-input concat: plumbing (AIO-P prunes it)
    shapes = [v.shape if isinstance(v, _Const) else self.materialize(v).shape for v in parts]
    rank = len(shapes[0])
    ax = self._norm_axis(axis, rank)
    for s in shapes[1:]:
        if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != ax):
            raise CGError(f"cannot concatenate shapes {[list(x) for x in shapes]} on axis {axis}")
    out = tuple(sum(s[ax] for s in shapes) if i == ax else d for i, d in enumerate(shapes[0]))
    data = [self.materialize(v) for v in parts if isinstance(v, _Sym)]
    operands = [self.operand(v, "nchw", rank=rank) for v in parts]
    return list(
        self.emit(
            nd, "Concat", data, shapes, [out], attrs={"axis": self.cg_axis(ax, rank)},
            operands=operands,
        )
    )  # fmt: skip


def _h_pack(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    axis = _attr_i(nd, "axis", 0)
    if all(isinstance(v, _Const) for v in ins):
        return self._fold(nd, np.stack([v.value() for v in ins], axis=axis))  # type: ignore[union-attr]
    shapes = [v.shape if isinstance(v, _Const) else self.materialize(v).shape for v in ins]
    rank = len(shapes[0]) + 1
    ax = self._norm_axis(axis, rank)
    out = (*shapes[0][:ax], len(ins), *shapes[0][ax:])
    data = [self.materialize(v) for v in ins if isinstance(v, _Sym)]
    attrs: dict[str, Any] = {"axis": self.cg_axis(ax, rank), "new_axis": 1}
    if self.nhwc and 4 in (rank, rank - 1):
        # Stack in TF's layout: NHWC inputs back from NCHW, an NHWC result shown as NCHW.
        attrs["axis"] = ax
        if rank - 1 == 4:
            attrs["_perm_in"] = list(_NCHW_TO_NHWC)
        else:
            attrs["_perm_out"] = list(_NHWC_TO_NCHW)
    operands = [self.operand(v) for v in ins]
    return list(self.emit(nd, "Concat", data, shapes, [out], attrs=attrs, operands=operands))


def _h_reshape(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    target = self._ints(ins[1], "the target shape")
    if isinstance(x, _Const):
        return self._fold(nd, x.value().reshape(target))
    x = self.materialize(x)
    n = math.prod(x.shape)
    known = math.prod(d for d in target if d != -1)
    if target.count(-1) > 1 or any(d < -1 for d in target) or (-1 in target and known <= 0):
        raise CGError(f"bad target shape {target}")
    # Unlike ONNX, TF's Reshape has no "0 copies the input dim" rule.
    out = tuple(n // known if d == -1 else d for d in target)
    if math.prod(out) != n:
        raise CGError(f"cannot reshape {list(x.shape)} to {target}")
    if out == x.shape:
        return [x]  # a no-op reshape is plumbing
    # A reshape reads elements in TF's order: an NHWC feature map whose order differs from
    # NCHW's goes back to NHWC first (a copy PyTorch makes too), a 4-D result is shown NCHW.
    attrs: dict[str, Any] = {}
    if self.nhwc and self.spread(x.shape):
        attrs["_perm_in"] = list(_NCHW_TO_NHWC)
    if len(x.shape) > 2 and len(out) == 2 and out[0] == x.shape[0]:
        return list(self.emit(nd, "Flatten", [x], [x.shape], [out], attrs={"axis": 1, **attrs}))
    if self.nhwc and len(out) == 4:
        attrs["_perm_out"] = list(_NHWC_TO_NCHW)
    operands = [x, self.const_key(self._const(ins[1], "the target shape"))]
    return list(self.emit(nd, "Reshape", [x], [x.shape], [out], attrs=attrs, operands=operands))


def _h_squeeze(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    dims = _attr_ints(nd, "squeeze_dims", _attr_ints(nd, "axis", []))
    if isinstance(x, _Const):
        v = x.value()
        return self._fold(nd, np.squeeze(v, axis=tuple(dims)) if dims else np.squeeze(v))
    x = self.materialize(x)
    rank = len(x.shape)
    axes = {self._norm_axis(d, rank) for d in dims} or {i for i, d in enumerate(x.shape) if d == 1}
    if any(x.shape[a] != 1 for a in axes):
        raise CGError(f"cannot squeeze axes {sorted(axes)} of shape {list(x.shape)}")
    out = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    attrs: dict[str, Any] = {"axes": sorted(self.cg_axis(a, rank) for a in axes)}
    left = [t for t in _NHWC_TO_NCHW if t not in axes]
    if self.nhwc and rank == 4 and left != sorted(left):
        # Channels kept beside a spatial axis: squeeze the NHWC view, as TF does.
        attrs = {"axes": sorted(axes), "_perm_in": list(_NCHW_TO_NHWC)}
    return list(self.emit(nd, "Squeeze", [x], [x.shape], [out], attrs=attrs))


def _h_expand_dims(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    axis = self._ints(ins[1], "the new axis")[0]
    if isinstance(x, _Const):
        return self._fold(nd, np.expand_dims(x.value(), axis))
    x = self.materialize(x)
    ax = self._norm_axis(axis, len(x.shape) + 1)
    out = (*x.shape[:ax], 1, *x.shape[ax:])
    attrs: dict[str, Any] = {"axes": [self.cg_axis(ax, len(out))]}
    if self.nhwc and len(out) == 4:
        attrs = {"axes": [ax], "_perm_out": list(_NHWC_TO_NCHW)}  # NHWC result shown NCHW
    elif self.nhwc and len(x.shape) == 4:
        attrs = {"axes": [ax], "_perm_in": list(_NCHW_TO_NHWC)}
    return list(self.emit(nd, "Unsqueeze", [x], [x.shape], [out], attrs=attrs))


def _h_transpose(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    perm = self._ints(ins[1], "the permutation")
    if isinstance(x, _Const):
        return self._fold(nd, np.transpose(x.value(), perm))
    x = self.materialize(x)
    if sorted(perm) != list(range(len(x.shape))):
        raise CGError(f"bad permutation {perm} for shape {list(x.shape)}")
    out = tuple(x.shape[p] for p in perm)
    if self.nhwc and len(perm) == 4:
        # Both ends are shown NCHW: cg_perm[j] = tf→cg(perm[cg→tf(j)]).
        q, qinv = (0, 3, 1, 2), (0, 2, 3, 1)
        perm = [qinv[perm[q[j]]] for j in range(4)]
    return list(self.emit(nd, "Transpose", [x], [x.shape], [out], attrs={"perm": perm}))


def _h_pad(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    paddings = np.asarray(self._const(ins[1], "paddings").value()).reshape(-1, 2)
    mirror = nd.op == "MirrorPad"
    value = 0.0
    if nd.op == "PadV2" and len(ins) > 2:
        value = float(np.asarray(self._const(ins[2], "pad value").value()).reshape(-1)[0])
    if isinstance(x, _Const):
        big = self._shape_only(nd, [d + int(p.sum()) for d, p in zip(x.shape, paddings)])
        if big:
            return big
        if mirror:
            mode = _attr_s(nd, "mode", "REFLECT").lower()
            return self._fold(nd, np.pad(x.value(), paddings, mode=mode))
        return self._fold(nd, np.pad(x.value(), paddings, constant_values=value))
    x = self.materialize(x)
    if paddings.shape[0] != len(x.shape):
        raise CGError(f"paddings {paddings.tolist()} do not match rank {len(x.shape)}")
    out = tuple(int(d + p0 + p1) for d, (p0, p1) in zip(x.shape, paddings.tolist()))
    spatial = (1, 2) if self.nhwc else (2, 3)
    only_spatial = len(x.shape) == 4 and all(
        p0 == 0 and p1 == 0 for i, (p0, p1) in enumerate(paddings.tolist()) if i not in spatial
    )
    if not mirror and value == 0.0 and only_spatial:
        # Keep it pending: a Conv/pool consumer folds it into its pads, anyone else emits it.
        h, w = (paddings[spatial[0]].tolist(), paddings[spatial[1]].tolist())
        pending = (x, ((int(h[0]), int(h[1])), (int(w[0]), int(w[1]))))
        return [_Sym(x.node, x.port, out, x.dtype, pending_pad=pending, pad_of=nd.name)]
    rank = len(x.shape)
    order = [self.cg_axis(i, rank) for i in range(rank)]
    inv = [order.index(j) for j in range(rank)]
    begins = [int(paddings[inv[j]][0]) for j in range(rank)]
    ends = [int(paddings[inv[j]][1]) for j in range(rank)]
    mode = _attr_s(nd, "mode", "REFLECT").lower() if mirror else "constant"
    attrs: dict[str, Any] = {"mode": mode, "pads": begins + ends}
    if value:
        attrs["value"] = value
    return list(self.emit(nd, "Pad", [x], [x.shape], [out], attrs=attrs))


def _h_resize(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = self.materialize(self._sym(ins[0], "the resize input"))
    oh, ow = self._ints(ins[1], "the output size")[:2]
    mode = {"ResizeBilinear": "linear", "ResizeNearestNeighbor": "nearest"}.get(nd.op, "cubic")
    if _attr_b(nd, "align_corners", False):
        ctm = "align_corners"
    elif _attr_b(nd, "half_pixel_centers", False):
        ctm = "half_pixel" if mode != "nearest" else "tf_half_pixel_for_nn"
    else:
        ctm = "asymmetric"
    out = self._nhwc(x.shape[0], oh, ow, self._c(x.shape))
    attrs = {"coordinate_transformation_mode": ctm, "mode": mode}
    if mode == "nearest" and ctm == "asymmetric":
        attrs["nearest_mode"] = "floor"  # TF's legacy nearest neighbour
    sizes = _Const(f"{nd.name}/sizes", (4,), "int64", array=np.array(self.cg_shape(out)))
    operands = [x, None, None, self.const_key(sizes)]
    return list(self.emit(nd, "Resize", [x], [x.shape], [out], attrs=attrs, operands=operands))


def _strided_index(
    begin: list[int], end: list[int], strides: list[int], nd: Any
) -> tuple[Any, ...]:
    masks = {k: _attr_i(nd, k, 0) for k in ("begin_mask", "end_mask", "ellipsis_mask",
                                             "new_axis_mask", "shrink_axis_mask")}  # fmt: skip
    idx: list[Any] = []
    for i in range(len(begin)):
        bit = 1 << i
        if masks["ellipsis_mask"] & bit:
            idx.append(Ellipsis)
        elif masks["new_axis_mask"] & bit:
            idx.append(None)
        elif masks["shrink_axis_mask"] & bit:
            idx.append(begin[i])
        else:
            b = None if masks["begin_mask"] & bit else begin[i]
            e = None if masks["end_mask"] & bit else end[i]
            idx.append(slice(b, e, strides[i] if i < len(strides) else 1))
    return tuple(idx)


def _h_strided_slice(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    begin, end = self._ints(ins[1], "begin"), self._ints(ins[2], "end")
    strides = self._ints(ins[3], "strides") if len(ins) > 3 else [1] * len(begin)
    index = _strided_index(begin, end, strides, nd)
    if isinstance(x, _Const):
        return self._fold(nd, np.asarray(x.value())[index])
    x = self.materialize(x)
    # Slice a zero-stride view: the shape without allocating the tensor.
    out = tuple(int(d) for d in np.broadcast_to(np.zeros((), np.int8), x.shape)[index].shape)
    attrs = self._slice_attrs(index, x.shape, out)
    return list(self.emit(nd, "Slice", [x], [x.shape], [out], attrs=attrs))


def _h_slice(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    begin, size = self._ints(ins[1], "begin"), self._ints(ins[2], "size")
    shape = x.shape
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))
    if isinstance(x, _Const):
        return self._fold(nd, np.asarray(x.value())[index])
    x = self.materialize(x)
    out = tuple(int(d) for d in np.broadcast_to(np.zeros((), np.int8), shape)[index].shape)
    attrs = self._slice_attrs(index, x.shape, out)
    return list(self.emit(nd, "Slice", [x], [x.shape], [out], attrs=attrs))


def _h_split(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    if nd.op == "Split":
        axis, x = self._ints(ins[0], "split axis")[0], ins[1]
        n = _attr_i(nd, "num_split", 1)
        sizes = None
    else:
        x, sizes, axis = ins[0], self._ints(ins[1], "split sizes"), self._ints(ins[2], "axis")[0]
    rank = len(x.shape)
    ax = self._norm_axis(axis, rank)
    total = x.shape[ax]
    if sizes is None:
        if n <= 0 or total % n:
            raise CGError(f"cannot split {total} into {n} equal parts")
        sizes = [total // n] * n
    elif -1 in sizes:
        sizes[sizes.index(-1)] = total - sum(s for s in sizes if s != -1)
    if sum(sizes) != total:
        raise CGError(f"split sizes {sizes} do not add up to {total}")
    if isinstance(x, _Const):
        parts = np.split(x.value(), np.cumsum(sizes)[:-1], axis=ax)
        return [_Const(nd.name, p.shape, x.dtype, array=p) for p in parts]
    x = self.materialize(x)
    outs = [tuple(s if i == ax else d for i, d in enumerate(x.shape)) for s in sizes]
    attrs = {"axis": self.cg_axis(ax, rank), "split": sizes}
    return list(self.emit(nd, "Split", [x], [x.shape], outs, [x.dtype] * len(outs), attrs=attrs))


def _h_cast(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]
    to = _attr_type(nd, "DstT") or "float32"
    if isinstance(x, _Const):
        arr = x.value()
        np_to = _NP_DTYPES.get(to)
        return [_Const(x.name, x.shape, to, array=arr.astype(np_to) if np_to else arr)]
    x = self.materialize(x)
    return list(self.emit(nd, "Cast", [x], [x.shape], [x.shape], [to], attrs={"to": to}))


def _h_shape(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x = ins[0]  # a pending Pad already has its padded shape
    dtype = np.int64 if _attr_type(nd, "out_type") == "int64" else np.int32
    if nd.op == "Shape":
        return self._fold(nd, np.array(x.shape, dtype))
    if nd.op == "Size":
        return self._fold(nd, np.array(math.prod(x.shape), dtype))
    if nd.op == "Rank":
        return self._fold(nd, np.array(len(x.shape), np.int32))
    # ShapeN
    return [_Const(nd.name, (len(v.shape),), "int32", array=np.array(v.shape, dtype)) for v in ins]


def _h_fill(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    dims = self._ints(ins[0], "dims")
    big = self._shape_only(nd, dims)
    return big or self._fold(nd, np.full(dims, self._const(ins[1], "fill value").value()))


def _h_range(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    start, limit, delta = (self._const(v, "range bound").value() for v in ins[:3])
    if float(delta) == 0:
        raise CGError("Range with delta 0")
    count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
    return self._shape_only(nd, [count]) or self._fold(nd, np.arange(start, limit, delta))


def _h_gather(self: _Importer, nd: Any, ins: list[_Value]) -> list[_Value]:
    x, idx = ins[0], ins[1]
    axis = self._ints(ins[2], "axis")[0] if len(ins) > 2 else 0
    if isinstance(x, _Const) and isinstance(idx, _Const):
        return self._fold(nd, np.take(x.value(), idx.value(), axis=axis))
    return _gather_node(self, nd, x, idx, axis)


def _gather_node(self: _Importer, nd: Any, x: _Value, idx: _Value, axis: int) -> list[_Value]:
    if isinstance(x, _Const):  # an embedding lookup: the table is a parameter
        i = self.materialize(self._sym(idx, "indices"))
        out = (*i.shape, *x.shape[1:])
        return list(
            self.emit(
                nd, "Gather", [i], [x.shape, i.shape], [out], [x.dtype],
                attrs={"axis": 0}, params=x.size, param_names=[x.name],
                operands=[self.const_key(x, param=True), i],
            )
        )  # fmt: skip
    x = self.materialize(x)
    ax = self._norm_axis(axis, len(x.shape))
    ishape = idx.shape
    out = (*x.shape[:ax], *ishape, *x.shape[ax + 1 :])
    data = [x] + ([self.materialize(idx)] if isinstance(idx, _Sym) else [])
    attrs = {"axis": self.cg_axis(ax, len(x.shape))}
    if self.nhwc and len(x.shape) == 4 and len(out) != 4:
        attrs = {"axis": ax, "_perm_in": list(_NCHW_TO_NHWC)}  # gather on the NHWC view
    operands = [x, self.operand(idx)]
    return list(
        self.emit(nd, "Gather", data, [x.shape, ishape], [out], attrs=attrs, operands=operands)
    )


_HANDLERS: dict[str, Callable[[_Importer, Any, list[_Value]], list[_Value]]] = {
    "Conv2D": _h_conv2d,
    "DepthwiseConv2dNative": _h_conv2d,
    "Conv2DBackpropInput": _h_conv_transpose,
    "BiasAdd": _h_bias_add,
    "BiasAddV1": _h_bias_add,
    "FusedBatchNorm": _h_batch_norm,
    "FusedBatchNormV2": _h_batch_norm,
    "FusedBatchNormV3": _h_batch_norm,
    **dict.fromkeys(_ACTIVATIONS, _h_activation),
    **dict.fromkeys(_UNARY, _h_unary),
    **dict.fromkeys(_BINARY, _h_binary),
    **dict.fromkeys(_REDUCE, _h_reduce),
    "AddN": _h_add_n,
    "Softmax": _h_softmax,
    "MatMul": _h_matmul,
    "BatchMatMul": _h_matmul,
    "BatchMatMulV2": _h_matmul,
    "MaxPool": _h_pool,
    "MaxPoolV2": _h_pool,
    "AvgPool": _h_pool,
    "ConcatV2": _h_concat,
    "Concat": _h_concat,
    "Pack": _h_pack,
    "Reshape": _h_reshape,
    "Squeeze": _h_squeeze,
    "ExpandDims": _h_expand_dims,
    "Transpose": _h_transpose,
    "Pad": _h_pad,
    "PadV2": _h_pad,
    "MirrorPad": _h_pad,
    "ResizeBilinear": _h_resize,
    "ResizeNearestNeighbor": _h_resize,
    "ResizeBicubic": _h_resize,
    "StridedSlice": _h_strided_slice,
    "Slice": _h_slice,
    "Split": _h_split,
    "SplitV": _h_split,
    "Cast": _h_cast,
    "Shape": _h_shape,
    "ShapeN": _h_shape,
    "Size": _h_shape,
    "Rank": _h_shape,
    "Fill": _h_fill,
    "Range": _h_range,
    "GatherV2": _h_gather,
    "Gather": _h_gather,
}

__all__ = ["from_tf_pb", "load_graphdef"]
