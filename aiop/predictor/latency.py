"""Analytic step latency: what one optimizer step executes, priced on the device.

Two models share the node plan of :func:`latency_plan`. The default, kernel-level one
(:class:`KernelLatencyModel`, nn-Meter's idea for training steps) lists the kernels a step
runs — per node: forward runs (twice when checkpointing recomputes it), input-gradient
and weight-gradient backward kernels, bias-only gradients; none below the trainable part;
TinyTL's lite branches on the graph with them — prices each with the device's kernel
regressors (:mod:`aiop.predictor.kernels`, fitted on microbenchmarks, not on labels) at the
config's micro-batch size and precision, and sums them × micro-batches, with the
optimizer's measured cost, under the few constants of :data:`KERNEL_TERMS` fitted on step
labels. The older model below (:class:`LatencyModel`, 30 global terms) is kept as the
ablation:

The physics the learned latency correction starts from (like
:mod:`aiop.predictor.analytic` for memory). One step under an
:class:`~aiop.mconfig.MConfig` runs, per micro-batch, the forward pass, the
backward pass and the recomputation of checkpointed segments, and then the
optimizer once. From the CG and the config's node plan (which nodes train,
which only pass input gradients, which are recomputed) the model counts, per
step:

* **FLOPs** of dense convolutions and matrix products and, apart, of grouped and
  depthwise convolutions (memory-bound on CPUs: far fewer FLOPs per second):
  forward × batch; backward ≈ 1 × forward for the input gradient of an op whose
  input needs one, + 1 × forward for the weight gradient of an op whose weight
  trains; nothing below the lowest trainable layer (freezing); checkpointed
  segments' forward once more; TinyTL's lite branches on the graph with them;
  FLOPs under a bf16/fp16 autocast in their own columns (this CPU runs them at a
  different rate, measured, not assumed);
* **activation bytes** read and written by every op (inputs and outputs; backward
  reads and writes them again for each gradient it makes) — what bounds
  normalisations, activations, pooling and additions;
* **op calls** per category (dense convs and linear layers, grouped convs,
  norms, the rest) and phase: every op of the forward pass, the recomputed ops,
  the backward ops, autocast's casts (two per half-precision op), times the number
  of micro-batches — at 28–40 px these graphs are tiny, so per-op overhead is a
  large share, and it differs by category; bf16 grouped convs run one slow
  convolution per group on this CPU, so their groups are counted too;
* **optimizer**: element passes over the trainable parameters (SGD with momentum
  3, Adam/AdamW 8: ``foreach=False`` runs one tensor at a time) and its kernels
  (3 or 10 per trainable tensor);
* a fixed cost per step and per micro-batch (Python, autograd set-up, the loss).

``latency ≈ Σ_k θ_k · x_k`` with one non-negative constant ``θ_k`` per column
of :data:`LATENCY_TERMS` (seconds per FLOP, per byte, per launch, ...). The
constants are fitted by least squares on log latency from training labels only
(:func:`fit_latency_constants`) and stored in the predictor file's JSON, so a
new device needs only a refit. The labels are one-thread steps on this CPU
(``OMP_NUM_THREADS=1``): the constants describe that, not a multi-threaded run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aiop.cg.graph import ComputeGraph
from aiop.mconfig import MConfig
from aiop.predictor.kernels import KernelModel, KernelModelError, NodeKernels, node_kernels

log = logging.getLogger(__name__)

LATENCY_TERMS: tuple[str, ...] = (
    "flops_dense_fwd_fp32",  # conv (groups 1), Gemm, MatMul: forward and recomputation
    "flops_dense_bwd_fp32",  # their backward
    "flops_grouped_fwd_fp32",  # grouped / depthwise conv
    "flops_grouped_bwd_fp32",
    "flops_dense_fwd_half",  # the same under a bf16/fp16 autocast
    "flops_dense_bwd_half",
    "flops_grouped_fwd_half",
    "flops_grouped_bwd_half",
    "act_bytes_fp32",  # activation bytes read and written (fp32 sizes)
    "act_bytes_half",  # the same under autocast (norms, activations run in half too)
    # grouped convs' forward is bound by the activations they read and write, not FLOPs
    # (3×3 and 7×7 depthwise forward cost about the same here)
    "grouped_bytes_fwd_fp32",
    "grouped_bytes_fwd_half",
    # weight bytes every micro-batch reads (forward, input gradients) and writes (weight
    # gradients): with few pixels per sample, wide layers are bound by their weights
    "weight_bytes_fp32",
    "weight_bytes_half",  # (autocast also reads every weight to cast it)
    # calls per category: each op has its own fixed cost (measured on this CPU at tiny
    # sizes: ReLU 2 µs, BatchNorm 28 µs, 1×1 conv 16 µs, 3×3 depthwise 100 µs forward;
    # backward costs more), so the categories get their own constants
    "calls_other_fwd",  # elementwise, pooling, layout ops; autocast's casts
    "calls_other_bwd",  # their backward, and one AccumulateGrad per trainable tensor
    "calls_norm_fwd",
    "calls_norm_bwd",
    "calls_conv_fwd_fp32",  # dense convs and linear layers
    "calls_conv_fwd_half",
    "calls_conv_bwd_fp32",
    "calls_conv_bwd_half",
    "calls_grouped_fwd_fp32",  # grouped / depthwise convs
    "calls_grouped_bwd_fp32",
    "group_calls_fwd_half",  # bf16 grouped convs fall back to one slow conv per group
    "group_calls_bwd_half",
    "opt_elems",  # optimizer element passes over trainable parameters
    "opt_kernels",  # optimizer kernels (per trainable tensor)
    "micro_batches",  # per micro-batch fixed cost
    "steps",  # per step fixed cost
)
HALF_PRECISIONS = frozenset({"bf16", "fp16"})
_OPT_PASSES = {"sgd": 3, "adam": 8, "adamw": 8}
_OPT_KERNELS = {"sgd": 3, "adam": 10, "adamw": 10}
_LOW_PRECISION_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_WEIGHTED_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_NORM_OPS = frozenset(
    {"BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization"}
)
_CATEGORIES = ("conv", "grouped", "norm", "other")


class LatencyError(ValueError):
    """The latency model cannot be fitted or used (no labels, bad constants)."""


@dataclass(frozen=True)
class LatencyPlan:
    """The batch-independent counts of one structural key (freeze, ckpt, method).

    FLOPs and bytes are per sample; launches per micro-batch. ``*_fwd``: the forward
    pass; ``*_bwd``: the backward pass; ``*_rec``: recomputation of checkpointed
    segments. ``calls``: op calls per category (``conv``, ``grouped``, ``norm``,
    ``other``) and phase, and ``groups_fwd`` / ``groups_bwd`` the groups of grouped convs.
    ``half_ops``: ops autocast runs in half precision (forward and recompute).
    """

    flops_dense_fwd: float
    flops_grouped_fwd: float
    flops_dense_bwd: float
    flops_grouped_bwd: float
    flops_dense_rec: float
    flops_grouped_rec: float
    bytes_fwd: float
    bytes_bwd: float
    bytes_rec: float
    grouped_bytes_fwd: float  # per sample, grouped convs, forward and recomputation
    weight_bytes: float  # per micro-batch
    calls: dict[str, int]  # "<category>_fwd" / "_bwd" (recomputation counts as forward)
    half_ops: int
    trainable_params: int
    trainable_tensors: int
    # per node, what the kernel-level model sums: forward runs (2: recomputed), whether it
    # runs its input-gradient (or whole) backward, its weight gradient, a bias-only gradient
    fwd_runs: np.ndarray | None = field(default=None, repr=False, compare=False)
    bwd_input: np.ndarray | None = field(default=None, repr=False, compare=False)
    bwd_weight: np.ndarray | None = field(default=None, repr=False, compare=False)
    bwd_bias: np.ndarray | None = field(default=None, repr=False, compare=False)
    graph: LatencyGraph | None = field(default=None, repr=False, compare=False)
    # kernel sums by (kernel model, micro-batch, precision), memoised for the configs
    # sharing this plan
    memo: dict[tuple[int, int, str], tuple[Any, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )


@dataclass
class LatencyGraph:
    """Per-node facts of one graph the latency plans read (computed once per graph).

    ``is_op``: the node is a kernel PyTorch runs (not a constant subgraph, not an op
    folded into a fused one, not the input). ``dense`` / ``grouped``: per-sample
    forward FLOPs of compute ops by kind. ``act_bytes``: per-sample bytes the op reads
    (activation inputs) and writes (outputs) in fp32.
    """

    is_op: list[bool]
    dense: list[float]
    grouped: list[float]
    act_bytes: list[float]
    weight_bytes: list[float]  # 4 × parameters of the op (fp32 master weights)
    has_weight: list[bool]
    low_precision: list[bool]
    groups: list[int]  # convolutions: their group count (0: not a convolution)
    category: list[str]  # conv, grouped, norm or other
    # the kernel each op runs and its shape (the kernel-level model's input)
    kernels: NodeKernels | None = field(default=None, repr=False)


def latency_graph(cg: ComputeGraph, info: object, graph_batch: int) -> LatencyGraph:
    """:class:`LatencyGraph` of ``cg`` from its :class:`~aiop.predictor.analytic.GraphInfo`."""
    preds = info.preds  # type: ignore[attr-defined]
    is_const = info.is_const  # type: ignore[attr-defined]
    inner = info.inner_of  # type: ignore[attr-defined]
    eff_op = info.eff_op  # type: ignore[attr-defined]
    sizes = info.sizes_full  # type: ignore[attr-defined]
    g = float(max(graph_batch, 1))
    n = cg.num_nodes
    is_op = [False] * n
    dense = [0.0] * n
    grouped = [0.0] * n
    act = [0.0] * n
    has_weight = [False] * n
    low = [False] * n
    groups = [0] * n
    for i, node in enumerate(cg.nodes):
        if is_const[i] or node.op == "Input":
            continue
        # a fused op's parts: their FLOPs and bytes count once, at the fused node
        j = inner.get(i, i)
        if j == i:
            is_op[i] = True
        op = eff_op[j]
        flops = node.flops / g
        if node.op in ("Conv", "ConvTranspose") and int(node.attrs.get("group", 1)) > 1:
            grouped[j] += flops
        elif node.op in _WEIGHTED_COMPUTE:
            dense[j] += flops
        if j == i:
            read = sum(sizes.get((s, sp), 0) for s, sp, _ in preds[i])
            written = sum(sizes.get((i, p), 0) for p in range(len(node.output_shapes)))
            act[i] = (read + written) / g
            low[i] = op in _LOW_PRECISION_OPS
        if node.params > 0 and node.op in _WEIGHTED_COMPUTE:
            has_weight[j] = True
        if node.op in ("Conv", "ConvTranspose"):
            groups[j] = max(1, int(node.attrs.get("group", 1)))
    category = ["other"] * n
    for i in range(n):
        if groups[i] > 1:
            category[i] = "grouped"
        elif groups[i] or (has_weight[i] and eff_op[i] in _WEIGHTED_COMPUTE):
            category[i] = "conv"
        elif eff_op[i] in _NORM_OPS:
            category[i] = "norm"
    wbytes = [0.0] * n
    for i, node in enumerate(cg.nodes):
        if node.params > 0 and not is_const[i]:
            wbytes[inner.get(i, i)] += 4.0 * node.params
    kernels = node_kernels(cg, is_op, eff_op)
    return LatencyGraph(
        is_op, dense, grouped, act, wbytes, has_weight, low, groups, category, kernels
    )


def latency_plan(
    lg: LatencyGraph,
    preds: Sequence[Sequence[tuple[int, int, int]]],
    inner_of: dict[int, int],
    own_trainable: Sequence[bool],
    weight_trainable: Sequence[bool],
    train_numel: Sequence[int],
    segment_of: Sequence[int | None],
    param_tensors: Sequence[int],
    params: Sequence[int],
) -> LatencyPlan:
    """Count what one micro-batch runs under a node plan (see the module docstring).

    A node needs a gradient when it trains or any input does (fused parts train
    with their fused op); it runs backward then: the input gradient when an input
    needs one, the weight gradient when its weight trains (a bias-only layer reduces
    its output gradient: bytes, no FLOPs). A checkpointed node runs forward twice.
    """
    n = len(lg.is_op)
    own = list(own_trainable)
    weight = list(weight_trainable)
    for k, j in inner_of.items():  # a fused op trains what its parts train
        if params[k]:
            own[j] = own[j] or own[k]
            weight[j] = weight[k]
        own[k] = weight[k] = False
    rg = [False] * n
    fd = fg = bd = bg = rd = rgr = 0.0
    bf = bb = br = 0.0
    wb = gbf = 0.0
    calls = {f"{c}_{p}": 0 for c in _CATEGORIES for p in ("fwd", "bwd")}
    calls["groups_fwd"] = calls["groups_bwd"] = 0
    half_ops = 0
    tensors = 0
    # (plain lists in the loop: numpy's per-element writes cost more than the walk)
    fwd_runs = [0.0] * n
    bwd_in = [0.0] * n
    bwd_w = [0.0] * n
    bwd_bias = [0.0] * n
    nk = lg.kernels
    weight_kernel = nk.has_weight_grad.tolist() if nk is not None else [False] * n
    for i in range(n):
        input_grad = False
        for s, _, _ in preds[i]:
            if rg[s]:
                input_grad = True
                break
        needs = rg[i] = own[i] or input_grad
        if not lg.is_op[i]:
            continue
        d, gflops, a = lg.dense[i], lg.grouped[i], lg.act_bytes[i]
        cat = lg.category[i]
        grp = lg.groups[i] if cat == "grouped" else 0
        runs = 2 if needs and segment_of[i] is not None else 1  # checkpointed: recomputed
        fd += d
        fg += gflops
        bf += a
        w = lg.weight_bytes[i]
        wb += runs * w
        if cat == "grouped":
            gbf += runs * a
        if runs == 2:
            rd += d
            rgr += gflops
            br += a
        calls[f"{cat}_fwd"] += runs
        fwd_runs[i] = runs
        calls["groups_fwd"] += runs * grp
        half_ops += runs * lg.low_precision[i]
        if not needs:
            continue
        weight_grad = bool(own[i] and weight[i] and lg.has_weight[i])
        bias_only = bool(own[i] and not weight_grad)
        passes = int(input_grad) + int(weight_grad)
        if weight_kernel[i]:
            bwd_in[i], bwd_w[i], bwd_bias[i] = (
                float(input_grad),
                float(weight_grad),
                float(bias_only),
            )
        else:  # norms, activations, ...: one backward kernel makes every gradient
            bwd_in[i] = 1.0
        bd += d * passes
        bg += gflops * passes
        bb += a * (passes + int(bias_only))
        wb += w * (int(input_grad) + 2 * int(weight_grad))  # read; gradient made and added
        if passes or bias_only:
            calls[f"{cat}_bwd"] += 1
            calls["groups_bwd"] += grp
        if own[i]:
            # one AccumulateGrad per trainable tensor of the op
            k = param_tensors[i] if weight[i] else 1
            calls["other_bwd"] += k
            tensors += k
    return LatencyPlan(
        flops_dense_fwd=fd,
        flops_grouped_fwd=fg,
        flops_dense_bwd=bd,
        flops_grouped_bwd=bg,
        flops_dense_rec=rd,
        flops_grouped_rec=rgr,
        bytes_fwd=bf,
        bytes_bwd=bb,
        bytes_rec=br,
        grouped_bytes_fwd=gbf,
        weight_bytes=wb,
        calls=calls,
        half_ops=half_ops,
        trainable_params=int(sum(train_numel)),
        trainable_tensors=tensors,
        fwd_runs=np.asarray(fwd_runs),
        bwd_input=np.asarray(bwd_in),
        bwd_weight=np.asarray(bwd_w),
        bwd_bias=np.asarray(bwd_bias),
        graph=lg,
    )


def term_parts(plan: LatencyPlan, half: bool, opt: str) -> np.ndarray:
    """``[3, terms]``: the :data:`LATENCY_TERMS` of one step split into what grows with
    the batch size (per sample), with the number of micro-batches, and per step; a step's
    terms are ``bs × parts[0] + accum_steps × parts[1] + parts[2]``."""
    per_sample = [
        plan.flops_dense_fwd + plan.flops_dense_rec,
        plan.flops_dense_bwd,
        plan.flops_grouped_fwd + plan.flops_grouped_rec,
        plan.flops_grouped_bwd,
    ]
    zeros = [0.0] * 4
    act = plan.bytes_fwd + plan.bytes_bwd + plan.bytes_rec
    c = plan.calls

    def by_prec(v: float) -> list[float]:
        return [0.0, float(v)] if half else [float(v), 0.0]

    n = len(LATENCY_TERMS)
    parts = np.zeros((3, n))
    parts[0, :12] = [
        *(zeros if half else per_sample),
        *(per_sample if half else zeros),
        *by_prec(act),
        *by_prec(plan.grouped_bytes_fwd),
    ]
    casts = 2 * plan.half_ops if half else 0  # autocast casts each input and weight
    parts[1, 12:-4] = [
        *by_prec(plan.weight_bytes),
        c["other_fwd"] + casts,
        c["other_bwd"],
        c["norm_fwd"],
        c["norm_bwd"],
        *by_prec(c["conv_fwd"]),
        *by_prec(c["conv_bwd"]),
        0.0 if half else c["grouped_fwd"],
        0.0 if half else c["grouped_bwd"],
        c["groups_fwd"] if half else 0.0,
        c["groups_bwd"] if half else 0.0,
    ]
    if plan.trainable_params > 0:
        parts[2, -4] = plan.trainable_params * _OPT_PASSES[opt]
        parts[2, -3] = plan.trainable_tensors * _OPT_KERNELS[opt]
    parts[1, -2] = 1.0  # a micro-batch
    parts[2, -1] = 1.0  # a step
    return parts


def latency_terms(plan: LatencyPlan, config: MConfig) -> np.ndarray:
    """The :data:`LATENCY_TERMS` vector of one step of ``config`` (all micro-batches)."""
    parts = term_parts(plan, config.prec in HALF_PRECISIONS, config.opt)
    return config.batch_size * parts[0] + config.accum_steps * parts[1] + parts[2]


def _check_constants(what: str, constants: Sequence[float], terms: Sequence[str],
                     expected: Sequence[str]) -> None:  # fmt: skip
    """Refuse constants fitted for other terms, or not one finite non-negative number each."""
    if list(terms) != list(expected):
        raise LatencyError(
            f"{what} constants are for the terms {list(terms)}, this aiop computes "
            f"{list(expected)}: refit them"
        )
    if len(constants) != len(expected) or not all(math.isfinite(c) and c >= 0 for c in constants):
        raise LatencyError("latency constants must be one non-negative number per term")


def _fit_fields(model: LatencyModel | KernelLatencyModel) -> dict[str, object]:
    """The fitted constants and their provenance, as both models store them."""
    return {
        "constants": list(model.constants),
        "terms": list(model.terms),
        "device": model.device,
        "n_labels": model.n_labels,
        "fit_median_ape": model.fit_median_ape,
    }


def _parse_fit_fields(d: dict[str, object]) -> dict[str, Any]:
    """The keyword arguments :func:`_fit_fields` wrote (raises KeyError/TypeError/ValueError)."""
    return {
        "constants": [float(v) for v in d["constants"]],  # type: ignore[union-attr]
        "terms": [str(t) for t in d["terms"]],  # type: ignore[union-attr]
        "device": str(d.get("device", "")),
        "n_labels": int(d.get("n_labels", 0)),  # type: ignore[call-overload]
        "fit_median_ape": float(d.get("fit_median_ape", math.nan)),  # type: ignore[arg-type]
    }


@dataclass
class LatencyModel:
    """Fitted device constants (seconds per unit of each of :data:`LATENCY_TERMS`)."""

    constants: list[float]
    terms: list[str] = field(default_factory=lambda: list(LATENCY_TERMS))
    device: str = "cpu, 1 thread"
    n_labels: int = 0
    fit_median_ape: float = math.nan

    def __post_init__(self) -> None:
        _check_constants("latency", self.constants, self.terms, LATENCY_TERMS)

    def predict(self, terms: np.ndarray) -> np.ndarray:
        """Seconds per step for rows of :func:`latency_terms` vectors."""
        return np.atleast_2d(terms) @ np.asarray(self.constants, dtype=np.float64)

    def describe(self) -> dict[str, float]:
        """The constants in readable units (GFLOP/s, GB/s, µs per launch, ...)."""
        c = dict(zip(self.terms, self.constants))

        def rate(v: float, unit: float) -> float:
            return 1.0 / (v * unit) if v > 0 else math.inf

        out: dict[str, float] = {}
        for t, v in c.items():
            if t.startswith("flops_"):
                out[f"gflops_per_s_{t[6:]}"] = rate(v, 1e9)
            elif t.startswith(("act_bytes", "weight_bytes", "grouped_bytes")):
                out[f"{t.split('_')[0]}_gb_per_s_{t.split('_')[-1]}"] = rate(v, 1e9)
            elif "calls" in t or t == "opt_kernels":
                out[f"us_per_{t}"] = v * 1e6
            elif t == "opt_elems":
                out["optimizer_gelem_passes_per_s"] = rate(v, 1e9)
            else:
                out[f"ms_per_{t.removesuffix('es').removesuffix('s')}"] = v * 1e3
        return out

    def to_dict(self) -> dict[str, object]:
        return _fit_fields(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LatencyModel:
        try:
            return cls(**_parse_fit_fields(d))
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyError(f"malformed latency constants ({exc})") from None


def fit_latency_constants(
    terms: np.ndarray, latency_s: np.ndarray, device: str = "cpu, 1 thread"
) -> LatencyModel:
    """Non-negative constants that minimise the squared error of log latency.

    Started from a non-negative least-squares fit of relative errors (each row divided
    by its latency), then refined on log latency with the constants kept positive
    (``θ = exp(φ)``); columns are scaled to unit median first, and a column no label
    exercises gets the constant 0.
    """
    x = np.asarray(terms, dtype=np.float64)
    y = np.asarray(latency_s, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(LATENCY_TERMS) or x.shape[0] != y.size:
        raise LatencyError(
            f"need a [labels, {len(LATENCY_TERMS)}] term matrix and one latency per row"
        )
    theta, pred, y = _fit_positive(x, y)
    ape = np.abs(pred / y - 1.0) * 100.0
    model = LatencyModel(
        constants=theta.tolist(),
        device=device,
        n_labels=int(y.size),
        fit_median_ape=float(np.median(ape)),
    )
    log.info("latency fitted on %d labels: median APE %.1f %%", y.size, model.fit_median_ape)
    return model


def _fit_positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative ``θ`` minimising the squared error of ``log(x @ θ)`` against ``log y``
    (rows with a non-finite or non-positive label dropped); returns ``θ``, the fitted
    values and the labels kept."""
    from scipy.optimize import least_squares, nnls

    ok = np.isfinite(y) & (y > 0) & np.all(np.isfinite(x), axis=1)
    x, y = x[ok], y[ok]
    if y.size < 3:
        raise LatencyError(f"need at least 3 positive latency labels to fit, got {y.size}")
    used = np.any(x > 0, axis=0)
    scale = np.ones(x.shape[1])
    for k in np.flatnonzero(used):
        col = x[:, k][x[:, k] > 0]
        scale[k] = float(np.median(col))
    xs = x[:, used] / scale[used]
    theta0, _ = nnls(xs / y[:, None], np.ones(y.size))
    # a floor keeps every used constant in play for the log-space refinement
    floor = max(float(theta0.max()), 1e-12) * 1e-6
    phi0 = np.log(np.maximum(theta0, floor))
    log_y = np.log(y)

    def residual(phi: np.ndarray) -> np.ndarray:
        # (clipped: the optimiser's trial steps may overshoot far)
        return np.log(np.maximum(xs @ np.exp(np.clip(phi, -700.0, 700.0)), 1e-300)) - log_y

    res = least_squares(residual, phi0, method="trf", x_scale=1.0, max_nfev=2000)
    theta_s = np.exp(res.x)
    theta = np.zeros(x.shape[1])
    theta[used] = theta_s / scale[used]
    return theta, x @ theta, y


# -- the kernel-level model ---------------------------------------------------------------

#: what the kernel-level model sums per step, each scaled by one fitted constant: kernel
#: seconds forward and backward per precision (× micro-batches), the optimizer's measured
#: seconds, kernel calls (framework overhead the isolated timings miss or double), and a
#: fixed cost per micro-batch and per step (Python, the loss, autograd set-up)
KERNEL_TERMS: tuple[str, ...] = (
    "kernel_fwd_fp32",
    "kernel_bwd_fp32",
    "kernel_fwd_half",
    "kernel_bwd_half",
    "optimizer",
    "kernel_calls",
    "micro_batches",
    "steps",
)


def _kernel_sums(
    plan: LatencyPlan, config: MConfig, kernels: KernelModel
) -> tuple[float, float, float]:
    """Forward seconds, backward seconds and kernel calls of one micro-batch of ``plan`` at
    ``config``'s micro-batch size and precision (memoised on the plan)."""
    if plan.graph is None or plan.graph.kernels is None or plan.fwd_runs is None:
        raise LatencyError("this latency plan carries no kernel list (built by an old aiop?)")
    key = (kernels.token, int(config.mb), "bf16" if config.prec in HALF_PRECISIONS else "fp32")
    sums = plan.memo.get(key)
    if sums is None:
        masks = plan.memo.get((-1, 0, "masks"))
        if masks is None:  # [4, nodes]: forward runs and the three backward masks, once
            masks = plan.memo[(-1, 0, "masks")] = (
                np.stack([plan.fwd_runs, plan.bwd_input, plan.bwd_weight, plan.bwd_bias]),
            )
        m = masks[0]
        times = kernels.node_times_matrix(plan.graph.kernels, config.mb, config.prec)
        per = np.einsum("kn,kn->k", times, m)
        sums = plan.memo[key] = (float(per[0]), float(per[1:].sum()), float(m.sum()))
    return sums


def kernel_parts_split(
    plan: LatencyPlan, config: MConfig, kernels: KernelModel
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kernel_parts` as ``(per micro-batch, per step)`` rows: a step's row is
    ``accum_steps × first + second`` (so configs that differ only in their number of
    micro-batches share one evaluation)."""
    f, b, calls = _kernel_sums(plan, config, kernels)
    half = config.prec in HALF_PRECISIONS
    per_mb = np.zeros(len(KERNEL_TERMS))
    per_step = np.zeros(len(KERNEL_TERMS))
    per_mb[2 if half else 0] = f
    per_mb[3 if half else 1] = b
    per_mb[5] = calls
    per_mb[6] = 1.0
    per_step[4] = kernels.optimizer_s(config.opt, plan.trainable_tensors, plan.trainable_params)
    per_step[7] = 1.0
    return per_mb, per_step


def kernel_parts(plan: LatencyPlan, config: MConfig, kernels: KernelModel) -> np.ndarray:
    """The :data:`KERNEL_TERMS` row of one step of ``config``: Σ over the plan's nodes of
    predicted kernel seconds × runs, × micro-batches (sums memoised on the plan per
    micro-batch size and precision), and the optimizer's seconds."""
    per_mb, per_step = kernel_parts_split(plan, config, kernels)
    return config.accum_steps * per_mb + per_step


@dataclass
class KernelLatencyModel:
    """Step latency as the sum of the device's kernel times (:class:`KernelModel`, fitted on
    microbenchmarks) under a few constants fitted on step labels (:data:`KERNEL_TERMS`)."""

    kernels: KernelModel
    constants: list[float]
    terms: list[str] = field(default_factory=lambda: list(KERNEL_TERMS))
    device: str = "cpu, 1 thread"
    n_labels: int = 0
    fit_median_ape: float = math.nan

    def __post_init__(self) -> None:
        _check_constants("kernel latency", self.constants, self.terms, KERNEL_TERMS)

    def row(self, plan: LatencyPlan, config: MConfig) -> np.ndarray:
        return kernel_parts(plan, config, self.kernels)

    def coefficients(self, plan: LatencyPlan, config: MConfig) -> tuple[float, float]:
        """Seconds per micro-batch and per step of ``config``'s structure, micro-batch size,
        precision and optimizer: its step takes ``accum_steps × first + second``."""
        f, b, calls = _kernel_sums(plan, config, self.kernels)
        th = self.constants
        half = config.prec in HALF_PRECISIONS
        per_mb = th[2 if half else 0] * f + th[3 if half else 1] * b + th[5] * calls + th[6]
        opt = self.kernels.optimizer_s(config.opt, plan.trainable_tensors, plan.trainable_params)
        return per_mb, th[4] * opt + th[7]

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Seconds per step for rows of :func:`kernel_parts`."""
        return np.atleast_2d(rows) @ np.asarray(self.constants, dtype=np.float64)

    def describe(self) -> dict[str, float]:
        return {f"scale_{t}": float(v) for t, v in zip(self.terms, self.constants)}

    def to_dict(self) -> dict[str, object]:
        return {"kind": "kernels", "kernels": self.kernels.to_dict(), **_fit_fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> KernelLatencyModel:
        try:
            kernels = KernelModel.from_dict(d["kernels"])  # type: ignore[arg-type]
            return cls(kernels=kernels, **_parse_fit_fields(d))
        except KernelModelError as exc:
            raise LatencyError(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyError(f"malformed kernel latency model ({exc})") from None


def fit_kernel_latency(
    rows: np.ndarray, latency_s: np.ndarray, kernels: KernelModel
) -> KernelLatencyModel:
    """Fit the :data:`KERNEL_TERMS` constants (non-negative, log-latency least squares) on
    :func:`kernel_parts` rows of training labels."""
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(latency_s, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(KERNEL_TERMS) or x.shape[0] != y.size:
        raise LatencyError(f"need a [labels, {len(KERNEL_TERMS)}] matrix and one latency per row")
    theta, pred, y = _fit_positive(x, y)
    ape = np.abs(pred / y - 1.0) * 100.0
    model = KernelLatencyModel(
        kernels=kernels,
        constants=theta.tolist(),
        device=kernels.device,
        n_labels=int(y.size),
        fit_median_ape=float(np.median(ape)),
    )
    log.info("kernel latency fitted on %d labels: median APE %.1f %%", y.size, model.fit_median_ape)
    return model


def latency_model_from_dict(d: dict[str, object]) -> LatencyModel | KernelLatencyModel:
    """Either latency model from its :meth:`to_dict` form (``kind``: ``kernels`` or none)."""
    if d.get("kind") == "kernels":
        return KernelLatencyModel.from_dict(d)
    return LatencyModel.from_dict(d)
