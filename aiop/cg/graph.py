"""The computational graph (CG): the network that training runs, as data.

A :class:`ComputeGraph` holds nodes in topological order and directed edges
between them. Each edge is one tensor flowing from its producer to one
consumer and carries that tensor's shape, dtype and size in bytes. Graph
inputs are nodes of op ``Input`` so that every edge has a node at both ends.

The JSON form (:meth:`ComputeGraph.to_dict`) is the only serialisation: no
pickle. :attr:`ComputeGraph.fingerprint` is a content hash over the structure
(ops, attributes, shapes, parameter counts, edges), independent of node names
and of the weights' values, so two exports of the same architecture get the
same id.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiop.cg.vocab import VIEW_OPS, op_kind

SCHEMA_VERSION = 1

Shape = tuple[int, ...]

DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class CGError(ValueError):
    """A model could not be turned into a computational graph; the message says why."""


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(int(d) for d in shape)


def tensor_bytes(shape: Iterable[int], dtype: str) -> int:
    """Size in bytes of a dense tensor; unknown dtypes count as 4 bytes per element."""
    return numel(shape) * DTYPE_BYTES.get(dtype, 4)


@dataclass
class TensorSpec:
    """A named graph input or output."""

    name: str
    shape: Shape
    dtype: str = "float32"


@dataclass
class Node:
    """One operation of the network.

    ``op`` is the canonical op name (see :mod:`aiop.cg.vocab`); ``source_op`` is
    what the importer saw (``"Conv"``, ``"Conv2D"``, ``"com.microsoft::Gelu"``).
    ``params`` counts learned parameters (weights and biases, not BatchNorm
    running statistics, which are ``buffers``). ``param_names`` are the names of
    the initializers those parameters came from; for PyTorch exports these are
    the module's ``named_parameters()`` names, which is how an m-configuration
    maps frozen CG nodes back onto the PyTorch model. ``scope`` is the module
    path the exporter recorded (empty when unknown).

    ``inputs`` names the tensor at every input position, in the op's order
    (``""`` for an absent optional input): another node's output, a graph input
    or a key of :attr:`ComputeGraph.constants`. ``outputs`` names the node's
    outputs. ``input_shapes`` lists the shapes of the present inputs.
    """

    name: str
    op: str
    source_op: str
    input_shapes: list[Shape]
    output_shapes: list[Shape]
    output_dtypes: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    buffers: int = 0
    flops: int = 0
    param_names: list[str] = field(default_factory=list)
    scope: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        """Bytes of all outputs this node produces."""
        return sum(tensor_bytes(s, d) for s, d in zip(self.output_shapes, self.output_dtypes))

    @property
    def kind(self) -> str:
        return op_kind(self.op)

    @property
    def is_view(self) -> bool:
        """True when PyTorch would return a view (no new storage) for this op."""
        return self.op in VIEW_OPS


@dataclass
class Edge:
    """A tensor flowing from node ``src`` to node ``dst`` (indices into ``nodes``)."""

    src: int
    dst: int
    shape: Shape
    dtype: str = "float32"
    src_port: int = 0  # which output of src
    dst_port: int = 0  # which input position of dst

    @property
    def bytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


SMALL_CONSTANT = 64  # elements: constants up to this size keep their values in the JSON


@dataclass
class ConstTensor:
    """A constant operand of a node: a weight, a shape, a scalar.

    ``value`` is kept (flattened) for constants of at most ``SMALL_CONSTANT``
    elements — shapes, axes, Clip bounds, scalars — so the JSON alone describes
    the computation; larger ones (weights) live in :attr:`ComputeGraph.weights`
    when the importer had them. ``param_names`` are the learned parameters it
    derives from (empty for literals).
    """

    shape: Shape
    dtype: str = "float32"
    value: list[float] | list[int] | None = None
    param_names: list[str] = field(default_factory=list)


# meta keys that memoise derived facts in memory only (see ComputeGraph.meta).
MEMO_META_KEYS: frozenset[str] = frozenset({"fp"})


@dataclass
class ComputeGraph:
    """A computational graph: nodes in topological order, edges, inputs and outputs."""

    nodes: list[Node]
    edges: list[Edge]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    name: str = ""
    source: str = ""  # "onnx", "torch", "tf" ...
    # Free-form facts (model name, family, ...). ``meta["fp"]`` is an in-memory memo
    # of the fingerprint set by trusted code (store, predictor, service); it is never
    # written out nor read back, so a file cannot claim another graph's identity.
    meta: dict[str, Any] = field(default_factory=dict)
    constants: dict[str, ConstTensor] = field(default_factory=dict)
    # Values of the large constants (weights), by constant name. Not part of the
    # JSON form or of the fingerprint; see save_weights/load_weights.
    weights: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- basic facts -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def total_params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def total_buffers(self) -> int:
        return sum(n.buffers for n in self.nodes)

    @property
    def total_activation_bytes(self) -> int:
        """Bytes of every node output that is new storage (inputs and views excluded)."""
        return sum(n.output_bytes for n in self.nodes if n.op != "Input" and not n.is_view)

    def predecessors(self) -> list[list[int]]:
        preds: list[list[int]] = [[] for _ in self.nodes]
        for e in self.edges:
            preds[e.dst].append(e.src)
        return preds

    def successors(self) -> list[list[int]]:
        succs: list[list[int]] = [[] for _ in self.nodes]
        for e in self.edges:
            succs[e.src].append(e.dst)
        return succs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def weighted_nodes(self) -> list[int]:
        """Indices of nodes with learned parameters, in forward (topological) order."""
        return [i for i, n in enumerate(self.nodes) if n.params > 0]

    def validate(self) -> None:
        """Check indices and topological order; raise :class:`CGError` on the first fault."""
        n = len(self.nodes)
        for k, e in enumerate(self.edges):
            if not (0 <= e.src < n and 0 <= e.dst < n):
                raise CGError(f"edge {k} ({e.src}->{e.dst}) points outside the {n} nodes")
            if e.src >= e.dst:
                raise CGError(
                    f"edge {k} ({e.src}->{e.dst}) breaks topological order "
                    f"({self.nodes[e.src].name} -> {self.nodes[e.dst].name})"
                )

    # -- identity ----------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Stable 16-hex-digit content hash of the architecture (not of weights or names)."""
        h = hashlib.sha256()
        for spec in self.inputs:
            h.update(json.dumps([list(spec.shape), spec.dtype]).encode())
        for node in self.nodes:
            record = [
                node.op,
                sorted((k, _jsonable(v)) for k, v in node.attrs.items()),
                [list(s) for s in node.input_shapes],
                [list(s) for s in node.output_shapes],
                node.output_dtypes,
                node.params,
                node.buffers,
                [
                    [pos, list(c.shape), c.value]
                    for pos, name in enumerate(node.inputs)
                    if (c := self.constants.get(name)) is not None
                ],
            ]
            h.update(json.dumps(record, sort_keys=True, default=str).encode())
        for e in self.edges:
            h.update(f"{e.src}.{e.src_port}>{e.dst}.{e.dst_port};".encode())
        return h.hexdigest()[:16]

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "meta": _jsonable({k: v for k, v in self.meta.items() if k not in MEMO_META_KEYS}),
            "inputs": [_spec_dict(s) for s in self.inputs],
            "outputs": [_spec_dict(s) for s in self.outputs],
            "nodes": [_node_dict(n) for n in self.nodes],
            "edges": [
                [e.src, e.dst, list(e.shape), e.dtype, e.src_port, e.dst_port] for e in self.edges
            ],
            "constants": {
                k: {
                    "shape": list(c.shape),
                    "dtype": c.dtype,
                    "value": c.value,
                    "param_names": c.param_names,
                }
                for k, c in self.constants.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputeGraph:
        if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
            raise CGError("not a computational graph: expected a JSON object with nodes and edges")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise CGError(
                f"CG schema {schema!r} is not supported (this aiop reads {SCHEMA_VERSION})"
            )
        try:
            nodes = [
                Node(
                    name=d["name"],
                    op=d["op"],
                    source_op=d.get("source_op", d["op"]),
                    input_shapes=[tuple(s) for s in d["input_shapes"]],
                    output_shapes=[tuple(s) for s in d["output_shapes"]],
                    output_dtypes=list(d["output_dtypes"]),
                    attrs=dict(d.get("attrs", {})),
                    params=int(d.get("params", 0)),
                    buffers=int(d.get("buffers", 0)),
                    flops=int(d.get("flops", 0)),
                    param_names=list(d.get("param_names", [])),
                    scope=d.get("scope", ""),
                    inputs=list(d.get("inputs", [])),
                    outputs=list(d.get("outputs", [])),
                )
                for d in data["nodes"]
            ]
            edges = [
                Edge(int(e[0]), int(e[1]), tuple(e[2]), e[3], *(int(p) for p in e[4:6]))
                for e in data["edges"]
            ]
            constants = {
                k: ConstTensor(
                    tuple(c["shape"]), c["dtype"], c.get("value"), list(c.get("param_names", []))
                )
                for k, c in data.get("constants", {}).items()
            }
            graph = cls(
                nodes=nodes,
                edges=edges,
                inputs=[
                    TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in data["inputs"]
                ],
                outputs=[
                    TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in data["outputs"]
                ],
                name=data.get("name", ""),
                source=data.get("source", ""),
                meta={k: v for k, v in (data.get("meta") or {}).items() if k not in MEMO_META_KEYS},
                constants=constants,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CGError(f"malformed computational graph JSON: {exc!r}") from None
        graph.validate()
        stored = data.get("fingerprint")
        if stored and stored != graph.fingerprint:
            raise CGError(
                f"graph content does not match its fingerprint ({stored} != {graph.fingerprint})"
            )
        return graph

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> ComputeGraph:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CGError(f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write JSON (gzip-compressed when the name ends in ``.gz``)."""
        path = Path(path)
        text = self.to_json(indent=None if path.suffix == ".gz" else 1).encode()
        path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ComputeGraph:
        path = Path(path)
        if not path.is_file():
            raise CGError(f"no such graph file: {path}")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise CGError(f"{path}: corrupt gzip data ({exc})") from None
        return cls.from_json(raw)

    def save_weights(self, path: str | Path) -> Path:
        """Write :attr:`weights` as safetensors (no pickle)."""
        import numpy as np
        from safetensors.numpy import save_file

        path = Path(path)
        save_file({k: np.ascontiguousarray(v) for k, v in self.weights.items()}, str(path))
        return path

    def load_weights(self, path: str | Path) -> None:
        """Read weights written by :meth:`save_weights`; names must be constants of this graph."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CGError(f"{path}: not readable safetensors weights ({exc})") from None
        unknown = sorted(set(loaded) - set(self.constants))
        if unknown:
            raise CGError(f"{path}: weights {unknown[:3]} are not constants of this graph")
        self.weights.update(loaded)

    def summary(self) -> dict[str, Any]:
        """Headline numbers, as printed by ``aiop cg``."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "nodes": self.num_nodes,
            "edges": self.num_edges,
            "inputs": [list(s.shape) for s in self.inputs],
            "outputs": [list(s.shape) for s in self.outputs],
            "params": self.total_params,
            "flops": self.total_flops,
            "activation_bytes": self.total_activation_bytes,
            "ops": self.op_counts(),
        }


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def _node_dict(node: Node) -> dict[str, Any]:
    d = asdict(node)
    d["input_shapes"] = [list(s) for s in node.input_shapes]
    d["output_shapes"] = [list(s) for s in node.output_shapes]
    d["attrs"] = {k: _jsonable(v) for k, v in node.attrs.items()}
    return d


def _jsonable(value: Any) -> Any:
    """Attributes as JSON values: tuples become lists, bytes become text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value
