"""Analytic peak-training-memory estimate from a CG and an m-configuration.

This is the physics the learned predictor corrects. It replays one training
step as PyTorch runs it (what :mod:`aiop.profiler`'s meta-mode tracker counts)
and takes the peak over three phases: the forward pass, the backward pass and
the optimizer step. Static terms:

* **params / buffers**: every parameter (fp32, lite branches included when the
  method inserts them), norm running statistics and BatchNorm batch counters;
* **optimizer**: SGD with momentum one buffer per trainable parameter, Adam/AdamW
  two plus a 4-byte step count per tensor;
* **grads**: one fp32 gradient per trainable parameter (only the bias of a layer
  under the ``bias`` methods) — alive through every micro-batch after the first
  with accumulation, made during backward without it.

The step's timeline (per-sample bytes × micro-batch, plus batch-independent bytes):

* **saved tensors** (``derivatives.yaml``): a convolution keeps its input and
  weight whenever any of its inputs needs a gradient (a frozen convolution inside
  the trained part too); a linear layer (Gemm, MatMul with a weight) keeps its
  input only for its weight's gradient and its weight only for its input's;
  norms their input (LayerNorm also per-row statistics); ReLU/Sigmoid/Tanh/Softmax
  their output; ReLU6, HardSwish, GELU, SiLU and friends their input; products of
  two activations each operand; max-pooling its input and int64 indices; Dropout
  its mask. Only ops on a gradient path save anything. Export patterns that are
  one op in PyTorch (``x * sigmoid(x)``, the Erf form of GELU, MatMul + Add) count
  as that op, found by :mod:`aiop.cg.to_torch`'s own matcher;
* **lifetimes**: a tensor lives until its last use, or longer where Python holds
  it (module arguments until the module returns; a child's result used by the
  parent's return expression until the parent returns), or until backward when
  saved; a view keeps its base alive; views (Transpose, ``x[0]``, Reshape of a
  contiguous tensor) are free, Reshape after a Transpose copies; unread outputs
  (BatchNorm's running statistics) cost nothing; max-pooling makes indices even
  without autograd; the batch lives through the forward pass;
* **backward**: reverse order; a gradient lives from the op that makes it to the
  op that consumes it (views, Add and Concat pass it on without a copy); a saved
  tensor is freed after its first saver's backward; each parameter gradient is
  made at its op (with accumulation: made afresh and added into ``.grad``);
* **gradient checkpointing**: a segment keeps only its inputs; backward recomputes
  it and frees the recomputed tensors like saved ones;
* **precision**: under a bf16/fp16 autocast convolutions and matrix products run
  in half (binary ops and Concat promote with fp32 operands, the rest follow their
  input); they save autocast's half copy of an fp32 input and a half copy of their
  weight; trainable weights' copies are cached until the forward pass ends; a
  weight gradient is made in half first, then cast to fp32;
* **optimizer step**: every gradient, plus for Adam/AdamW the square root and
  the division of the largest tensor (``foreach=False``); no autocast cache;
* **TinyTL lite methods**: simulated on the graph with the lite branches
  inserted (:func:`with_lite_branches`).

A CG is built at batch 1 (its input's first dimension); per-sample bytes scale
with the micro-batch. The breakdown reports ``activations`` (saved at the end of
the forward pass), ``temporary`` (the rest of the dynamic peak), and ``inputs``
(one micro-batch, already part of the timeline).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

from aiop.cg.flops import node_flops
from aiop.cg.graph import ComputeGraph, ConstTensor, Edge, Node, tensor_bytes
from aiop.cg.lite import block_lite_spec
from aiop.cg.vocab import VIEW_OPS
from aiop.mconfig import MConfig
from aiop.mconfig.config import CGPlanner, node_blocks
from aiop.predictor.latency import LatencyGraph, LatencyPlan, latency_graph, latency_plan

_SAVES_OUTPUT = frozenset(
    {"Relu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Sqrt", "Exp", "Reciprocal"}
)
_SAVES_INPUT = frozenset(
    {
        "Clip",
        "LeakyRelu",
        "HardSigmoid",
        "HardSwish",
        "Gelu",
        "SiLU",
        "Erf",
        "Elu",
        "Selu",
        "Softplus",
        "Mish",
        "Log",
        "Abs",
        "Pow",
        "GlobalAveragePool",
        "AveragePool",
        "GlobalMaxPool",
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
    }
)
_WEIGHT_INPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_SAVES_NOTHING = frozenset(
    {
        "Add",
        "Sub",
        "Neg",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Expand",
        "Pad",
        "Resize",
        "DepthToSpace",
        "SpaceToDepth",
        "Tile",
        "Cast",
        "ReduceMean",
        "ReduceSum",
        "Input",
    }
)
_ALIAS_OPS = VIEW_OPS | {"Transpose"}  # outputs that share their input's storage
# ops autocast runs in half precision (CPU and CUDA lower-precision lists)
_LOW_PRECISION_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ops whose output dtype follows type promotion over all their operands
_PROMOTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Concat"})
# ops whose backward hands their output's gradient to their inputs without a copy
_GRAD_PASSING_OPS = _ALIAS_OPS | {"Add", "Concat", "Identity"}
# norms that keep fp32 mean and rstd per normalised row
_ROW_STAT_NORMS = frozenset({"LayerNormalization"})
_HALF_PRECISIONS = frozenset({"bf16", "fp16"})
_OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2}
_TARGET_BYTES = 8  # int64 class labels


@dataclass
class MemoryEstimate:
    """Analytic peak memory of one training step and its breakdown (bytes)."""

    peak_memory_bytes: int
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int
    temporary: int
    inputs: int
    trainable_params: int

    @property
    def breakdown(self) -> dict[str, int]:
        # (built directly: dataclasses.asdict deep-copies and costs more than the estimate)
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "temporary": self.temporary,
            "inputs": self.inputs,
        }

    def to_dict(self) -> dict[str, int | dict[str, int]]:
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            "breakdown": {**self.breakdown, "buffers": self.buffers},
            "trainable_params": self.trainable_params,
        }


def _graph_batch(cg: ComputeGraph) -> int:
    shapes = [s.shape for s in cg.inputs if s.shape]
    return max(1, int(shapes[0][0])) if shapes else 1


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(int(d) for d in shape)


@dataclass
class GraphInfo:
    """The configuration-independent facts about a CG that the step simulation reads.

    ``preds``: each node's dynamic inputs ``(src, src_port, dst_port)`` (edges from
    constant-only nodes left out: they are weights, not activations). ``storage``:
    the storage each output shares (views alias their input's). ``sizes_full`` /
    ``sizes_half``: bytes of every output at the CG's batch in fp32 and under a
    half-precision autocast (see :func:`_half_outputs`). ``weight_numel``: elements of
    a weighted node's largest parameter (its weight), ``bias_numel`` the rest.
    """

    preds: list[list[tuple[int, int, int]]]
    storage: list[list[tuple[int, int]]]
    sizes_full: dict[tuple[int, int], int]
    sizes_half: dict[tuple[int, int], int]
    in_numel: dict[tuple[int, int], int]
    weight_numel: list[int]
    bias_numel: list[int]
    param_tensors: list[int]
    is_const: list[bool]
    eff_op: list[str]  # the op each node runs as (fused patterns: their last node)
    inner_of: dict[int, int]  # nodes folded into a fused op -> the fused op's last node
    trainable_scale: list[bool]  # Mul/Div by a learned parameter (a layer scale)
    outputs: frozenset[tuple[int, int]]
    last_uses: dict[tuple[int, int], int]
    indices: dict[int, int]  # max-pooling nodes -> bytes of their int64 indices
    # every storage the forward pass makes: its op, the op after which it is freed (n: kept
    # to the end), its bytes in fp32 and under autocast, and its position by key
    fwd_alloc: np.ndarray
    fwd_release: np.ndarray
    fwd_size_full: np.ndarray
    fwd_size_half: np.ndarray
    fwd_key_pos: dict[tuple[int, int], int]
    data_in: list[list[tuple[int, int, int]]]  # each node's data input(s)
    n_ports: list[int]
    total_params: int
    buffer_bytes: int  # norm running statistics and BatchNorm's batch counters
    half_copy: list[int]  # bytes of the half weight copy autocast makes for the node
    # :func:`saved_tensors` results by (trainable nodes, weight-trainable nodes, grad sources,
    # half): configs that differ only in checkpointing share them
    saved_memo: dict[tuple, tuple] = field(default_factory=dict, repr=False, compare=False)


def _half_outputs(
    cg: ComputeGraph, preds: list[list[tuple[int, int, int]]], eff_op: list[str]
) -> list[bool]:
    """Which nodes produce half-width floats under a bf16/fp16 autocast (CPU rules).

    Convolutions and matrix products run in half; binary ops and Concat promote to
    fp32 when an operand is an fp32 activation or an fp32 constant with at least one
    dimension (type promotion: 0-dim constants, i.e. Python scalars, do not promote);
    every other op (norms, activations, pooling, softmax on CPU) keeps its input's
    dtype.
    """
    half = [False] * cg.num_nodes
    for i, node in enumerate(cg.nodes):
        dyn = preds[i]
        op = eff_op[i]
        if op == "Input" or not dyn:
            continue
        if op in _LOW_PRECISION_OPS:
            half[i] = True
        elif op in _PROMOTING_OPS:
            consts = [cg.constants[k] for k in node.inputs if k in cg.constants]
            wide_const = any(
                len(c.shape) >= 1 and _numel(c.shape) > 1 and str(c.dtype).startswith("float")
                for c in consts
            )
            half[i] = not wide_const and all(half[s] for s, _, _ in dyn)
        else:
            data = [d for d in dyn if d[2] == 0] or dyn[:1]
            half[i] = half[data[0][0]]
    return half


def _views(cg: ComputeGraph, preds: list[list[tuple[int, int, int]]]) -> list[bool]:
    """Which nodes return a view of their input (no new storage), as PyTorch would.

    Transpose, Squeeze, Unsqueeze, Expand, and Gather of one constant index (``x[0]``,
    a ``select``) are views; Reshape and Flatten are views of a contiguous input but
    copy one that a Transpose (of dimensions larger than 1) left non-contiguous, as
    ``.reshape`` does (``x.permute(...).reshape(...)``, ``out.transpose(1, 2).reshape(...)``).
    """
    n = cg.num_nodes
    view = [False] * n
    strided = [False] * n  # the output is a non-contiguous view
    for i, node in enumerate(cg.nodes):
        if not preds[i]:
            continue
        src = preds[i][0][0]
        op = node.op
        if op == "Transpose":
            view[i] = True
            perm = node.attrs.get("perm")
            shape = node.input_shapes[0] if node.input_shapes else ()
            moved = [
                d for d in (perm or range(len(shape))[::-1]) if d < len(shape) and shape[d] > 1
            ]
            strided[i] = strided[src] or moved != sorted(moved)
        elif op in ("Squeeze", "Unsqueeze", "Expand"):
            view[i] = True
            strided[i] = strided[src] or op == "Expand"
        elif op in ("Reshape", "Flatten"):
            view[i] = not strided[src]
        elif op == "Gather" and len(node.inputs) > 1:
            index = cg.constants.get(node.inputs[1])
            if index is not None and len(index.shape) == 0:
                view[i] = True
                strided[i] = strided[src] or int(node.attrs.get("axis", 0)) != 0
    return view


def graph_info(cg: ComputeGraph, last_uses: dict[tuple[int, int], int] | None = None) -> GraphInfo:
    """Precompute :class:`GraphInfo` for ``cg`` (once per graph)."""
    n = cg.num_nodes
    all_preds: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for e in cg.edges:
        all_preds[e.dst].append((e.src, e.src_port, e.dst_port))
    is_const = [False] * n
    for i, node in enumerate(cg.nodes):
        is_const[i] = node.op != "Input" and all(is_const[s] for s, _, _ in all_preds[i])
    preds = [[p for p in ps if not is_const[p[0]]] for ps in all_preds]
    # What the network runs where the export decomposed one op (x * sigmoid(x) is
    # SiLU, the Erf form GELU, MatMul + Add a linear layer): the patterns the
    # CG-to-PyTorch builder fuses back, found by its own matcher.
    from aiop.cg.to_torch import fusions

    producer = {t: (i, p) for i, node in enumerate(cg.nodes) for p, t in enumerate(node.outputs)}
    eff_op = [node.op for node in cg.nodes]
    inner_of: dict[int, int] = {}
    linear_of: dict[int, int] = {}  # fused linear's last node -> its MatMul
    for j, (kind, idx, extra) in fusions(cg).items():
        for k in idx:
            if k != j:
                inner_of[k] = j
                preds[k] = []
        if kind in ("SiLU", "Gelu"):
            src = producer.get(extra.get("x", ""))
            preds[j] = [(src[0], src[1], 0)] if src and not is_const[src[0]] else []
            eff_op[j] = kind
        elif kind == "Linear":
            preds[j] = [(s, sp, 0) for s, sp, _ in all_preds[idx[0]] if not is_const[s]]
            eff_op[j] = "Gemm"
            linear_of[j] = idx[0]
    aliases = _views(cg, preds)
    storage: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for i, node in enumerate(cg.nodes):
        ports = max(1, len(node.output_shapes))
        if aliases[i]:
            s, sp, _ = preds[i][0]
            base = storage[s][sp] if sp < len(storage[s]) else (s, sp)
            storage[i] = [base] * ports
        else:
            storage[i] = [(i, p) for p in range(ports)]
    half = _half_outputs(cg, preds, eff_op)
    sizes_full: dict[tuple[int, int], int] = {}
    sizes_half: dict[tuple[int, int], int] = {}
    for i, node in enumerate(cg.nodes):
        for p, (shape, dtype) in enumerate(zip(node.output_shapes, node.output_dtypes)):
            full = 0 if is_const[i] or i in inner_of else tensor_bytes(shape, dtype)
            if p > 0 and node.op == "BatchNormalization":
                full = 0  # training-mode running statistics: the buffers, updated in place
            sizes_full[(i, p)] = full
            floating = dtype in ("float32", "float16", "bfloat16", "float64")
            sizes_half[(i, p)] = _numel(shape) * 2 if (half[i] and floating and full) else full
    in_numel = {(i, p): _numel(s) for (i, p) in sizes_full for s in [cg.nodes[i].output_shapes[p]]}
    weight_numel = [0] * n
    bias_numel = [0] * n
    param_tensors = [0] * n
    trainable_scale = [False] * n
    for i, node in enumerate(cg.nodes):
        if node.params <= 0:
            continue
        sizes = [
            _numel(cg.constants[k].shape)
            for k in node.inputs
            if k in cg.constants and cg.constants[k].param_names
        ]
        weight = max(sizes) if sizes else node.params
        weight_numel[i] = min(weight, node.params)
        bias_numel[i] = node.params - weight_numel[i]
        param_tensors[i] = max(1, len(node.param_names) or len(sizes))
        trainable_scale[i] = node.op in ("Mul", "Div")
    for j, m in linear_of.items():
        weight_numel[j], bias_numel[j] = weight_numel[m], cg.nodes[j].params
        param_tensors[j] = param_tensors[m] + param_tensors[j]
    outputs = frozenset(
        (i, p)
        for i, node in enumerate(cg.nodes)
        for p, name in enumerate(node.outputs)
        if any(name == o.name for o in cg.outputs)
    )
    last_uses = _last_uses(cg) if last_uses is None else last_uses
    # A storage lives until the last use of any view of it (``v = qkv[2]`` keeps qkv).
    base_last: dict[tuple[int, int], int] = {}
    for (src, port), last in last_uses.items():
        st = storage[src]
        base = st[port] if port < len(st) else (src, port)
        if cg.nodes[base[0]].op == "Input":
            last = n - 1  # the training loop holds the batch until the loss is computed
        base_last[base] = max(base_last.get(base, -1), last)
    for i, node in enumerate(cg.nodes):  # outputs nobody reads die with their op
        for p in range(len(node.output_shapes)):
            if not aliases[i] and (i, p) not in base_last and (i, p) not in outputs:
                base_last[(i, p)] = i
    fwd_keys = [
        (i, p)
        for i, node in enumerate(cg.nodes)
        if not (is_const[i] or i in inner_of or aliases[i])
        for p in range(len(node.output_shapes))
    ]
    half_copy = [
        2 * weight_numel[i] if eff_op[i] in _LOW_PRECISION_OPS and i not in inner_of else 0
        for i in range(n)
    ]
    return GraphInfo(
        preds=preds,
        storage=storage,
        sizes_full=sizes_full,
        sizes_half=sizes_half,
        in_numel=in_numel,
        weight_numel=weight_numel,
        bias_numel=bias_numel,
        param_tensors=param_tensors,
        is_const=is_const,
        eff_op=eff_op,
        inner_of=inner_of,
        trainable_scale=trainable_scale,
        outputs=outputs,
        last_uses=last_uses,
        fwd_alloc=np.asarray([k[0] for k in fwd_keys], dtype=np.int64),
        fwd_release=np.asarray(
            [n if k in outputs else base_last.get(k, n) for k in fwd_keys], dtype=np.int64
        ),
        fwd_size_full=np.asarray([sizes_full.get(k, 0) for k in fwd_keys], float),
        fwd_size_half=np.asarray([sizes_half.get(k, 0) for k in fwd_keys], float),
        fwd_key_pos={k: j for j, k in enumerate(fwd_keys)},
        data_in=[[d for d in ps if d[2] == 0] or ps[:1] for ps in preds],
        n_ports=[max(1, len(node.output_shapes)) for node in cg.nodes],
        total_params=cg.total_params,
        buffer_bytes=4 * cg.total_buffers
        + 8 * sum(1 for node in cg.nodes if node.op == "BatchNormalization"),
        # max_pool2d_with_indices makes them even without autograd (off the CPU fast path)
        indices={
            i: tensor_bytes(node.output_shapes[0], "int64")
            for i, node in enumerate(cg.nodes)
            if node.op == "MaxPool" and node.output_shapes
        },
        half_copy=half_copy,
    )


@dataclass
class _Saves:
    """What one node's autograd function keeps for backward."""

    keys: set[tuple[int, int]] = field(default_factory=set)  # activations (per-sample bytes)
    weight: int = 0  # a half-width copy of its weight (batch-independent bytes)
    extra: tuple[tuple[int, int], ...] = ()  # tensors it makes besides its outputs


def saved_tensors(
    cg: ComputeGraph,
    own_trainable: list[bool],
    grad_sources: frozenset[int] = frozenset(),
    *,
    weight_trainable: list[bool] | None = None,
    half: bool = False,
    info: GraphInfo | None = None,
) -> tuple[list[bool], dict[tuple[int, int], int], list[_Saves]]:
    """Which tensors autograd keeps, at the CG's batch size.

    Returns ``requires_grad`` per node, the bytes of every storage (keyed by
    producer node and output port; ``(i, -k)`` for tensors an op makes besides its
    outputs: max-pooling indices, dropout masks, norm statistics, autocast copies
    of its input) and what each node saves. The rules are those of
    ``derivatives.yaml``:

    * ``convolution`` saves input and weight whenever any of its inputs needs a
      gradient (a frozen convolution inside the trained part keeps its input too);
    * ``addmm``/``mm`` (Gemm, MatMul with a weight) save the input only to compute
      the weight's gradient and the weight only for the input's; a bias-only
      linear layer saves nothing;
    * under autocast the saved input is the half-width copy autocast made, and the
      saved weight a half-width copy too (batch-independent bytes).
    """
    info = graph_info(cg) if info is None else info
    weight_trainable = own_trainable if weight_trainable is None else weight_trainable
    n = cg.num_nodes
    preds = info.preds
    sizes = dict(info.sizes_half if half else info.sizes_full)
    requires_grad = [False] * n
    for i in range(n):
        rg = own_trainable[i] or i in grad_sources
        if not rg:
            for s, _, _ in preds[i]:
                if requires_grad[s]:
                    rg = True
                    break
        requires_grad[i] = rg

    def key_of(src: int, port: int) -> tuple[int, int]:
        st = info.storage[src]
        return st[port] if port < len(st) else (src, port)

    def cast_input(i: int, src: int, port: int, k: int) -> tuple[int, int]:
        """The tensor a half-precision op saves for its input ``k``: autocast's copy when
        the input is an fp32 activation."""
        key = key_of(src, port)
        if (
            not half
            or sizes.get(key, 0) == 0
            or info.sizes_half.get(key) != info.sizes_full.get(key)
        ):
            return key  # already half (or not a float)
        cast = (i, -10 - k)
        sizes[cast] = info.in_numel.get((src, port), 0) * 2
        return cast

    nothing = _Saves()  # shared by the nodes that save nothing (never modified)
    saves = [nothing] * n
    for i, node in enumerate(cg.nodes):
        if not requires_grad[i] or i in info.inner_of:
            continue
        saves[i] = _Saves()
        op = info.eff_op[i]
        dyn = preds[i]
        data_in = info.data_in[i]
        input_grad = any(requires_grad[s] for s, _, _ in dyn)
        kept = saves[i].keys
        if op in ("Conv", "ConvTranspose"):
            kept.update(cast_input(i, s, sp, k) for k, (s, sp, _) in enumerate(data_in))
            if half:
                saves[i].weight = 2 * info.weight_numel[i]
        elif op in _WEIGHT_INPUT_OPS or (op == "MatMul" and info.weight_numel[i] and len(dyn) == 1):
            if weight_trainable[i]:
                kept.update(cast_input(i, s, sp, k) for k, (s, sp, _) in enumerate(data_in))
            if half and input_grad:
                saves[i].weight = 2 * info.weight_numel[i]
        elif op in ("MatMul", "Mul", "Div", "Max", "Min", "Where") and len(dyn) >= 2:
            # each operand is kept for the other's gradient
            for k, (s, sp, _) in enumerate(dyn):
                if any(requires_grad[t] for j, (t, _, _) in enumerate(dyn) if j != k):
                    key = cast_input(i, s, sp, k) if op == "MatMul" else key_of(s, sp)
                    kept.add(key)
            if op == "Div":  # x / y keeps y and the output
                kept.add(key_of(i, 0))
        elif op in ("Mul", "Div") and own_trainable[i] and info.trainable_scale[i]:
            kept.update(key_of(s, sp) for s, sp, _ in data_in)  # a learned scale's gradient
        elif op in ("Mul", "Div", "MatMul", "Max", "Min", "Where"):
            pass  # times a constant: keeps the constant only
        elif op in _SAVES_OUTPUT:
            kept.add(key_of(i, 0))
        elif op in _SAVES_INPUT:
            kept.update(key_of(s, sp) for s, sp, _ in data_in)
            if op in _ROW_STAT_NORMS and node.output_shapes and node.output_shapes[0]:
                shape = node.output_shapes[0]
                rows = _numel(shape) // max(1, int(shape[-1]))
                sizes[(i, -2)] = 8 * rows  # fp32 mean and rstd per row
                kept.add((i, -2))
        elif op == "MaxPool":
            kept.update(key_of(s, sp) for s, sp, _ in data_in)
            if node.output_shapes:
                sizes[(i, -1)] = tensor_bytes(node.output_shapes[0], "int64")  # indices
                kept.add((i, -1))
        elif op == "Dropout":
            if node.output_shapes:
                sizes[(i, -1)] = tensor_bytes(node.output_shapes[0], "bool")  # mask
                kept.add((i, -1))
        elif op in _SAVES_NOTHING:
            pass
        else:  # unknown: assume it keeps its input, the common case
            kept.update(key_of(s, sp) for s, sp, _ in data_in)
    for sv in saves:
        if sv.keys:
            sv.extra = tuple(k for k in sv.keys if k[1] < 0)  # (never the shared empty one)
    return requires_grad, sizes, saves


def _scope_levels(scope: str) -> list[str]:
    parts = [p for p in scope.split("/") if p]
    return ["/".join(parts[: k + 1]) for k in range(len(parts))]


def _last_uses(cg: ComputeGraph) -> dict[tuple[int, int], int]:
    """The node after which each tensor can be freed in the forward pass.

    A tensor lives until its last consumer ran, and longer where Python holds it
    (the rules of :mod:`aiop.cg.to_torch`'s ``locals`` lifetimes, read from the
    exporter's module scopes): the caller holds an argument until the module it
    enters returns (``x = block(x)``), i.e. until the module's last node ran; and a
    child module's result that its parent's return expression (the parent's last
    own op) uses is a named local of the parent until the parent returns (``out =
    self.conv3(...)``; ``identity = self.downsample(x)``; ``return self.act(out +
    identity)``).
    """
    last_in_scope: dict[str, int] = {}
    own_last: dict[str, int] = {}
    levels = [_scope_levels(node.scope) for node in cg.nodes]
    for i, lv in enumerate(levels):
        for scope in lv:
            last_in_scope[scope] = i
        own_last["/".join(p for p in cg.nodes[i].scope.split("/") if p)] = i
    last: dict[tuple[int, int], int] = {}
    for e in cg.edges:
        end = e.dst
        src_scope = cg.nodes[e.src].scope
        for scope in levels[e.dst]:
            if not (src_scope == scope or src_scope.startswith(scope + "/")):
                end = max(end, last_in_scope[scope])
        if levels[e.dst]:
            own = levels[e.dst][-1]
            if src_scope.startswith(own + "/") and own_last.get(own) == e.dst:
                end = max(end, last_in_scope[own])
        key = (e.src, e.src_port)
        last[key] = max(last.get(key, -1), end)
    return last


@dataclass(frozen=True)
class ActivationProfile:
    """The memory timeline of one micro-batch's forward and backward pass.

    Every point of a timeline holds per-sample bytes (at the CG's batch: multiply
    by micro-batch / CG batch) and batch-independent bytes (half-width weight
    copies autocast made). ``forward_*``: after each forward op. ``backward_*``:
    while each backward op runs; ``backward_grads`` the parameter-gradient bytes
    allocated so far and ``backward_fresh`` those the op itself makes
    allocated so far (without accumulation: with it they are all alive).
    ``saved`` / ``saved_fixed``: what autograd keeps when the forward pass ends.
    """

    forward_act: tuple[int, ...]
    forward_fixed: tuple[int, ...]
    backward_act: tuple[int, ...]
    backward_fixed: tuple[int, ...]
    backward_grads: tuple[int, ...]
    saved: int
    saved_fixed: int = 0
    backward_fresh: tuple[int, ...] = ()

    @property
    def forward_peak(self) -> int:
        """The most per-sample bytes alive at once in the forward pass."""
        return max(self.forward_act, default=0)


@dataclass(frozen=True)
class _GradientWalk:
    """The part of the backward walk that checkpointing does not change: which gradient
    storages are alive at each timeline point, and the parameter gradients made so far.

    ``points``: per backward op (reverse forward order, ops that need a gradient only):
    its node, the gradient bytes alive while it runs (fp32, autocast), the half-width
    weight gradient it makes under autocast (0: none) and the gradient bytes alive once
    that is cast (fp32, autocast). ``grads`` / ``fresh``: per mode, the parameter-gradient
    bytes of :class:`ActivationProfile` at every timeline point.
    """

    points: tuple[tuple[int, int, int, int, int, int], ...]
    grads: tuple[list[int], list[int]]
    fresh: tuple[list[int], list[int]]


def _gradient_walk(
    info: GraphInfo,
    requires_grad: list[bool],
    size_f: dict[tuple[int, int], int],
    size_h: dict[tuple[int, int], int],
    weight_trainable: list[bool],
    train_numel: list[int],
) -> _GradientWalk:
    """Walk the backward pass once for the gradients alone (see :func:`simulate_both`):
    a gradient lives from the op that makes it to the op that consumes it; views, Add
    and Concat pass their output's gradient on without a copy; two gradients of one
    tensor are summed into a new one."""
    grad_store: dict[int, list[int]] = {}  # id -> [fp32 bytes, autocast bytes, references]
    pending: dict[tuple[int, int], int] = {}  # (node, port) -> storage id of its gradient
    grad_live = [0, 0]
    next_id = 0

    def new_grad(key: tuple[int, int]) -> int:
        nonlocal next_id
        next_id += 1
        f, h = size_f.get(key, 0), size_h.get(key, 0)
        grad_store[next_id] = [f, h, 1]
        grad_live[0] += f
        grad_live[1] += h
        return next_id

    def release(sid: int) -> None:
        entry = grad_store[sid]
        entry[2] -= 1
        if entry[2] == 0:
            grad_live[0] -= entry[0]
            grad_live[1] -= entry[1]
            del grad_store[sid]

    preds, n_ports = info.preds, info.n_ports
    for key in info.outputs:  # the loss's gradient of the logits
        pending[key] = new_grad(key)
    param_grads = 0
    points: list[tuple[int, int, int, int, int, int]] = []
    grads: tuple[list[int], list[int]] = ([], [])
    fresh_s: tuple[list[int], list[int]] = ([], [])
    for i in range(len(requires_grad) - 1, -1, -1):
        if not requires_grad[i]:
            continue
        param_grads += 4 * train_numel[i]
        outs = [sid for p in range(n_ports[i]) if (sid := pending.pop((i, p), None)) is not None]
        passes = info.eff_op[i] in _GRAD_PASSING_OPS and len(outs) == 1
        grads_in: list[tuple[tuple[int, int], int]] = []
        for s, sp, _ in preds[i]:
            if not requires_grad[s]:
                continue
            if passes:
                grad_store[outs[0]][2] += 1
                grads_in.append(((s, sp), outs[0]))
            else:
                grads_in.append(((s, sp), new_grad((s, sp))))
        # A parameter's gradient is made here; with accumulation it is then added into
        # ``.grad`` and freed. Under autocast the op makes it for the half copy of the
        # weight, and the cast's own backward turns it into fp32 after the op has
        # released what it saved (the copy among it).
        half_grad = (
            2 * info.weight_numel[i]
            if weight_trainable[i] and info.eff_op[i] in _LOW_PRECISION_OPS
            else 0
        )
        fresh = 4 * train_numel[i]
        during = (grad_live[0], grad_live[1])
        grads[0].append(param_grads)
        fresh_s[0].append(fresh)
        grads[1].append(param_grads - (fresh if half_grad else 0))
        fresh_s[1].append(0 if half_grad else fresh)
        for sid in outs:
            release(sid)
        for key, sid in grads_in:
            old = pending.get(key)
            if old is None:
                pending[key] = sid
            else:  # accumulate: a new sum replaces both
                total = new_grad(key)
                release(old)
                release(sid)
                pending[key] = total
        if half_grad:  # (in fp32 a plain moment after the op)
            grads[0].append(param_grads)
            fresh_s[0].append(0)
            grads[1].append(param_grads)
            fresh_s[1].append(fresh)
        points.append((i, during[0], during[1], half_grad, grad_live[0], grad_live[1]))
    return _GradientWalk(tuple(points), grads, fresh_s)


def simulate_step(
    cg: ComputeGraph,
    own_trainable: list[bool],
    segments_of_node: list[int | None],
    last_uses: dict[tuple[int, int], int] | None = None,
    grad_sources: frozenset[int] = frozenset(),
    *,
    weight_trainable: list[bool] | None = None,
    train_numel: list[int] | None = None,
    half: bool = False,
    info: GraphInfo | None = None,
) -> ActivationProfile:
    """Walk the forward and the backward pass once, tracking which storages are alive.

    ``grad_sources`` are nodes whose output needs a gradient although no
    parameter of theirs trains (a trainable side branch is added to them).
    ``train_numel``: trainable parameter elements per node (default: all of a
    trainable node's). ``half``: under a bf16/fp16 autocast.

    Forward: a tensor lives until its last consumer ran (longer for module
    arguments, see :func:`_last_uses`) or, when saved, until backward frees it;
    the graph inputs until the forward pass ends (the training loop holds the
    batch). Autocast caches the half copy of every trainable weight until the
    forward pass ends; other copies live for their op only unless saved.
    Backward (reverse forward order, as autograd's ready queue runs on one device):
    a gradient lives from the op that makes it to the op that consumes it;
    views, Add and Concat pass their output's gradient on without a copy; a saved
    tensor is freed after the first (in forward order) op that saved it ran its
    backward. A checkpointed segment saves only its inputs; backward recomputes it
    whole when it reaches it, and its
    saved tensors are then freed like any others (measured: no separate peak of the
    recomputation itself shows above the backward pass through the segment).
    """
    full, halved = simulate_both(
        cg,
        own_trainable,
        segments_of_node,
        last_uses,
        grad_sources,
        weight_trainable=weight_trainable,
        train_numel=train_numel,
        info=info,
    )
    return halved if half else full


def simulate_both(
    cg: ComputeGraph,
    own_trainable: list[bool],
    segments_of_node: list[int | None],
    last_uses: dict[tuple[int, int], int] | None = None,
    grad_sources: frozenset[int] = frozenset(),
    *,
    weight_trainable: list[bool] | None = None,
    train_numel: list[int] | None = None,
    info: GraphInfo | None = None,
) -> tuple[ActivationProfile, ActivationProfile]:
    """:func:`simulate_step` in fp32 and under autocast at once: the two share every
    lifetime but for autocast's copies, so one walk tracks both byte counts."""
    info = graph_info(cg, last_uses) if info is None else info
    weight_trainable = own_trainable if weight_trainable is None else weight_trainable
    if train_numel is None:
        train_numel = [cg.nodes[i].params if own_trainable[i] else 0 for i in range(cg.num_nodes)]
    if info.inner_of:  # a fused op trains what its parts train
        own_trainable, weight_trainable, train_numel = (
            list(own_trainable),
            list(weight_trainable),
            list(train_numel),
        )
        for k, j in info.inner_of.items():
            if cg.nodes[k].params:
                own_trainable[j] = own_trainable[j] or own_trainable[k]
                weight_trainable[j] = weight_trainable[k]
            train_numel[j] += train_numel[k]
            own_trainable[k], weight_trainable[k], train_numel[k] = False, False, 0
    n = cg.num_nodes
    preds = info.preds
    modes = []  # per precision: sizes, saves, kept, per-node saved weight copies
    requires_grad: list[bool] = []
    memo_key = (tuple(own_trainable), tuple(weight_trainable), grad_sources)
    seg_nodes = [i for i, seg in enumerate(segments_of_node) if seg is not None]
    seg_inputs: set[tuple[int, int]] | None = None
    extras_of: list[tuple[list[tuple[int, tuple[int, int], int]], list[tuple[int, int]]]] = []
    for half in (False, True):
        memo = info.saved_memo.get((*memo_key, half))
        if memo is None:
            saved = saved_tensors(
                cg,
                own_trainable,
                grad_sources,
                weight_trainable=weight_trainable,
                half=half,
                info=info,
            )
            _, sizes, saves = saved
            memo = info.saved_memo[(*memo_key, half)] = (
                *saved,
                [i for i in range(n) if saves[i].keys or saves[i].weight],  # the savers
                # tensors ops make besides their outputs (indices, masks, casts), and
                # max-pooling's indices where nothing saves them
                (
                    [(i, key, sizes[key]) for i in range(n) for key in saves[i].extra],
                    [(i, b) for i, b in info.indices.items() if not saves[i].extra],
                ),
            )
        requires_grad, sizes, saves, savers, extras = memo  # (read only: shared by calls)
        extras_of.append(extras)
        kept: set[tuple[int, int]] = set()
        fixed_saver: list[int] = [0] * n  # saved weight copies, by the node that saved them
        for i in savers:
            if segments_of_node[i] is None:
                kept.update(saves[i].keys)
                fixed_saver[i] = saves[i].weight
        if seg_inputs is None:  # a segment keeps its inputs from outside (either precision)
            seg_inputs = set()
            for i in seg_nodes:
                if requires_grad[i]:
                    seg = segments_of_node[i]
                    for s, sp, _ in preds[i]:
                        if segments_of_node[s] != seg:
                            st = info.storage[s]
                            seg_inputs.add(st[sp] if sp < len(st) else (s, sp))
        kept |= seg_inputs
        modes.append((sizes, saves, kept, fixed_saver))
    grad_on = any(requires_grad)

    # -- forward ------------------------------------------------------------------
    # Each storage is alive from the op that makes it to the op after which it is freed
    # (never, in the forward pass, when saved): a difference array over the ops.
    forward = []
    for half, (_, _, kept, fixed_saver), (extras, lone_indices) in zip(
        (False, True), modes, extras_of
    ):
        release = info.fwd_release.copy()
        key_pos = info.fwd_key_pos
        for key in kept:
            k = key_pos.get(key)
            if k is not None:
                release[k] = n
        size = info.fwd_size_half if half else info.fwd_size_full
        delta = np.zeros(n + 2)
        np.add.at(delta, info.fwd_alloc, size)
        np.add.at(delta, release + 1, -size)
        # tensors an op makes besides its outputs (indices, masks, casts): alive for the op,
        # or until backward when saved; max-pooling makes its indices regardless
        for i, key, b in extras:
            delta[i] += b
            delta[(n if key in kept else i) + 1] -= b
        for i, b in lone_indices:
            delta[i] += b
            delta[i + 1] -= b
        fwd_act = np.cumsum(delta)[:n]
        if half:
            copy = np.asarray(info.half_copy, float)
            saver = np.asarray(fixed_saver, float)
            unsaved = saver == 0
            cached = unsaved & np.asarray(weight_trainable, bool) & np.asarray(own_trainable, bool)
            # saved copies live until backward; trainable ones autocast caches until the
            # forward pass ends; any other lives for its op only
            fwd_fixed = np.cumsum(saver + np.where(cached, copy, 0.0)) + np.where(
                unsaved & ~cached, copy, 0.0
            )
        else:
            fwd_fixed = np.zeros(n)
        forward.append((tuple(fwd_act.tolist()), tuple(fwd_fixed.tolist())))
    if not grad_on:
        return tuple(  # type: ignore[return-value]
            ActivationProfile(fa, ff, (), (), (), saved=0) for fa, ff in forward
        )

    # -- backward: one walk, two byte counts (index 0: fp32, 1: autocast) -----------
    live_saved = [sum(sz.get(k, 0) for k in kp) for sz, _, kp, _ in modes]
    saved = list(live_saved)
    saved_fixed = sum(modes[1][3])
    live_fixed = saved_fixed  # (fp32 saves no weight copies)
    free_after: list[dict[int, int]] = []  # node -> bytes freed after its backward
    seg_prefix: list[dict[int, tuple[list[int], list[int], list[int], list[int]]]] = []
    for half, (sizes, saves, kept, _) in zip((False, True), modes):
        first_saver = info.saved_memo.get(("first_saver", *memo_key, half))
        if first_saver is None:  # the first op (in forward order) that saves each tensor
            first_saver = {}
            for i in range(n):
                for key in saves[i].keys:
                    first_saver.setdefault(key, i)
            info.saved_memo[("first_saver", *memo_key, half)] = first_saver
        freed: dict[int, int] = {}
        for key in kept:
            at = first_saver.get(key, 0)
            freed[at] = freed.get(at, 0) + sizes.get(key, 0)
        free_after.append(freed)
        # recomputed segments: their saved tensors by first saver, as prefix sums
        seg_first: dict[int, dict[tuple[int, int], int]] = {}
        seg_fixed: dict[int, list[tuple[int, int]]] = {}
        for i in seg_nodes:
            seg = segments_of_node[i]
            for key in saves[i].keys:
                if key not in kept:
                    seg_first.setdefault(seg, {}).setdefault(key, i)
            if saves[i].weight:
                seg_fixed.setdefault(seg, []).append((i, saves[i].weight))
        prefix = {}
        for seg in set(seg_first) | set(seg_fixed):
            order = sorted((i, sizes[k]) for k, i in seg_first.get(seg, {}).items())
            fixed = sorted(seg_fixed.get(seg, []))
            prefix[seg] = (
                [i for i, _ in order],
                list(itertools.accumulate(s for _, s in order)),
                [i for i, _ in fixed],
                list(itertools.accumulate(s for _, s in fixed)),
            )
        seg_prefix.append(prefix)

    def recomputed_alive(m: int, seg: int, i: int) -> tuple[int, int]:
        entry = seg_prefix[m].get(seg)
        if entry is None:
            return 0, 0
        idx, cum, fidx, fcum = entry
        k = bisect.bisect_right(idx, i)
        f = bisect.bisect_right(fidx, i)
        return (cum[k - 1] if k else 0), (fcum[f - 1] if f else 0)

    walk_key = (*memo_key, tuple(train_numel))
    walk = info.saved_memo.get(walk_key)
    if walk is None:
        walk = info.saved_memo[walk_key] = _gradient_walk(
            info, requires_grad, modes[0][0], modes[1][0], weight_trainable, train_numel
        )
    series: list[tuple[list[int], list[int], list[int], list[int]]] = [
        ([], [], walk.grads[0], walk.fresh[0]),
        ([], [], walk.grads[1], walk.fresh[1]),
    ]  # per mode: act, fixed, grads, fresh (the last two from the walk)
    act_f, fixed_f = series[0][0], series[0][1]
    act_h, fixed_h = series[1][0], series[1][1]
    free_f, free_h = free_after
    fixed_saver_h = modes[1][3]
    live_f, live_h = live_saved

    # the appends bound once: the helper runs per timeline point, and the saved method
    # lookups pay for the call it adds over the inlined code it replaces
    add_act_f, add_fixed_f = act_f.append, fixed_f.append
    add_act_h, add_fixed_h = act_h.append, fixed_h.append

    def point(seg: int | None, at: int, act_f0: int, act_h0: int, fixed_h0: int) -> None:
        """One backward timeline point of both modes: the live saved tensors and gradients
        (``act_*0``, ``fixed_h0``) plus, inside a recomputed segment, what its
        recomputation up to node ``at`` holds."""
        if seg is None:
            add_act_f(act_f0)
            add_fixed_f(0)
            add_act_h(act_h0)
            add_fixed_h(fixed_h0)
        else:
            rf = recomputed_alive(0, seg, at)
            rh = recomputed_alive(1, seg, at)
            add_act_f(act_f0 + rf[0])
            add_fixed_f(rf[1])
            add_act_h(act_h0 + rh[0])
            add_fixed_h(fixed_h0 + rh[1])

    for i, gf, gh, half_grad, after_f, after_h in walk.points:
        seg = segments_of_node[i]
        point(seg, i, live_f + gf, live_h + gh, live_fixed + half_grad)
        live_f -= free_f.get(i, 0)
        live_h -= free_h.get(i, 0)
        live_fixed -= fixed_saver_h[i]
        if half_grad:  # the cast's backward: half and fp32 gradient of the weight
            point(seg, i - 1, live_f + after_f, live_h + after_h, live_fixed + half_grad)
    return tuple(  # type: ignore[return-value]
        ActivationProfile(
            forward_act=forward[m][0],
            forward_fixed=forward[m][1],
            backward_act=tuple(series[m][0]),
            backward_fixed=tuple(series[m][1]),
            backward_grads=tuple(series[m][2]),
            backward_fresh=tuple(series[m][3]),
            saved=int(saved[m]),
            saved_fixed=int(saved_fixed if m else 0),
        )
        for m in (0, 1)
    )


def _pareto(act: list[float], fixed: list[float]) -> tuple[tuple[float, float], ...]:
    """The timeline points that can be the peak for some batch size: max over points of
    ``act * scale + fixed`` for ``scale > 0`` only needs the points no other point beats
    in both coordinates (usually a handful: plain Python is faster than numpy on them)."""
    if not act:
        return ((0.0, 0.0),)
    a = np.asarray(act, float)
    b = np.asarray(fixed, float)
    order = np.lexsort((-b, -a))  # by act descending, then fixed descending
    a, b = a[order], b[order]
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(b)[:-1]))
    keep = b > best_before
    front = sorted(zip(a[keep].tolist(), b[keep].tolist()))  # act ascending, fixed descending
    # of those, only the upper convex hull's corners are the maximum for some scale
    hull: list[tuple[float, float]] = []
    for p in front:
        while len(hull) >= 2:
            (ox, oy), (qx, qy) = hull[-2], hull[-1]
            if (qx - ox) * (p[1] - oy) - (qy - oy) * (p[0] - ox) >= 0:
                hull.pop()  # q lies on or below the segment from o to p
            else:
                break
        hull.append(p)
    return tuple(hull)


@dataclass(frozen=True)
class StepPlan:
    """The batch-independent part of an estimate: which nodes train, and the timelines."""

    trainable_params: int
    profile: ActivationProfile
    total_params: int = 0  # of the graph trained (with lite branches where the method adds them)
    buffer_bytes: int = 0  # its buffers: norm running statistics and batch counters
    max_param_tensor: int = 0  # elements of the largest trainable parameter tensor
    trainable_tensors: int = 0

    def __post_init__(self) -> None:
        p = self.profile
        fa = list(p.forward_act)
        ba = list(p.backward_act)
        # numpy copies of the points that can hold the peak, for the per-config arithmetic
        object.__setattr__(self, "forward_pts", _pareto(fa, list(p.forward_fixed)))
        object.__setattr__(
            self,
            "backward_pts",
            _pareto(ba, [f + g for f, g in zip(p.backward_fixed, p.backward_grads)]),
        )
        fresh = p.backward_fresh or (0,) * len(ba)
        object.__setattr__(
            self,
            "backward_acc_pts",
            _pareto(ba, [f + g for f, g in zip(p.backward_fixed, fresh)]),
        )
        object.__setattr__(self, "saved_act", p.saved)


def _weight_trainable(own_trainable: list[bool], weights_plan: list[bool] | None) -> list[bool]:
    """Which trainable nodes train their weight, not only their bias: under ``bias`` methods
    the weights train only where ``last`` (``lite`` for ``lite+bias``) would train them
    (``weights_plan``: that method's plan; None for the other methods)."""
    if weights_plan is None:
        return list(own_trainable)
    return [a and b for a, b in zip(own_trainable, weights_plan)]


_WITHOUT_BIAS = {"bias": "last", "lite+bias": "lite"}


@dataclass(frozen=True)
class StepStructure:
    """What a config's freezing, method and checkpointing make of a graph, before any
    precision: per node whether it trains (any parameter / its weight), its trainable
    elements and its checkpoint segment, and the lite branches."""

    own_trainable: list[bool]
    weight_trainable: list[bool]
    train_numel: list[int]
    segment_of: list[int | None]


def step_structure(
    cg: ComputeGraph,
    config: MConfig,
    blocks: list[int | None] | None = None,
    info: GraphInfo | None = None,
    planner: CGPlanner | None = None,
) -> StepStructure:
    """The :class:`StepStructure` of ``config`` (a ``planner`` of ``cg``, the
    :class:`~aiop.mconfig.config.CGPlanner` kept across calls, memoises the node plans)."""
    blocks = node_blocks(cg) if blocks is None else blocks
    info = graph_info(cg) if info is None else info
    planner = CGPlanner(cg, blocks) if planner is None else planner

    def plan_of(method: str) -> tuple[list[bool], list[tuple[int, int]]]:
        return planner.plan(config.replace(method=method))

    own_trainable, segments = plan_of(config.method)
    without_bias = _WITHOUT_BIAS.get(config.method)
    weight_trainable = _weight_trainable(
        own_trainable, plan_of(without_bias)[0] if without_bias else None
    )
    seg_of_block = {b: k for k, (s, t) in enumerate(segments) for b in range(s, t)}
    segment_of = [seg_of_block.get(b) if b is not None else None for b in blocks]
    train_numel = [
        0
        if not own_trainable[i]
        else (node.params if weight_trainable[i] else info.bias_numel[i] or node.params)
        for i, node in enumerate(cg.nodes)
    ]
    return StepStructure(
        own_trainable=own_trainable,
        weight_trainable=weight_trainable,
        train_numel=train_numel,
        segment_of=segment_of,
    )


def plan_step(
    cg: ComputeGraph,
    config: MConfig,
    blocks: list[int | None] | None = None,
    last_uses: dict[tuple[int, int], int] | None = None,
    info: GraphInfo | None = None,
    structure: StepStructure | None = None,
) -> StepPlan:
    """Simulate the step for ``config``'s freezing, method, checkpointing and precision
    (the slow part; the batch size and the optimizer only scale it)."""
    full, halved = plan_both(cg, config, blocks, last_uses, info, structure)
    return halved if config.prec in _HALF_PRECISIONS else full


def plan_both(
    cg: ComputeGraph,
    config: MConfig,
    blocks: list[int | None] | None = None,
    last_uses: dict[tuple[int, int], int] | None = None,
    info: GraphInfo | None = None,
    structure: StepStructure | None = None,
) -> tuple[StepPlan, StepPlan]:
    """:func:`plan_step` for fp32 and for a half-precision autocast (one simulation)."""
    blocks = node_blocks(cg) if blocks is None else blocks
    info = graph_info(cg, last_uses) if info is None else info
    st = step_structure(cg, config, blocks, info) if structure is None else structure
    own_trainable, weight_trainable = st.own_trainable, st.weight_trainable
    profiles = simulate_both(
        cg,
        own_trainable,
        st.segment_of,
        info.last_uses,
        weight_trainable=weight_trainable,
        train_numel=st.train_numel,
        info=info,
    )
    tensors = [
        (info.weight_numel[i] if weight_trainable[i] else info.bias_numel[i] or node.params)
        for i, node in enumerate(cg.nodes)
        if own_trainable[i]
    ]
    n_tensors = sum(
        info.param_tensors[i] if weight_trainable[i] else 1
        for i in range(cg.num_nodes)
        if own_trainable[i]
    )
    return tuple(  # type: ignore[return-value]
        StepPlan(
            trainable_params=sum(st.train_numel),
            profile=profile,
            total_params=info.total_params,
            buffer_bytes=info.buffer_bytes,
            max_param_tensor=max(tensors, default=0),
            trainable_tensors=n_tensors,
        )
        for profile in profiles
    )


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@dataclass
class _LiteOp:
    """One node of a lite branch: op, output shape, parameter shapes (name suffix -> shape)."""

    op: str
    shape: tuple[int, ...]
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    buffers: int = 0
    attrs: dict[str, int] = field(default_factory=dict)


def _conv_branch(x: tuple[int, ...], y: tuple[int, ...], block_params: int) -> list[_LiteOp] | None:
    """:func:`aiop.models.tinytl.lite_branch_conv` on a block from ``x`` to ``y`` (NCHW):
    AvgPool 2 (ceil) → grouped 5×5 conv (the block's stride) → BN → ReLU → 1×1 conv → BN,
    resized to ``y`` when the sizes differ; the middle width ``min(Cin, Cout)``, halved
    while the branch has more than half the block's parameters."""
    n, cin, hi, wi = x
    _, cout, ho, wo = y
    stride = max(1, round(hi / ho)) if ho else 1
    mid = _make_divisible(min(cin, cout))

    def groups(m: int) -> int:
        return max(1, math.gcd(math.gcd(cin, m), 2))

    def size(m: int) -> int:
        return cin * m * 25 // groups(m) + m * cout

    while mid > 8 and size(mid) > max(block_params // 2, 1):
        mid = _make_divisible(mid // 2)
    g = groups(mid)
    hp, wp = math.ceil(hi / 2), math.ceil(wi / 2)
    hc, wc = (hp - 1) // stride + 1, (wp - 1) // stride + 1
    mid_shape, out_shape = (n, mid, hc, wc), (n, cout, hc, wc)
    ops = [
        _LiteOp("AveragePool", (n, cin, hp, wp)),
        _LiteOp("Conv", mid_shape, {"1.weight": (mid, cin // g, 5, 5)}, attrs={"group": g}),
        _LiteOp("BatchNormalization", mid_shape, {"2.weight": (mid,), "2.bias": (mid,)}, 2 * mid),
        _LiteOp("Relu", mid_shape),
        _LiteOp("Conv", out_shape, {"4.weight": (cout, mid, 1, 1)}),
        _LiteOp(
            "BatchNormalization", out_shape, {"5.weight": (cout,), "5.bias": (cout,)}, 2 * cout
        ),
    ]
    if (hc, wc) != (ho, wo):
        ops.append(_LiteOp("Resize", y))
    return ops


def _token_branch(x: tuple[int, ...]) -> list[_LiteOp]:
    """:func:`aiop.models.tinytl.lite_branch_tokens`: Linear(d, d/4) → GELU → Linear(d/4, d)
    → LayerNorm, on B×N×D tokens."""
    n, t, d = x
    mid = max(8, d // 4)
    return [
        _LiteOp("MatMul", (n, t, mid), {"0.weight": (d, mid)}),
        _LiteOp("Gelu", (n, t, mid)),
        _LiteOp("MatMul", (n, t, d), {"2.weight": (mid, d)}),
        _LiteOp("LayerNormalization", (n, t, d), {"3.weight": (d,), "3.bias": (d,)}),
    ]


_NESTED_BLOCKS = re.compile(r"^/?[^/]+[./]blocks[./]\d+")  # "text/blocks.0/...": a sub-model's


def with_lite_branches(cg: ComputeGraph, blocks: list[int | None]) -> ComputeGraph:
    """``cg`` with TinyTL's lite residual branches where
    :func:`aiop.models.tinytl.insert_lite_residual` wraps the blocks: each branch reads its
    block's input, runs right after the block and is added to the block's output (parameter
    names ``blocks.<b>.lite.<k>.*``, so the methods, freezing and checkpointing treat them as
    the model does).

    Which blocks take one, read from the graph: a convolutional block (NCHW in and out, two
    or more convolutions, no attention: residual, inverted-residual and dense blocks, not
    transitions) a convolutional branch; a transformer block (B×N×D in and out, with
    attention and LayerNorm) a token branch.
    """
    members: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        # only the model's own ``blocks`` (not, say, a text tower's ``text.blocks``)
        if b is not None and not _NESTED_BLOCKS.match(cg.nodes[i].scope):
            members.setdefault(b, []).append(i)
    preds: list[list[Edge]] = [[] for _ in cg.nodes]
    for e in cg.edges:
        preds[e.dst].append(e)
    branches: dict[int, tuple[int, tuple[int, int], list[_LiteOp]]] = {}  # last -> (b, x, ops)
    outputs = {o.name for o in cg.outputs}
    for b, nodes in members.items():
        inside = set(nodes)
        sources = {(e.src, e.src_port) for i in nodes for e in preds[i] if e.src not in inside}
        last = cg.nodes[nodes[-1]]
        if len(sources) != 1 or not last.output_shapes or any(o in outputs for o in last.outputs):
            continue
        src, port = next(iter(sources))
        if port >= len(cg.nodes[src].output_shapes):
            continue
        x, y = tuple(cg.nodes[src].output_shapes[port]), tuple(last.output_shapes[0])
        spec = block_lite_spec([cg.nodes[i] for i in nodes], x, y)
        if spec is None:
            continue
        if spec.kind == "conv":
            ops = _conv_branch(x, y, sum(cg.nodes[i].params for i in nodes))
        else:
            ops = _token_branch(x)
        if ops:
            branches[nodes[-1]] = (b, (src, port), ops)
    if not branches:
        return cg
    new_nodes: list[Node] = []
    new_index: list[int] = []
    added: dict[int, tuple[int, int]] = {}  # block's last node -> (first branch node, Add node)
    constants = dict(cg.constants)
    for i, node in enumerate(cg.nodes):
        new_index.append(len(new_nodes))
        new_nodes.append(node)
        if i not in branches:
            continue
        b, (src, port), ops = branches[i]
        scope = f"blocks.{b}/lite"
        x_name = cg.nodes[src].outputs[port] if port < len(cg.nodes[src].outputs) else ""
        if src in added and port == 0:
            x_name = new_nodes[added[src][1]].outputs[0]
        prev_name, prev_shape = x_name, cg.nodes[src].output_shapes[port]
        first = len(new_nodes)
        for k, lop in enumerate(ops):
            names = [f"blocks.{b}.lite.{suffix}" for suffix in lop.params]
            for name, shape in zip(names, lop.params.values()):
                constants[name] = ConstTensor(tuple(shape), "float32", None, [name])
            out = f"/blocks.{b}/lite/{lop.op}_{k}_output_0"
            new_nodes.append(
                Node(
                    name=f"/blocks.{b}/lite/{lop.op}_{k}",
                    op=lop.op,
                    source_op=lop.op,
                    input_shapes=[tuple(prev_shape), *lop.params.values()],
                    output_shapes=[lop.shape],
                    output_dtypes=["float32"],
                    attrs=dict(lop.attrs),
                    params=sum(_numel(s) for s in lop.params.values()),
                    flops=node_flops(
                        lop.op, lop.attrs, [tuple(prev_shape), *lop.params.values()], [lop.shape]
                    ),
                    buffers=lop.buffers,
                    param_names=names,
                    scope=f"{scope}/lite.{k}",
                    inputs=[prev_name, *names],
                    outputs=[out],
                )
            )
            prev_name, prev_shape = out, lop.shape
        y_name = node.outputs[0]
        new_nodes.append(
            Node(
                name=f"/blocks.{b}/lite/Add",
                op="Add",
                source_op="Add",
                input_shapes=[tuple(node.output_shapes[0]), tuple(prev_shape)],
                output_shapes=[tuple(node.output_shapes[0])],
                output_dtypes=[node.output_dtypes[0] if node.output_dtypes else "float32"],
                scope=scope,
                inputs=[y_name, prev_name],
                outputs=[f"/blocks.{b}/lite/Add_output_0"],
            )
        )
        added[i] = (first, len(new_nodes) - 1)
    edges: list[Edge] = []
    for e in cg.edges:
        src, dst = new_index[e.src], new_index[e.dst]
        if e.src in added and e.src_port == 0:
            src = added[e.src][1]  # the block's consumers read the sum
        edges.append(replace(e, src=src, dst=dst))
    for i, (first, add) in added.items():
        b, (src, port), ops = branches[i]
        shape_x = cg.nodes[src].output_shapes[port]
        # the branch reads the block's input: the sum, when the block before has a branch too
        x_src = added[src][1] if src in added and port == 0 else new_index[src]
        edges.append(Edge(x_src, first, tuple(shape_x), "float32", port, 0))
        for k in range(len(ops) - 1):
            edges.append(Edge(first + k, first + k + 1, ops[k].shape, "float32", 0, 0))
        y = cg.nodes[i]
        edges.append(Edge(new_index[i], add, tuple(y.output_shapes[0]), "float32", 0, 0))
        edges.append(Edge(add - 1, add, ops[-1].shape, "float32", 0, 1))
    edges.sort(key=lambda e: (e.dst, e.dst_port))
    return ComputeGraph(
        nodes=new_nodes,
        edges=edges,
        inputs=cg.inputs,
        outputs=cg.outputs,
        name=cg.name,
        source=cg.source,
        meta=dict(cg.meta),
        constants=constants,
    )


def structural_key(config: MConfig) -> tuple[float, int, str]:
    """The fields of a config that change which nodes train or recompute."""
    return (round(config.freeze, 6), config.ckpt, config.method)


_LITE_METHODS = frozenset({"lite", "lite+bias"})


@dataclass
class _GraphContext:
    """One graph the plans simulate (the CG itself, or it with lite branches) and its memos."""

    cg: ComputeGraph
    blocks: list[int | None]
    info: GraphInfo
    structures: dict[tuple[float, int, str], StepStructure] = field(default_factory=dict)
    planner: CGPlanner | None = None
    # plans by what they depend on (which nodes train, their weights, the segments):
    # structural keys that make the same structure share one simulation
    by_structure: dict[tuple, tuple[StepPlan, StepPlan]] = field(default_factory=dict)
    latency_graph: LatencyGraph | None = None
    latency_by_structure: dict[tuple, LatencyPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.planner is None:
            self.planner = CGPlanner(self.cg, self.blocks)


class PlanCache:
    """Memoises the per-graph work of many estimates of one graph: its blocks, its
    static sizes, and one :class:`StepPlan` per :func:`structural_key` and precision.
    The ``lite`` methods plan on the graph with TinyTL's branches (built once, lazily)."""

    def __init__(self, cg: ComputeGraph) -> None:
        self.cg = cg
        self.blocks = node_blocks(cg)
        known = [b for b in self.blocks if b is not None]
        self.n_blocks = max(known) + 1 if known else 0
        self.plans: dict[tuple[tuple[float, int, str], bool], StepPlan] = {}
        self.latency_plans: dict[tuple[float, int, str], LatencyPlan] = {}
        self._signatures: dict[tuple[float, int, str], tuple] = {}
        self.total_params = cg.total_params
        self.total_buffers = cg.total_buffers
        self.n_bn = sum(1 for node in cg.nodes if node.op == "BatchNormalization")
        self.input_bytes = sum(tensor_bytes(s.shape, s.dtype) for s in cg.inputs)
        self.graph_batch = _graph_batch(cg)
        self.total_flops = cg.total_flops
        self.last_uses = _last_uses(cg)
        self.info = graph_info(cg, self.last_uses)
        self._plain = _GraphContext(cg, self.blocks, self.info)
        self._lite: _GraphContext | None = None

    def _context(self, method: str) -> _GraphContext:
        if method not in _LITE_METHODS:
            return self._plain
        if self._lite is None:
            lite = with_lite_branches(self.cg, self.blocks)
            if lite is self.cg:
                self._lite = self._plain
            else:
                self._lite = _GraphContext(lite, node_blocks(lite), graph_info(lite))
        return self._lite

    def structure(self, config: MConfig) -> StepStructure:
        """The :class:`StepStructure` of ``config`` on the graph its method trains (memoised)."""
        skey = structural_key(config)
        ctx = self._context(config.method)
        st = ctx.structures.get(skey)
        if st is None:
            st = ctx.structures[skey] = step_structure(
                ctx.cg, config, ctx.blocks, ctx.info, planner=ctx.planner
            )
        return st

    def latency_plan(self, config: MConfig) -> LatencyPlan:
        """The :class:`~aiop.predictor.latency.LatencyPlan` of ``config``'s structural key
        (memoised; lite methods count on the graph with TinyTL's branches)."""
        skey = structural_key(config)
        plan = self.latency_plans.get(skey)
        if plan is None:
            ctx = self._context(config.method)
            if ctx.latency_graph is None:
                ctx.latency_graph = latency_graph(ctx.cg, ctx.info, self.graph_batch)
            st = self.structure(config)
            signature = self._signature(config, st)
            plan = ctx.latency_by_structure.get(signature)
            if plan is None:
                info = ctx.info
                plan = ctx.latency_by_structure[signature] = latency_plan(
                    ctx.latency_graph,
                    info.preds,
                    info.inner_of,
                    st.own_trainable,
                    st.weight_trainable,
                    st.train_numel,
                    st.segment_of,
                    info.param_tensors,
                    [node.params for node in ctx.cg.nodes],
                )
            self.latency_plans[skey] = plan
        return plan

    def _signature(self, config: MConfig, st: StepStructure) -> tuple:
        """What a step's simulation and counts depend on (memoised per structural key)."""
        skey = structural_key(config)
        sig = self._signatures.get(skey)
        if sig is None:
            sig = self._signatures[skey] = (
                tuple(st.own_trainable),
                tuple(st.weight_trainable),
                tuple(st.segment_of),
            )
        return sig

    def node_flags(self, config: MConfig) -> dict[str, list[bool]]:
        """``config.node_flags(cg)`` on the CG itself (not the lite-branch graph), sharing
        the memoised node plan with the analytic model."""
        assert self._plain.planner is not None
        return self._plain.planner.node_flags(config)

    def flags_signature(self, config: MConfig) -> tuple:
        """:meth:`~aiop.mconfig.config.CGPlanner.flags_signature` on the CG itself."""
        assert self._plain.planner is not None
        return self._plain.planner.flags_signature(config)

    def plan(self, config: MConfig) -> StepPlan:
        skey = structural_key(config)
        key = (skey, config.prec in _HALF_PRECISIONS)
        plan = self.plans.get(key)
        if plan is None:
            ctx = self._context(config.method)
            st = self.structure(config)
            signature = self._signature(config, st)
            pair = ctx.by_structure.get(signature)
            if pair is None:
                pair = ctx.by_structure[signature] = plan_both(
                    ctx.cg, config, ctx.blocks, ctx.info.last_uses, ctx.info, st
                )
            full, halved = pair
            self.plans[(skey, False)], self.plans[(skey, True)] = full, halved
            plan = halved if key[1] else full
        return plan


def estimate_memory(
    cg: ComputeGraph, config: MConfig | str, cache: PlanCache | None = None
) -> MemoryEstimate:
    """The analytic estimate of one training step's peak memory (see the module docstring).

    ``cache`` (a :class:`PlanCache` of ``cg``) memoises the per-graph work, so
    many configurations of one graph cost little.
    """
    config = MConfig.parse(config)
    cache = cache if cache is not None else PlanCache(cg)
    plan = cache.plan(config)
    scale = config.mb / cache.graph_batch
    trainable = plan.trainable_params
    params = 4 * plan.total_params
    buffers = plan.buffer_bytes  # running stats + num_batches_tracked
    grads = 4 * trainable
    adam = config.opt in ("adam", "adamw")
    optimizer = 4 * trainable * _OPTIMIZER_SLOTS.get(config.opt, 1)
    if adam and trainable:
        optimizer += 4 * plan.trainable_tensors  # the step counts
    inputs = int(cache.input_bytes * scale)
    targets = _TARGET_BYTES * config.mb
    accumulating = config.accum_steps > 1
    # every micro-batch after the first runs with last micro-batches' gradients alive
    held = grads if accumulating else 0
    forward = max(a * scale + b for a, b in plan.forward_pts) + targets + held
    if not plan.profile.backward_act:
        backward = 0.0
    elif accumulating:
        backward = max(a * scale + b for a, b in plan.backward_acc_pts) + held
    else:
        backward = max(a * scale + b for a, b in plan.backward_pts)
    # the step: every gradient, and Adam's sqrt and division of the largest tensor
    step = grads + (8 * plan.max_param_tensor if adam else 0) if trainable else 0
    dynamic = max(forward, backward, step)
    activations = int(plan.saved_act * scale + plan.profile.saved_fixed)
    static = params + buffers + optimizer
    peak = static + dynamic
    temporary = max(0, int(dynamic) - activations - held - inputs)
    return MemoryEstimate(
        peak_memory_bytes=int(peak),
        params=params,
        buffers=buffers,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        temporary=temporary,
        inputs=inputs,
        trainable_params=trainable,
    )
