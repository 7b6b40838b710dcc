"""Analytic peak-training-memory estimate from a CG and an m-configuration.

This is the physics the learned predictor corrects. The estimate follows what
PyTorch keeps during one training step:

* **params / buffers**: every parameter (fp32) and BatchNorm running statistics;
* **grads**: one fp32 gradient per trainable parameter — alive during the whole
  step with gradient accumulation, allocated during backward without it;
* **optimizer**: SGD with momentum keeps one buffer per trainable parameter,
  Adam/AdamW two (plus a scalar step per tensor);
* **activations**: the tensors autograd saves for backward. Per op, what
  ``torch/csrc/autograd`` saves (``derivatives.yaml``): convolutions and
  linear layers their input when their weight is trainable; normalisations
  their input; ReLU/Sigmoid/Tanh/Softmax their output; ReLU6 (hardtanh),
  HardSwish, GELU and friends their input; Mul/Div/MatMul between two
  activations the other operand; max-pooling its input and int64 indices;
  Dropout its boolean mask; Add/Concat/Split/views nothing. A tensor saved by
  several ops counts once; views count as their base. Only nodes on a path
  from a trainable parameter save anything (a frozen prefix saves nothing);
* **gradient checkpointing**: nodes in a checkpointed segment save nothing; each
  segment keeps its input, and the backward pass re-materialises one segment
  at a time (the largest counts);
* **precision**: under bf16/fp16 autocast activations after the first cast are
  half width and autocast caches a half copy of the weights it casts;
* **inputs**: one micro-batch of inputs and integer targets;
* **temporary**: the largest gradient-of-output plus gradient-of-input pair of
  the backward pass.

Activations scale with the micro-batch: a CG is built at batch 1 (its input's
first dimension), and per-sample bytes are multiplied by ``micro_batch``.
The ``lite`` TinyTL methods add modules the CG does not have; their cost is
left to the learned correction.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from aiop.cg.graph import ComputeGraph, tensor_bytes
from aiop.cg.vocab import VIEW_OPS
from aiop.mconfig import MConfig
from aiop.mconfig.config import cg_plan, node_blocks

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
        d = asdict(self)
        return {
            k: d[k] for k in ("params", "grads", "optimizer", "activations", "temporary", "inputs")
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


def saved_tensors(
    cg: ComputeGraph, own_trainable: list[bool], grad_sources: frozenset[int] = frozenset()
) -> tuple[list[bool], dict[tuple[int, int], int], list[set[tuple[int, int]]]]:
    """Which tensors autograd keeps, at the CG's batch size.

    Returns ``requires_grad`` per node, the bytes of every kept tensor keyed by
    its storage (producer node, output port), and for each node the keys it
    saves.
    """
    n = cg.num_nodes
    preds: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]  # (src, src_port, dst_port)
    for e in cg.edges:
        preds[e.dst].append((e.src, e.src_port, e.dst_port))
    requires_grad = [False] * n
    storage: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # per output port
    for i, node in enumerate(cg.nodes):
        requires_grad[i] = (
            own_trainable[i] or i in grad_sources or any(requires_grad[s] for s, _, _ in preds[i])
        )
        ports = max(1, len(node.output_shapes))
        if node.op in _ALIAS_OPS and preds[i]:
            s, sp, _ = preds[i][0]
            base = storage[s][sp] if sp < len(storage[s]) else (s, sp)
            storage[i] = [base] * ports
        else:
            storage[i] = [(i, p) for p in range(ports)]

    def out_bytes(i: int, port: int = 0) -> int:
        node = cg.nodes[i]
        if port >= len(node.output_shapes):
            return 0
        return tensor_bytes(node.output_shapes[port], node.output_dtypes[port])

    sizes: dict[tuple[int, int], int] = {}

    def key_of(src: int, port: int) -> tuple[int, int]:
        key = storage[src][port] if port < len(storage[src]) else (src, port)
        sizes.setdefault(key, out_bytes(*key))
        return key

    saves: list[set[tuple[int, int]]] = [set() for _ in range(n)]
    for i, node in enumerate(cg.nodes):
        if not requires_grad[i]:
            continue
        op = node.op
        dyn = preds[i]
        data_in = [d for d in dyn if d[2] == 0] or dyn[:1]
        kept: set[tuple[int, int]] = set()
        if op in _WEIGHT_INPUT_OPS or (op == "MatMul" and len(dyn) == 1):
            if own_trainable[i]:
                kept.update(key_of(s, sp) for s, sp, _ in data_in)
        elif op in ("MatMul", "Mul", "Div", "Max", "Min", "Where"):
            # the other operand of each input that needs a gradient (both, for two activations)
            if len(dyn) >= 2 or op == "Div":
                kept.update(key_of(s, sp) for s, sp, _ in dyn)
        elif op in _SAVES_OUTPUT:
            kept.add(key_of(i, 0))
        elif op in _SAVES_INPUT:
            kept.update(key_of(s, sp) for s, sp, _ in data_in)
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
        saves[i] = kept
    return requires_grad, sizes, saves


def _scope_levels(scope: str) -> list[str]:
    parts = [p for p in scope.split("/") if p]
    return ["/".join(parts[: k + 1]) for k in range(len(parts))]


def _last_uses(cg: ComputeGraph) -> dict[tuple[int, int], int]:
    """The node after which each tensor can be freed in the forward pass.

    A tensor lives until its last consumer ran, and longer when it enters a
    module from outside: the caller holds its argument until the module
    returns (``x = block(x)``), i.e. until the module's last node ran. Module
    nesting comes from the exporter's node scopes.
    """
    last_in_scope: dict[str, int] = {}
    levels = [_scope_levels(node.scope) for node in cg.nodes]
    for i, lv in enumerate(levels):
        for scope in lv:
            last_in_scope[scope] = i
    last: dict[tuple[int, int], int] = {}
    for e in cg.edges:
        end = e.dst
        src_scope = cg.nodes[e.src].scope
        for scope in levels[e.dst]:
            if not (src_scope == scope or src_scope.startswith(scope + "/")):
                end = max(end, last_in_scope[scope])
        key = (e.src, e.src_port)
        last[key] = max(last.get(key, -1), end)
    return last


@dataclass(frozen=True)
class ActivationProfile:
    """Per-sample activation bytes of one step's phases (multiply by the micro-batch).

    ``forward_peak``: the most bytes alive at once during the forward pass (tensors
    saved for backward plus those still waiting for a consumer). ``backward_act``
    and ``backward_grads`` give, for every step of the backward pass, the
    per-sample bytes alive (saved tensors still needed, gradients of activations)
    and the parameter-gradient bytes allocated so far (a batch-independent term).
    """

    forward_peak: int
    saved: int
    backward_act: tuple[int, ...]
    backward_grads: tuple[int, ...]


def simulate_step(
    cg: ComputeGraph,
    own_trainable: list[bool],
    segments_of_node: list[int | None],
    last_uses: dict[tuple[int, int], int] | None = None,
    grad_sources: frozenset[int] = frozenset(),
) -> ActivationProfile:
    """Walk the forward and the backward pass once, tracking which tensors are alive.

    ``grad_sources`` are nodes whose output needs a gradient although no
    parameter of theirs trains (a trainable side branch is added to them).
    """
    requires_grad, sizes, saves = saved_tensors(cg, own_trainable, grad_sources)
    n = cg.num_nodes
    consumers_last = _last_uses(cg) if last_uses is None else last_uses
    outputs_of_graph = {(i, 0) for i, node in enumerate(cg.nodes) if node.outputs and
                        any(node.outputs[0] == o.name for o in cg.outputs)}  # fmt: skip

    in_segment = [s is not None for s in segments_of_node]
    kept: set[tuple[int, int]] = set()
    for i in range(n):
        if not in_segment[i]:
            kept.update(saves[i])
    for e in cg.edges:
        seg_dst = segments_of_node[e.dst]
        if seg_dst is not None and segments_of_node[e.src] != seg_dst and requires_grad[e.dst]:
            kept.add((e.src, e.src_port))
            sizes.setdefault((e.src, e.src_port), e.bytes)

    def new_storage(i: int) -> list[tuple[int, int]]:
        node = cg.nodes[i]
        if node.op in _ALIAS_OPS or node.op == "Input":
            return []
        keys = [(i, p) for p in range(len(node.output_shapes))]
        for k in keys:
            sizes.setdefault(k, tensor_bytes(node.output_shapes[k[1]], node.output_dtypes[k[1]]))
        return keys

    # forward: a tensor lives until its last consumer ran, longer if saved
    alive: dict[tuple[int, int], int] = {}
    live_total = 0  # sum(alive.values()), kept incrementally
    forward_peak = 0
    release_at: dict[int, list[tuple[int, int]]] = {}
    for key, last in consumers_last.items():
        release_at.setdefault(last, []).append(key)
    for i in range(n):
        for key in new_storage(i):
            if key not in alive:
                alive[key] = sizes[key]
                live_total += sizes[key]
        for key in saves[i]:
            if key[1] == -1 and key not in alive:  # indices / masks made by this op
                alive[key] = sizes[key]
                live_total += sizes[key]
        forward_peak = max(forward_peak, live_total)
        for key in release_at.get(i, ()):
            if key not in kept and key not in outputs_of_graph and key in alive:
                live_total -= alive.pop(key)
        for key in saves[i]:
            if key[1] == -1 and key not in kept and key in alive:
                live_total -= alive.pop(key)
    saved = sum(sizes[k] for k in kept)

    # backward: in reverse order; a saved tensor is freed after the first (in
    # forward order) node that saved it has run its backward
    first_saver: dict[tuple[int, int], int] = {}
    for i in range(n):
        for key in saves[i]:
            first_saver.setdefault(key, i)
    free_after: dict[int, list[tuple[int, int]]] = {}
    for key in kept:
        free_after.setdefault(first_saver.get(key, 0), []).append(key)
    live_saved = saved
    # Recomputation re-materialises a segment's saved tensors when backward enters
    # it; they are then freed like any saved tensor (after their first saver).
    seg_first: dict[int, dict[tuple[int, int], int]] = {}
    for i in range(n):
        seg = segments_of_node[i]
        if seg is not None:
            for key in saves[i]:
                if key not in kept:
                    seg_first.setdefault(seg, {}).setdefault(key, i)
    seg_prefix: dict[int, tuple[list[int], list[int]]] = {}
    for seg, firsts in seg_first.items():
        order = sorted((i, sizes[k]) for k, i in firsts.items())
        idx = [i for i, _ in order]
        cum = list(itertools.accumulate(size for _, size in order))
        seg_prefix[seg] = (idx, cum)

    def recomputed_alive(seg: int | None, i: int) -> int:
        if seg is None or seg not in seg_prefix:
            return 0
        idx, cum = seg_prefix[seg]
        k = bisect.bisect_right(idx, i)
        return cum[k - 1] if k else 0

    param_grads = 0
    backward_act: list[int] = []
    backward_grads: list[int] = []
    for i in range(n - 1, -1, -1):
        if not requires_grad[i]:
            continue
        node = cg.nodes[i]
        if own_trainable[i]:
            param_grads += 4 * node.params
        grad_out = sum(sizes.get((i, p), 0) for p in range(max(1, len(node.output_shapes))))
        grad_in = sum(e.bytes for e in cg.edges if e.dst == i and requires_grad[e.src])
        seg = segments_of_node[i]
        recomputed = recomputed_alive(seg, i)
        backward_act.append(live_saved + recomputed + grad_out + grad_in)
        backward_grads.append(param_grads)
        for key in free_after.get(i, ()):
            live_saved -= sizes[key]
    return ActivationProfile(
        forward_peak=int(forward_peak),
        saved=int(saved),
        backward_act=tuple(int(v) for v in backward_act),
        backward_grads=tuple(int(v) for v in backward_grads),
    )


@dataclass(frozen=True)
class StepPlan:
    """The batch-independent part of an estimate: which nodes train, and the activations."""

    trainable_params: int
    autocast_params: int
    profile: ActivationProfile
    extra_params: int = 0  # parameters the CG lacks (TinyTL lite residual branches)

    def __post_init__(self) -> None:
        # numpy copies for the per-configuration arithmetic
        object.__setattr__(self, "backward_act", np.asarray(self.profile.backward_act, float))
        object.__setattr__(self, "backward_grads", np.asarray(self.profile.backward_grads, float))
        object.__setattr__(self, "max_backward_act", max(self.profile.backward_act, default=0))


def plan_step(
    cg: ComputeGraph,
    config: MConfig,
    blocks: list[int | None] | None = None,
    last_uses: dict[tuple[int, int], int] | None = None,
) -> StepPlan:
    """Simulate the step for ``config``'s freezing, method and checkpointing (the slow part)."""
    blocks = node_blocks(cg) if blocks is None else blocks
    own_trainable, segments = cg_plan(config, cg, blocks)
    lite = lite_branches(cg, blocks) if config.method in ("lite", "lite+bias") else []
    if lite:
        lite, first_block = _active_lite(cg, config, blocks, lite)
        segments = _lite_segments(config, blocks, first_block, own_trainable, segments)
    segment_of = [
        next((k for k, (s, t) in enumerate(segments) if b is not None and s <= b < t), None)
        for b in blocks
    ]
    weighted = [i for i, node in enumerate(cg.nodes) if node.params > 0]
    profile = simulate_step(
        cg, own_trainable, segment_of, last_uses, frozenset(b.end for b in lite)
    )
    extra_params = sum(b.params for b in lite)
    if lite:
        # the branches' own saved activations, alive from their forward to their backward
        # (inside a checkpointed segment they are recomputed, not kept)
        act = sum(b.saved_bytes for b in lite if segment_of[b.end] is None)
        profile = ActivationProfile(
            forward_peak=profile.forward_peak + act,
            saved=profile.saved + act,
            backward_act=tuple(v + act for v in profile.backward_act),
            backward_grads=profile.backward_grads,
        )
    return StepPlan(
        trainable_params=extra_params
        + sum(cg.nodes[i].params for i in weighted if own_trainable[i]),
        autocast_params=extra_params
        + sum(  # autocast caches half copies of trainable leaf weights only
            cg.nodes[i].params
            for i in weighted
            if own_trainable[i] and cg.nodes[i].op in ("Conv", "Gemm", "MatMul")
        ),
        profile=profile,
        extra_params=extra_params,
    )


_LITE_LAYERS = 4  # conv, BN, conv, BN: parameterised layers the freezing rate counts


def _active_lite(
    cg: ComputeGraph, config: MConfig, blocks: list[int | None], lite: list[LiteBranch]
) -> tuple[list[LiteBranch], int | None]:
    """The branches the freezing rate leaves trainable, and the first one's block.

    Freezing walks parameterised layers in execution order, a branch's four
    layers right after its block's own.
    """
    ends = {b.end: b for b in lite}
    units: list[LiteBranch | None] = []  # None: a layer of the CG itself
    for i, node in enumerate(cg.nodes):
        if node.params > 0:
            units.append(None)
        if i in ends:
            units.extend([ends[i]] * _LITE_LAYERS)
    frozen = config.n_frozen_units(len(units))
    active = []
    for k, unit in enumerate(units):
        if unit is not None and k >= frozen and unit not in active:
            active.append(unit)
    first = min((blocks[b.end] for b in active if blocks[b.end] is not None), default=None)
    return active, first


def _lite_segments(
    config: MConfig,
    blocks: list[int | None],
    first_block: int | None,
    own_trainable: list[bool],
    segments: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Checkpoint segments start at the first block that trains: with lite branches, the
    first active branch's block, when it comes before any trainable node of the CG."""
    from aiop.models.base import split_segments

    known = [b for b in blocks if b is not None]
    if not config.ckpt or first_block is None or not known:
        return segments
    start = segments[0][0] if segments else None
    if start is not None and start <= first_block:
        return segments
    n_blocks = max(known) + 1
    k = min(config.ckpt, n_blocks - first_block)
    return [
        (first_block + r.start, first_block + r.stop)
        for r in split_segments(n_blocks - first_block, k)
    ]


@dataclass(frozen=True)
class LiteBranch:
    """A TinyTL lite residual branch as ``aiop.models.tinytl`` would insert it on a block."""

    end: int  # the block's last node: the branch's output is added to it
    params: int
    saved_bytes: int  # per sample


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def lite_branches(cg: ComputeGraph, blocks: list[int | None]) -> list[LiteBranch]:
    """The lite branches of a graph's convolutional blocks (those with two or more convolutions:
    residual, inverted-residual and dense blocks, not transitions), sized like
    :func:`aiop.models.tinytl.lite_branch_conv` (kernel 5, groups 2, width ``min(Cin, Cout)``
    halved until at most half the block's parameters)."""
    members: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        if b is not None:
            members.setdefault(b, []).append(i)
    out = []
    for nodes in members.values():
        convs = [i for i in nodes if cg.nodes[i].op == "Conv"]
        first, last = cg.nodes[nodes[0]], cg.nodes[nodes[-1]]
        if len(convs) < 2 or not first.input_shapes or not last.output_shapes:
            continue
        x_in, y_out = first.input_shapes[0], last.output_shapes[0]
        if len(x_in) != 4 or len(y_out) != 4:
            continue
        cin, hi, wi = x_in[1], x_in[2], x_in[3]
        cout, ho, wo = y_out[1], y_out[2], y_out[3]
        block_params = sum(cg.nodes[i].params for i in nodes)
        mid = _make_divisible(min(cin, cout))

        def branch(m: int, cin: int = cin, cout: int = cout) -> tuple[int, int]:
            g = max(1, math.gcd(math.gcd(cin, m), 2))
            return cin * m * 25 // g + m * cout, g

        size, _ = branch(mid)
        while mid > 8 and size > max(block_params // 2, 1):
            mid = _make_divisible(mid // 2)
            size, _ = branch(mid)
        params = size + 2 * mid + 2 * cout  # + the two BatchNorms
        quarter = math.ceil(ho / 2) * math.ceil(wo / 2)
        saved = 4 * (
            cin * math.ceil(hi / 2) * math.ceil(wi / 2) + 2 * mid * quarter + cout * quarter
        )
        out.append(LiteBranch(end=nodes[-1], params=params, saved_bytes=saved))
    return out


def structural_key(config: MConfig) -> tuple[float, int, str]:
    """The fields of a config that change which nodes train or recompute."""
    return (round(config.freeze, 6), config.ckpt, config.method)


class PlanCache:
    """Memoises the per-graph work of many estimates of one graph: its blocks, its
    static sizes, and one :class:`StepPlan` per :func:`structural_key`."""

    def __init__(self, cg: ComputeGraph) -> None:
        self.cg = cg
        self.blocks = node_blocks(cg)
        known = [b for b in self.blocks if b is not None]
        self.n_blocks = max(known) + 1 if known else 0
        self.plans: dict[tuple[float, int, str], StepPlan] = {}
        self.total_params = cg.total_params
        self.total_buffers = cg.total_buffers
        self.n_bn = sum(1 for node in cg.nodes if node.op == "BatchNormalization")
        self.input_bytes = sum(tensor_bytes(s.shape, s.dtype) for s in cg.inputs)
        self.graph_batch = _graph_batch(cg)
        self.total_flops = cg.total_flops
        self.last_uses = _last_uses(cg)

    def plan(self, config: MConfig) -> StepPlan:
        key = structural_key(config)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = plan_step(self.cg, config, self.blocks, self.last_uses)
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
    profile = plan.profile
    half = config.prec in _HALF_PRECISIONS
    scale = config.mb / cache.graph_batch / (2 if half else 1)

    trainable = plan.trainable_params
    params = 4 * (cache.total_params + plan.extra_params)
    if half:  # autocast's cache of half-width weight copies for conv/linear
        params += 2 * plan.autocast_params
    buffers = 4 * cache.total_buffers + 8 * cache.n_bn  # running stats + num_batches_tracked
    grads = 4 * trainable
    optimizer = 4 * trainable * _OPTIMIZER_SLOTS.get(config.opt, 1)
    inputs = int(cache.input_bytes * config.mb / cache.graph_batch)
    inputs += _TARGET_BYTES * config.mb
    accumulating = config.accum_steps > 1
    # Accumulating: last micro-batches' gradients are alive from the first backward on.
    forward = profile.forward_peak * scale + (grads if accumulating else 0)
    if not profile.backward_act:
        backward = 0.0
    elif accumulating:
        backward = plan.max_backward_act * scale + grads
    else:
        backward = float((plan.backward_act * scale + plan.backward_grads).max())
    activations = int(profile.saved * scale)
    dynamic = max(forward, backward)
    static = params + buffers + optimizer + inputs
    peak = static + dynamic
    temporary = max(0, int(dynamic) - activations - (grads if accumulating else 0))
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
