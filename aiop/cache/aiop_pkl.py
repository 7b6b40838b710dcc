"""AIO-P ``.pkl`` caches: import (only when trusted) and export.

An AIO-P cache is a pickled list of dicts with ``compute graph`` (AIO-P's own
``ComputeGraph`` object: ``weighted_nodes`` + ``regular_nodes``, ``edge_pairs``
indexing that concatenation, per-node ``resolution`` ``[Hin, Hout, Win, Wout,
Cin, Cout]`` and, for weighted nodes, ``shape`` ``[Cin, Cout, k1, k2]``),
``acc``, ``flops`` (GFLOPs), ``n_params`` (millions), ``original config`` and
task metric keys (``val_PCK``, ``obj_det_AP`` ...), plus ``flops_*`` /
``params_*`` after profiling.

Pickle runs code, so nothing is unpickled without ``trust_pickle``. Even then
the unpickler resolves only plain containers and numpy arrays; every other
class (AIO-P's, which is not installed here, or anything else) becomes an inert
attribute holder, so a trusted file still cannot call ``os.system``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiop.cache.errors import CacheError
from aiop.cache.store import Store, _cg, atomic_write

if TYPE_CHECKING:
    from aiop.cg.graph import ComputeGraph

log = logging.getLogger(__name__)

# AIO-P's task metric keys and the task each belongs to; its profiler suffixes
# ("flops_hpe", "params_obj_det" ...) name the same tasks.
AIOP_TASK_METRICS: dict[str, str] = {
    "val_PCK": "pose",
    "obj_det_AP": "obj_det",
    "inst_seg_AP": "inst_seg",
    "sem_seg_mIoU": "sem_seg",
    "pan_seg_PQ": "pan_seg",
}
_SUFFIX_TASKS = {"hpe": "pose", "pose": "pose"}

# AIO-P's op vocabulary (data/tf_primitive_ops_simplified.txt, index 0 = OOV)
# and the ONNX-named op each becomes here; ops ONNX lacks keep their own name.
AIOP_OP_LABELS: tuple[str, ...] = (
    "<oov>", "input", "output", "conv", "depthwise", "batchnorm", "relu", "relu6", "matmul",
    "add", "mul", "concat", "maxpool", "avgpool", "sigmoid", "tanh", "swish", "gelu",
    "paddings", "mean", "spacetobatchnd", "batchtospacend", "spacetodepthnd", "depthtospacend",
    "global", "identity", "zero", "reserved1", "reserved2", "reserved3", "reserved4", "reserved5",
)  # fmt: skip
_AIOP_TO_OP: dict[str, str] = {
    "input": "Input", "output": "Identity", "conv": "Conv", "depthwise": "Conv",
    "batchnorm": "BatchNormalization", "relu": "Relu", "relu6": "Clip", "matmul": "Gemm",
    "add": "Add", "mul": "Mul", "concat": "Concat", "maxpool": "MaxPool",
    "avgpool": "AveragePool", "sigmoid": "Sigmoid", "tanh": "Tanh", "swish": "Swish",
    "gelu": "Gelu", "paddings": "Pad", "mean": "ReduceMean", "spacetobatchnd": "SpaceToBatchND",
    "batchtospacend": "BatchToSpaceND", "spacetodepthnd": "SpaceToDepth",
    "depthtospacend": "DepthToSpace", "global": "GlobalAveragePool", "identity": "Identity",
    "zero": "Zero",
}  # fmt: skip
# Longest first, so "relu6" wins over "relu" as in AIO-P's OP2I overlap mapping.
_MATCH_ORDER = sorted(_AIOP_TO_OP, key=len, reverse=True)

# Globals a trusted AIO-P pickle may resolve for real: containers and numpy data.
_SAFE_GLOBALS: dict[str, frozenset[str]] = {
    "builtins": frozenset(
        {
            "set",
            "frozenset",
            "list",
            "dict",
            "tuple",
            "complex",
            "slice",
            "range",
            "bytearray",
            "int",
            "float",
            "str",
            "bytes",
            "bool",
            "object",
        }
    ),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter"}),
    "copyreg": frozenset({"_reconstructor", "__newobj__", "__newobj_ex__"}),
    "numpy": frozenset({"ndarray", "dtype", "float64", "float32", "int64", "int32", "bool_"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy.core.numeric": frozenset({"_frombuffer"}),
    "numpy._core.numeric": frozenset({"_frombuffer"}),
    "numpy.dtypes": frozenset({"Float64DType", "Float32DType", "Int64DType", "Int32DType"}),
}


class AiopObject:
    """Inert stand-in for any class a pickle names that is not a plain container."""

    _aiop_class = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._aiop_class}>"


class _InertUnpickler(pickle.Unpickler):
    """Unpickler that resolves safe globals only and stands in for everything else."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_GLOBALS.get(module, ()):
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                pass
        qualname = f"{module}.{name}"
        if qualname not in self.stand_ins:
            if not module.startswith("model_src"):
                log.warning("pickle names %s; using an inert stand-in", qualname)
            self.stand_ins[qualname] = type(name, (AiopObject,), {"_aiop_class": qualname})
        return self.stand_ins[qualname]


def load_aiop_pkl(path: str | os.PathLike[str], *, trust_pickle: bool) -> list[dict[str, Any]]:
    """Read an AIO-P cache into a list of dicts; refuse unless ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such file")
    if not trust_pickle:
        raise CacheError(
            f"refusing to unpickle {path}: pass --trust-pickle if you trust its source"
        )
    try:
        with path.open("rb") as f:
            data = _InertUnpickler(f).load()
    except Exception as exc:  # pickle raises nearly anything on a damaged file
        raise CacheError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict):  # some AIO-P scripts keep {name: entry}
        data = list(data.values())
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise CacheError(f"{path}: not an AIO-P cache (expected a list of dicts)")
    return data


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _aiop_op(label: str, op_type_idx: Any) -> str:
    label = (label or "").lower()
    if label in _AIOP_TO_OP:
        return label
    for key in _MATCH_ORDER:
        if key in label:
            return key
    if isinstance(op_type_idx, int) and 0 < op_type_idx < len(AIOP_OP_LABELS):
        return AIOP_OP_LABELS[op_type_idx]
    return ""


def aiop_graph_to_cg(obj: Any, name: str = "") -> ComputeGraph:
    """Our :class:`ComputeGraph` for AIO-P's graph object (or our own dict form).

    Shapes become NCHW with batch 1; parameters and FLOPs of conv/linear nodes
    follow from their kernel shape and resolution, BatchNorm from its channels.
    Raises :class:`CacheError` when the object is not a usable graph.
    """
    cgm = _cg()
    ComputeGraph, Edge, Node, TensorSpec = cgm.ComputeGraph, cgm.Edge, cgm.Node, cgm.TensorSpec
    if isinstance(obj, Mapping) and "nodes" in obj and "edges" in obj:
        try:
            return ComputeGraph.from_dict(dict(obj))
        except cgm.CGError as exc:
            raise CacheError(f"bad compute graph: {exc}") from None
    weighted = list(_get(obj, "weighted_nodes") or [])
    regular = list(_get(obj, "regular_nodes") or [])
    nodes_in = weighted + regular  # AIO-P's rule: edge indices count weighted nodes first
    pairs = _get(obj, "edge_pairs")
    if not nodes_in or pairs is None:
        raise CacheError("compute graph has no nodes or no edge_pairs")
    n = len(nodes_in)
    try:
        edges_in = [(int(s), int(d)) for s, d in pairs]
    except (TypeError, ValueError):
        raise CacheError("compute graph edge_pairs are not (src, dst) pairs") from None
    if any(not (0 <= s < n and 0 <= d < n) or s == d for s, d in edges_in):
        raise CacheError("compute graph has an edge outside its nodes or a self-loop")
    order = _topological_order(n, edges_in)
    new_index = {old: new for new, old in enumerate(order)}
    input_shape = tuple(_get(obj, "input_shape") or (1, 224, 224, 3))  # NHWC

    out_shapes: dict[int, tuple[int, ...]] = {}
    nodes: list[Node] = []
    preds: dict[int, list[int]] = {i: [] for i in range(n)}
    for s, d in edges_in:
        preds[d].append(s)
    for old in order:
        raw = nodes_in[old]
        label = str(_get(raw, "label", "") or "")
        key = _aiop_op(label, _get(raw, "op_type_idx"))
        res = _get(raw, "resolution")
        try:
            hin, hout, win, wout, cin, cout = (round(float(v)) for v in res)
        except (TypeError, ValueError):
            raise CacheError(
                f"node {label!r} has no [Hin,Hout,Win,Wout,Cin,Cout] resolution"
            ) from None
        out_shape = (1, cout, hout, wout)
        out_shapes[old] = out_shape
        in_shapes = [out_shapes[p] for p in sorted(preds[old])] or [(1, cin, hin, win)]
        meta = _get(raw, "metadata") or {}
        attrs: dict[str, Any] = {}
        params = buffers = flops = 0
        kshape = _get(raw, "shape")
        if kshape is not None and old < len(weighted):
            ci, co, k1, k2 = (round(float(v)) for v in kshape)
            use_bias = bool(_get(meta, "use_bias", False))
            if key == "matmul":
                params, flops = ci * co + (co if use_bias else 0), 2 * ci * co
            else:
                # TF's depthwise kernel is [k1, k2, Cin, multiplier]: same product.
                params = k1 * k2 * ci * co + (
                    (ci * co if key == "depthwise" else co) if use_bias else 0
                )
                flops = 2 * k1 * k2 * ci * co * hout * wout
                attrs["kernel_shape"] = [k1, k2]
            if key == "depthwise":
                attrs["group"] = ci
            attrs["bias"] = use_bias
        elif key == "batchnorm":
            params, buffers = 2 * cout, 2 * cout
        strides = _get(raw, "strides")
        if strides and len(strides) == 4:
            attrs["strides"] = [int(strides[1]), int(strides[2])]
        op = _AIOP_TO_OP.get(key, label or "Unknown")
        nodes.append(
            Node(
                name=str(_get(raw, "str_id", "") or f"n{old}"),
                op=op,
                source_op=f"aio-p:{label}",
                input_shapes=in_shapes,
                output_shapes=[out_shape],
                output_dtypes=["float32"],
                attrs=attrs,
                params=params,
                buffers=buffers,
                flops=flops,
            )
        )
    edges = [Edge(new_index[s], new_index[d], out_shapes[s]) for s, d in sorted(edges_in)]
    edges.sort(key=lambda e: (e.src, e.dst))
    has_succ = {s for s, _ in edges_in}
    h, w, c = (
        (input_shape[1], input_shape[2], input_shape[3]) if len(input_shape) == 4 else (0, 0, 0)
    )
    graph = ComputeGraph(
        nodes=nodes,
        edges=edges,
        inputs=[TensorSpec("input", (1, int(c), int(h), int(w)))],
        outputs=[
            TensorSpec(nodes[new_index[i]].name, out_shapes[i]) for i in order if i not in has_succ
        ],
        name=str(_get(obj, "name", "") or name),
        source="aio-p",
    )
    try:
        graph.validate()
    except cgm.CGError as exc:
        raise CacheError(f"converted graph is invalid: {exc}") from None
    return graph


def _topological_order(n: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Kahn's order, smallest original index first so conversions are deterministic."""
    import heapq

    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for s, d in set(edges):
        succ[s].append(d)
        indeg[d] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for d in succ[i]:
            indeg[d] -= 1
            if indeg[d] == 0:
                heapq.heappush(ready, d)
    if len(order) != n:
        raise CacheError("compute graph has a cycle")
    return order


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class EntryLabels:
    """The labels one AIO-P entry holds, in our units."""

    graph: ComputeGraph
    meta: dict[str, Any]
    labels: list[tuple[str, str, float, dict[str, Any]]]  # (task, kind, value, extra)


def convert_entry(entry: Mapping[str, Any], task: str = "classification") -> EntryLabels:
    """Map one AIO-P entry to our graph and labels (FLOPs and params as plain counts)."""
    if "compute graph" not in entry:
        raise CacheError("entry has no 'compute graph'")
    graph = aiop_graph_to_cg(entry["compute graph"])
    # A merged AIO-P cache ("val_PCK->acc") already holds that task's score in
    # ``acc`` and that task's FLOPs/params in ``flops``/``params``.
    metric_map = entry.get("metric_map")
    if isinstance(metric_map, str) and metric_map.endswith("->acc"):
        source = metric_map.removesuffix("->acc")
        task = AIOP_TASK_METRICS.get(source, task)
    labels: list[tuple[str, str, float, dict[str, Any]]] = []
    for key, raw in entry.items():
        if key in ("compute graph", "original config", "fingerprint"):
            continue
        value = _number(raw)
        if value is None:
            continue
        extra = {"aiop_key": key, "aiop_value": value}
        if key == "flops":
            labels.append((task, "flops", value * 1e9, extra))
        elif key in ("n_params", "params"):
            labels.append((task, "params", value * 1e6, extra))
        elif key.startswith(("flops_", "params_")):
            kind, _, suffix = key.partition("_")
            sub_task = _SUFFIX_TASKS.get(suffix, suffix)
            labels.append((sub_task, kind, value * (1e9 if kind == "flops" else 1e6), extra))
        elif key in AIOP_TASK_METRICS:
            labels.append((AIOP_TASK_METRICS[key], key, value, extra))
        else:  # "acc" and any other metric the entry carries
            labels.append((task, key, value, extra))
    meta: dict[str, Any] = {"imported_from": "aio-p"}
    if "original config" in entry:
        meta["original_config"] = _plain(entry["original config"])
    if isinstance(entry.get("metric_map"), str):
        meta["metric_map"] = entry["metric_map"]
    return EntryLabels(graph, meta, labels)


def _plain(value: Any) -> Any:
    """JSON-able copy of an AIO-P config (tuples, sets and numpy scalars included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


@dataclass
class ImportReport:
    """What an import did: entries read, graphs and labels added, entries skipped and why."""

    path: str
    entries: int = 0
    graphs_added: int = 0
    labels_added: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def import_entries(
    store: Store,
    entries: list[dict[str, Any]],
    *,
    source: str,
    task: str = "classification",
    replace: bool = False,
    batch: int = 256,
    progress: bool = True,
) -> ImportReport:
    """Store AIO-P entries; unconvertible ones are skipped and counted, never half-written.

    Entries commit in batches of ``batch``: a killed import loses at most the
    batch in flight and a re-run skips what is already there.
    """
    from tqdm import tqdm

    report = ImportReport(path=source, entries=len(entries))
    converted: list[EntryLabels] = []
    for entry in entries:
        try:
            converted.append(convert_entry(entry, task))
        except CacheError as exc:
            report.skipped += 1
            reason = str(exc).split(":")[0]
            report.reasons[reason] = report.reasons.get(reason, 0) + 1
    if report.skipped:
        log.warning(
            "%s: skipped %d of %d entries (%s)",
            source,
            report.skipped,
            len(entries),
            report.reasons,
        )
    bar = tqdm(
        total=len(converted), desc=f"import {Path(source).name}", disable=not progress or None
    )
    for start in range(0, len(converted), batch):
        chunk = converted[start : start + batch]
        with store.transaction():
            for item in chunk:
                if not store.has_graph(item.graph.fingerprint):
                    report.graphs_added += 1
                fp = store.put_graph(item.graph, meta=item.meta)
                for sub_task, kind, value, extra in item.labels:
                    report.labels_added += store.put_label(
                        fp, "", kind, value, task=sub_task, extra=extra, tool_version="aio-p",
                        replace=replace,
                    )  # fmt: skip
        bar.update(len(chunk))
    bar.close()
    return report


def import_aiop_pkl(
    store: Store,
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    task: str = "classification",
    replace: bool = False,
) -> ImportReport:
    """Load an AIO-P ``.pkl`` (refused without ``trust_pickle``) into ``store``."""
    entries = load_aiop_pkl(path, trust_pickle=trust_pickle)
    return import_entries(store, entries, source=str(path), task=task, replace=replace)


def export_entries(
    store: Store, *, metric: str = "acc", task: str | None = None
) -> list[dict[str, Any]]:
    """AIO-P-style entries for every graph with a config-independent ``metric`` label.

    ``compute graph`` is our graph's JSON dict (AIO-P's class cannot be rebuilt
    without TensorFlow); ``flops`` is GFLOPs and ``n_params`` millions, as AIO-P's.
    """
    per_graph: dict[str, dict[str, Any]] = {}
    for lab in store.labels(config="", task=task):
        entry = per_graph.setdefault(lab.graph, {})
        if lab.kind == "flops":
            entry.setdefault("flops", lab.value / 1e9)
        elif lab.kind == "params":
            entry.setdefault("n_params", lab.value / 1e6)
        else:
            entry.setdefault(lab.kind, lab.value)
    out = []
    for info in store.graphs():
        labels = per_graph.get(info.fingerprint, {})
        if metric not in labels:
            continue
        entry = {
            "compute graph": store.get_graph(info.fingerprint).to_dict(),
            "flops": info.flops / 1e9,
            "n_params": info.params / 1e6,
            "original config": info.meta.get("original_config", info.name),
            "fingerprint": info.fingerprint,
        }
        entry.update(labels)
        entry["acc"] = labels[metric]
        if metric != "acc":
            entry["metric_map"] = f"{metric}->acc"
        out.append(entry)
    return out


def export_aiop_pkl(
    store: Store, path: str | os.PathLike[str], *, metric: str = "acc", task: str | None = None
) -> int:
    """Write :func:`export_entries` as a pickle (protocol 4, as AIO-P); returns entries written."""
    entries = export_entries(store, metric=metric, task=task)
    atomic_write(Path(path), pickle.dumps(entries, protocol=4))
    return len(entries)
