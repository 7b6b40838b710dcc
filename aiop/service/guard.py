"""Safe parsing of uploaded models: limits checked before anything is allocated.

Uploads are parsed by :mod:`aiop.cg` only (protobuf and JSON; nothing is
unpickled or executed). What ``aiop.cg.from_onnx`` does that a hostile file
could abuse, and how this module stops it first:

* constant folding evaluates every node whose inputs are constant (with ONNX's
  reference implementation): a ``ConstantOfShape``/``Expand``/``Tile`` fed a
  huge constant shape would allocate that many elements. Shape inference (no
  allocation) runs here first, with the caller's input shape, and every tensor
  that folding would materialise must fit ``max_const_elements``;
* initializers and ``Constant`` tensors are decoded to numpy arrays: their
  declared size must fit and match the bytes present; sparse tensors (densified
  on decode) are refused;
* tensors stored as *external data* would be read from the server's disk
  relative to its working directory: refused outright;
* every declared or inferred shape must stay below ``max_tensor_elements`` and
  the node count below ``max_graph_nodes``, so the predictor's arithmetic on
  shapes stays finite.

The same bounds apply to CG JSON (shapes, node counts, non-negative counters)
and to model names (input shapes).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiop.service.errors import Unprocessable

log = logging.getLogger(__name__)

MAX_DIM = 1 << 31  # no real tensor dimension comes near this


@dataclass(frozen=True)
class GraphLimits:
    """Bounds on what an uploaded graph may declare."""

    max_graph_nodes: int = 20_000
    max_tensor_elements: int = 1 << 34  # 16 Gi elements: far beyond any training activation
    max_const_elements: int = 1 << 26  # 64 Mi elements (256 MB fp32) per folded constant


# -- ONNX ---------------------------------------------------------------------------
# Ops whose folded output may be far larger than their constant inputs.
_EXPANDING = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike"}
)


def _numel(dims: Iterable[int]) -> int:
    return math.prod(int(d) for d in dims)


def _check_shape(what: str, dims: Sequence[int], limit: int) -> None:
    if any(d < 0 or d > MAX_DIM for d in dims):
        raise Unprocessable(f"{what}: dimension out of range in shape {list(dims)}")
    if _numel(dims) > limit:
        raise Unprocessable(
            f"{what}: declared shape {list(dims)} has {_numel(dims):,} elements, over the "
            f"server's limit of {limit:,}"
        )


def _tensor_checks(t: Any, what: str, limits: GraphLimits) -> None:
    """An initializer or constant tensor: no external data, a sane declared size."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        raise Unprocessable(f"{what}: tensors stored as external data are not accepted")
    _check_shape(what, list(t.dims), limits.max_const_elements)
    if t.raw_data:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        if len(t.raw_data) != _numel(t.dims) * itemsize:
            raise Unprocessable(
                f"{what}: {len(t.raw_data)} bytes of data for shape {list(t.dims)} (corrupt tensor)"
            )


def _all_nodes(graph: Any, depth: int = 0) -> Iterator[Any]:
    """Nodes of ``graph`` and of every subgraph attribute (If/Loop/Scan bodies)."""
    import onnx

    if depth > 8:
        raise Unprocessable("ONNX subgraphs nested too deeply")
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g, depth + 1)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g, depth + 1)


def _apply_input_shape(graph: Any, input_shape: Sequence[int] | None) -> None:
    """Give the (single) data input the caller's shape, as ``from_onnx`` will."""
    if input_shape is None:
        return
    init = {t.name for t in graph.initializer}
    data = [i for i in graph.input if i.name not in init]
    if len(data) != 1:
        return  # from_onnx explains the mismatch itself
    dims = data[0].type.tensor_type.shape
    del dims.dim[:]
    for size in input_shape:
        dims.dim.add().dim_value = int(size)


def _light_copy(proto: Any, input_shape: Sequence[int] | None) -> Any:
    """Weights dropped (declared as inputs), small initializers kept for data propagation."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    declared = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        if _numel(t.dims) <= 64:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    _apply_input_shape(g, input_shape)
    return light


def _inferred_shapes(light: Any) -> dict[str, tuple[int, ...] | None]:
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types; from_onnx reports the details
        log.debug("shape inference failed in the guard: %s", exc)
        return {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shapes[vi.name] = tuple(dims) if all(d >= 0 for d in dims) else None
    return shapes


def check_onnx(data: bytes, limits: GraphLimits, input_shape: Sequence[int] | None = None) -> Any:
    """Parse ONNX bytes and check them against ``limits``; returns the ``ModelProto``.

    Raises :class:`Unprocessable` with a one-line reason on anything refused.
    """
    import onnx
    from google.protobuf.message import DecodeError

    if not data:
        raise Unprocessable("empty model upload (0 bytes)")
    try:
        proto = onnx.load_from_string(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Unprocessable(f"not an ONNX model: {str(exc).splitlines()[0][:200]}") from None
    except RecursionError:
        raise Unprocessable("not an ONNX model (nesting too deep)") from None
    graph = proto.graph
    if graph.sparse_initializer:
        raise Unprocessable("sparse initializers are not accepted")
    for t in graph.initializer:
        _tensor_checks(t, f"initializer {t.name[:80]!r}", limits)
    for count, node in enumerate(_all_nodes(graph), 1):
        if count > limits.max_graph_nodes:
            raise Unprocessable(
                f"the model has more than {limits.max_graph_nodes:,} nodes (the server's limit)"
            )
        for a in node.attribute:
            if a.type == onnx.AttributeProto.SPARSE_TENSOR or len(a.sparse_tensors):
                raise Unprocessable(f"node {node.name[:80]!r}: sparse tensors are not accepted")
            if a.type == onnx.AttributeProto.TENSOR:
                _tensor_checks(a.t, f"node {node.name[:80]!r} attribute {a.name!r}", limits)
            for t in a.tensors:
                _tensor_checks(t, f"node {node.name[:80]!r} attribute {a.name!r}", limits)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
            _check_shape(f"tensor {vi.name[:80]!r}", dims, limits.max_tensor_elements)
    if input_shape is not None:
        _check_shape("input_shape", list(input_shape), limits.max_tensor_elements)
    _check_folding(proto, _inferred_shapes(_light_copy(proto, input_shape)), limits)
    return proto


def _check_folding(
    proto: Any, shapes: dict[str, tuple[int, ...] | None], limits: GraphLimits
) -> None:
    """Refuse tensors that ``from_onnx``'s constant folding would materialise over the limit."""
    graph = proto.graph
    for name, shape in shapes.items():
        if shape is not None:
            _check_shape(f"tensor {name[:80]!r}", shape, limits.max_tensor_elements)
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        op = node.op_type
        inputs = [i for i in node.input if i]
        if op == "Constant":
            folded = True
        elif op in ("Shape", "Size"):
            folded = True  # small: a shape vector or a scalar
        else:
            folded = bool(inputs) and all(i in const for i in inputs)
            folded = folded and not op.startswith("Random") and node.domain in ("", "ai.onnx")
        if not folded:
            continue
        for out in node.output:
            if not out:
                continue
            const.add(out)
            shape = shapes.get(out)
            if shape is not None:
                _check_shape(f"constant {out[:80]!r} ({op})", shape, limits.max_const_elements)
            elif op in _EXPANDING:
                raise Unprocessable(
                    f"constant {out[:80]!r} ({op}) has a shape that cannot be inferred: "
                    "refused, as folding it could allocate without bound"
                )


# -- CG JSON ------------------------------------------------------------------------
def check_graph_dict(data: Any, limits: GraphLimits) -> None:
    """Bounds on a CG in JSON form before ``ComputeGraph.from_dict`` (which checks structure)."""
    if not isinstance(data, dict):
        raise Unprocessable("graph must be a JSON object (ComputeGraph.to_dict())")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not isinstance(data.get("edges"), list):
        raise Unprocessable("not a computational graph: expected nodes and edges lists")
    if len(nodes) > limits.max_graph_nodes:
        raise Unprocessable(
            f"the graph has {len(nodes):,} nodes, over the server's limit of "
            f"{limits.max_graph_nodes:,}"
        )
    if len(data["edges"]) > 8 * limits.max_graph_nodes:
        raise Unprocessable(f"the graph has too many edges ({len(data['edges']):,})")

    def shapes(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise Unprocessable(f"{where}: expected a list of shapes")
        for s in value:
            dims(s, where)

    def dims(s: Any, where: str) -> None:
        if not isinstance(s, list) or len(s) > 16:
            raise Unprocessable(f"{where}: a shape must be a list of at most 16 integers")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in s):
            raise Unprocessable(f"{where}: shape {s!r} must hold integers")
        _check_shape(where, s, limits.max_tensor_elements)

    for k, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise Unprocessable(f"node {k}: expected an object")
        shapes(node.get("input_shapes", []), f"node {k} input_shapes")
        shapes(node.get("output_shapes", []), f"node {k} output_shapes")
        for key in ("params", "buffers", "flops"):
            v = node.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 53:
                raise Unprocessable(f"node {k}: {key} must be a non-negative integer below 2**53")
    for k, e in enumerate(data["edges"]):
        if not isinstance(e, list) or len(e) < 4:
            raise Unprocessable(f"edge {k}: expected [src, dst, shape, dtype, ...]")
        dims(e[2], f"edge {k} shape")
    for key in ("inputs", "outputs"):
        specs = data.get(key)
        if not isinstance(specs, list):
            raise Unprocessable(f"graph {key} must be a list")
        for s in specs:
            if not isinstance(s, dict):
                raise Unprocessable(f"graph {key}: expected objects with name, shape, dtype")
            dims(s.get("shape"), f"graph {key}")


def parse_json_bytes(data: bytes, what: str = "graph") -> Any:
    """``json.loads`` with the failure modes of hostile input turned into :class:`Unprocessable`."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unprocessable(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise Unprocessable(f"{what}: JSON nested too deeply") from None
