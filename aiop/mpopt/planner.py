"""Plan m-hyperparameters under a memory budget by asking a predictor, not the device.

:func:`plan` enumerates an :class:`~aiop.mconfig.MSpace` (by default
MPOptimizer's grid for the graph: every micro-batch/accumulation pair of the
batch, freezing rates 0–90 %, checkpoint segments up to √blocks, every TinyTL
train method, fp32/bf16), asks the predictor for all candidates at once (it
encodes the graph once per distinct freeze/ckpt/method), keeps those whose
predicted peak plus a safety margin fits the budget, and ranks them with
MPOptimizer's rule engine:

1. **memory rule** — only configurations whose ``peak × (1 + margin)`` is within
   the budget are feasible. The margin comes from the predictor's measured
   error quantiles: if it under-predicts by at most a fraction ``u`` on 99 % of
   its held-out samples, ``real ≤ predicted / (1 − u)``, so the margin is
   ``u / (1 − u)``;
2. **accuracy rule** — among feasible configurations, the most accurate wins:
   the predictor's accuracy where it was trained for a task head, otherwise an
   accuracy prior that encodes MPOptimizer's order of memory techniques
   (micro-batching and checkpointing cost no accuracy, TinyTL methods a little,
   freezing in proportion to the share of the parameters it freezes; tiny
   BatchNorm micro-batches and half precision a touch);
3. **speed tie-break** — between equally accurate configurations the fastest
   wins: predicted latency where the predictor has it (it was measured on the
   device, so nothing more is applied), else the estimated FLOPs of a training
   step (recomputation and per-micro-batch overheads included) times the
   device's step-time factor for the configuration's precision
   (:mod:`aiop.mpopt.device`: bf16 is 3× slower than fp32 on this CPU, 2× faster
   on a GPU), then the smaller peak.

The device (``device=``: ``cpu``, the default, ``cuda``, ``edge`` or a JSON
file) also gives the default budget (its memory), the half precision planned
(the faster of bf16/fp16 on it) and whether half precision costs the accuracy
prior its small touch: where half precision is faster than fp32 it is the
device's natural way to train and costs nothing, so equally accurate bf16
beats fp32 on speed; where it is slower, fp32 is preferred unless half
precision is what lets a more accurate configuration fit.

The retraining loop (:mod:`aiop.mpopt.loop`) then measures the real accuracy
gain per second (``Aco``) of the top candidates and keeps the best.

Predictions are cached per predictor and graph, so re-planning the same graph
under a new budget (the loop does this whenever the available memory changes)
costs milliseconds. Budgets are in MB of 2**20 bytes (MiB), as ``human_bytes``
prints them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiop.cg.graph import ComputeGraph
from aiop.mconfig import MConfig, MSpace
from aiop.mconfig.config import CGPlanner, node_blocks
from aiop.mpopt.device import Device, DeviceError, get_device

log = logging.getLogger(__name__)

MB = 2**20
# Margin used when the predictor carries no error quantiles (e.g. a remote one that
# does not expose them): the default predictor's 99 % under-prediction is about 15 %.
DEFAULT_MARGIN = 0.2
# Candidates per predict() call: bounds memory of one call, keeps groups together.
PREDICT_CHUNK = 8192

# Accuracy prior per TinyTL train method (relative; TinyTL's Table 2 ordering:
# Full > L+B > L > Norm+Last ≈ B > Last on transfer tasks).
METHOD_PRIOR: dict[str, float] = {
    "full": 1.0,
    "lite+bias": 0.97,
    "lite": 0.96,
    "norm+last": 0.95,
    "bias": 0.945,
    "last": 0.85,
}
# Memory techniques in MPOptimizer's order: those that lose no accuracy first.
TECHNIQUES: tuple[str, ...] = ("micro-batching", "checkpointing", "precision", "method", "freezing")


class PlanError(ValueError):
    """Planning is impossible (no configuration fits, bad budget, missing target)."""


@runtime_checkable
class PredictorLike(Protocol):
    """Anything that predicts configurations of a graph: a local ``Predictor`` or a client."""

    def predict(
        self, cg: ComputeGraph, configs: Sequence[MConfig | str]
    ) -> list[dict[str, Any]]: ...


@dataclass
class Candidate:
    """One configuration with what the predictor said about it and how the rules scored it."""

    config: MConfig
    peak_bytes: int
    latency_s: float | None
    step_gflops: float
    accuracy: float
    accuracy_source: str  # "predicted" or "prior"
    fits: bool = False
    prediction: dict[str, Any] = field(default_factory=dict, repr=False)
    # the device's step time in this precision relative to fp32; used only without latency
    time_factor: float = 1.0
    # whether latency_s was measured on the planning device (else it only informs)
    latency_is_devices: bool = True

    @property
    def speed(self) -> float:
        """What the speed tie-break compares (lower is faster): predicted latency when it
        is the planning device's (not scaled again), else estimated GFLOPs scaled by the
        device's factor for the precision."""
        if self.latency_s is not None and self.latency_is_devices:
            return self.latency_s
        return self.step_gflops * self.time_factor

    @property
    def speed_source(self) -> str:
        if self.latency_s is not None and self.latency_is_devices:
            return "predicted latency"
        return "GFLOPs × precision factor"

    @property
    def spec(self) -> str:
        return self.config.format()

    @property
    def techniques(self) -> list[str]:
        """The memory techniques this configuration uses (computed when asked: most are not)."""
        return techniques_of(self.config)

    @property
    def rule(self) -> str:
        """Which rule made this configuration: none needed, or the memory techniques it uses."""
        used = self.techniques
        if not used:
            return "accuracy optimum (no memory technique needed)"
        return "memory rule: " + " + ".join(used)

    def sort_key(self) -> tuple[float, float, int]:
        return (-round(self.accuracy, 6), self.speed, self.peak_bytes)

    def to_dict(self, margin: float) -> dict[str, Any]:
        return {
            "config": self.spec,
            "predicted_peak_bytes": self.peak_bytes,
            "predicted_peak_with_margin_bytes": round(self.peak_bytes * (1 + margin)),
            "predicted_latency_s": self.latency_s,
            "estimated_step_gflops": round(self.step_gflops, 4),
            "precision_time_factor": self.time_factor,
            "speed": round(self.speed, 6),
            "speed_source": self.speed_source,
            "predicted_accuracy": self.accuracy,
            "accuracy_source": self.accuracy_source,
            "rule": self.rule,
            "score": round(self.accuracy, 6),
            "trainable_params": self.prediction.get("trainable_params"),
        }


@dataclass
class PlanResult:
    """What :func:`plan` decided, and why."""

    budget_mb: float
    margin: float
    margin_source: str
    n_candidates: int
    ranked: list[Candidate]
    smallest: Candidate | None
    planning_seconds: float
    time_budget_s: float | None = None
    n_feasible: int = 0
    n_evaluated: int = 0
    feasible: list[Candidate] = field(default_factory=list, repr=False)
    cached: bool = False
    device: Device | None = None
    budget_source: str = "given"

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * MB)

    @property
    def chosen(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def smallest_predicted_peak_bytes(self) -> int | None:
        return self.smallest.peak_bytes if self.smallest else None

    def explanation(self) -> str:
        usable = self.budget_bytes / (1 + self.margin)
        asked = (
            f" (bounded search: {self.n_evaluated} predicted)"
            if self.n_evaluated and self.n_evaluated < self.n_candidates
            else ""
        )
        head = (
            f"{self.n_feasible} of {self.n_candidates} candidates{asked} fit {self.budget_mb:g} MB "
            f"with a {self.margin:.1%} safety margin ({self.margin_source}), i.e. a predicted "
            f"peak of at most {usable / MB:.1f} MB"
        )
        c = self.chosen
        if c is None:
            low = self.smallest
            tail = f"; the smallest predicted peak is {low.peak_bytes / MB:.1f} MB" if low else ""
            return head + tail
        acc = (
            f"predicted accuracy {c.accuracy:.4f}"
            if c.accuracy_source == "predicted"
            else f"accuracy prior {c.accuracy:.3f} (no accuracy head: MPOptimizer's rule order)"
        )
        speed = (
            f"predicted latency {c.latency_s * 1000:.1f} ms"
            if c.latency_s is not None
            else f"about {c.step_gflops:.2f} GFLOPs per step"
        )
        prec = self.precision_explanation()
        return (
            f"{head}. Chose {c.spec}: predicted peak {c.peak_bytes / MB:.1f} MB "
            f"({c.peak_bytes * (1 + self.margin) / MB:.1f} MB with margin); {c.rule}; "
            f"{acc}; {speed}." + (f" {prec}" if prec else "")
        )

    def precision_explanation(self) -> str:
        """Why the chosen precision: the device's speed in it, and the best rival precision."""
        c, dev = self.chosen, self.device
        if c is None or dev is None:
            return ""
        rivals = [x for x in self.feasible if x.config.prec != c.config.prec]
        best = rivals[0] if rivals else None  # feasible is ranked
        if c.config.prec != "fp32":
            why = dev.precision_note(c.config.prec)
            if best is None:
                return f"{c.config.prec} chosen: no fp32 configuration fits; {why}."
            if round(best.accuracy, 6) < round(c.accuracy, 6):
                return (
                    f"{c.config.prec} chosen although {why}: it lets a more accurate "
                    f"configuration fit (best {best.config.prec}: {best.spec}, accuracy "
                    f"{best.accuracy:.3f} vs {c.accuracy:.3f})."
                )
            return (
                f"{c.config.prec} chosen: {why}, and it costs no accuracy there "
                f"(best {best.config.prec}: {best.spec}, equally accurate but slower)."
            )
        halves = [p for p in dev.precisions if p != "fp32"]
        if best is None:
            if not halves:
                return f"fp32: {dev.name} trains in no half precision."
            return "fp32: no half-precision configuration was planned or fits."
        half = best.config.prec
        why = dev.precision_note(half)
        if round(best.accuracy, 6) == round(c.accuracy, 6):
            return (
                f"{half} not chosen: {why}, so the equally accurate {best.spec} is slower "
                f"(speed {best.speed:.3g} vs {c.speed:.3g}, {c.speed_source})."
            )
        touch = "" if dev.is_fast(half) else f", {half}'s touch of rounding included"
        return (
            f"{half} not chosen: {why}; its best candidate {best.spec} ranks lower on "
            f"accuracy ({best.accuracy:.3f} vs {c.accuracy:.3f}{touch})."
        )

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "budget_mb": self.budget_mb,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "device": self.device.to_dict() if self.device else None,
            "precision_explanation": self.precision_explanation(),
            "time_budget_s": self.time_budget_s,
            "margin": self.margin,
            "margin_source": self.margin_source,
            "n_candidates": self.n_candidates,
            "n_evaluated": self.n_evaluated,
            "n_feasible": self.n_feasible,
            "chosen": chosen.to_dict(self.margin) if chosen else None,
            "ranked": [c.to_dict(self.margin) for c in self.ranked],
            "explanation": self.explanation(),
            "smallest_predicted_peak_bytes": self.smallest_predicted_peak_bytes,
            "smallest_config": self.smallest.spec if self.smallest else None,
            "planning_seconds": self.planning_seconds,
            "predictions_cached": self.cached,
        }


# -- the space ---------------------------------------------------------------------


def graph_blocks(cg: ComputeGraph) -> int:
    """Number of ``model.blocks`` a CG shows (0 when its nodes carry no block scopes)."""
    known = [b for b in node_blocks(cg) if b is not None]
    return max(known) + 1 if known else 0


def planned_precisions(device: Device | str | None = None) -> tuple[str, ...]:
    """fp32 and the device's half precision: bf16 unless fp16 is more than 10 % faster
    (bf16 needs no loss scaling and keeps fp32's range; a closer gap is measurement
    noise). bf16 and fp16 have the same memory, so planning both would only double
    the candidates; a device that trains in no half precision plans fp32 alone."""
    dev = get_device(device)
    halves = [p for p in ("bf16", "fp16") if p in dev.precision_time]
    if not halves:
        return ("fp32",)
    if len(halves) == 2 and dev.time_factor("fp16") >= 0.9 * dev.time_factor("bf16"):
        return ("fp32", "bf16")
    return ("fp32", min(halves, key=dev.time_factor))


def default_space(
    cg: ComputeGraph, batch_size: int = 64, device: Device | str | None = None
) -> MSpace:
    """MPOptimizer's grid for ``cg``: micro-batch/accumulation pairs of ``batch_size``,
    freezing 0–90 % (100 % trains nothing), 0..⌊√blocks⌋ checkpoint segments, every
    train method, fp32 and the device's half precision (:func:`planned_precisions`:
    bf16 on ``cpu`` and ``cuda``, fp16 on ``edge``), SGD."""
    return MSpace.for_model(
        graph_blocks(cg),
        batch_size=batch_size,
        freezes=tuple(round(0.1 * i, 1) for i in range(10)),
        precisions=planned_precisions(device),
    )


def min_micro_batch(cg: ComputeGraph) -> int:
    """The smallest micro-batch that can train ``cg``: 2 when a BatchNorm's input has
    one value per channel and sample (e.g. after global pooling), since PyTorch raises
    on one value per channel in training mode (frozen layers still normalise by batch
    statistics), else 1."""
    for node in cg.nodes:
        bn = node.op == "BatchNormalization" and node.input_shapes
        if bn and math.prod(node.input_shapes[0][2:]) <= 1:
            return 2
    return 1


# -- margins and priors -------------------------------------------------------------


def margin_from(predictor: Any) -> tuple[float, str]:
    """The safety margin and where it came from (the predictor's error quantiles if any)."""
    quantiles = getattr(predictor, "error_quantiles", None)
    mem = quantiles.get("memory") if isinstance(quantiles, dict) else None
    if isinstance(mem, dict) and isinstance(mem.get("q99_under"), int | float):
        u = min(max(float(mem["q99_under"]), 0.0), 0.9)
        return u / (1 - u), (
            f"the predictor under-predicts by at most {u:.1%} on 99% of "
            f"{mem.get('n', '?')} held-out samples"
        )
    return DEFAULT_MARGIN, "default: the predictor carries no error quantiles"


def frozen_shares(cg: ComputeGraph, freezes: Sequence[float]) -> dict[float, float]:
    """For each freezing rate, the share of ``cg``'s parameters it freezes.

    The freezing rate counts parameterised layers from the input; the first layers
    of a CNN are narrow, so freezing half of MobileNetV2's layers freezes 8 % of its
    parameters and half of ResNet-18's 9 %.
    """
    total = sum(n.params or 0 for n in cg.nodes)
    out: dict[float, float] = {}
    planner: CGPlanner | None = None  # one per graph: its layers and blocks are read once
    for f in sorted(set(freezes)):
        if f <= 0 or total <= 0:
            out[f] = 0.0 if f <= 0 else float(f)
            continue
        if planner is None:
            planner = CGPlanner(cg)
        trainable = planner.node_flags(MConfig(batch_size=1, freeze=f))["trainable"]
        frozen = sum(n.params or 0 for n, t in zip(cg.nodes, trainable) if not t)
        out[f] = frozen / total
    return out


def accuracy_prior(
    config: MConfig,
    has_batchnorm: bool = True,
    device: Device | None = None,
    frozen_share: float | None = None,
) -> float:
    """MPOptimizer's order of memory techniques as a number (higher: more accurate).

    Not a measured accuracy: it only orders configurations. Micro-batching and
    checkpointing keep the maths of a step (except BatchNorm statistics over tiny
    micro-batches); train methods and freezing shrink what adapts. Freezing costs
    in proportion to ``frozen_share``, the share of the parameters it freezes
    (:func:`frozen_shares`; the freezing rate itself when not given): the early
    layers it freezes first hold few parameters and general features that
    transfer (Yosinski et al., 2014), so full fine-tuning of the later half beats
    bias-only training of every layer. Measured on MobileNetV2 adapting to
    corrupted digits (``benchmarks/results/mpopt.md``): full with 50 % of the
    layers frozen 0.832, full 0.830, TinyTL-L+B 0.817. Half precision
    costs a touch (rounding in autocast), except on a ``device`` where it is
    faster than fp32: mixed precision is how such a device trains (fp32 master
    weights; Micikevicius et al., 2018), and there the speed tie-break, not the
    prior, decides between it and fp32.
    """
    score = METHOD_PRIOR[config.method]
    score -= 0.1 * (config.freeze if frozen_share is None else frozen_share)
    if config.prec != "fp32" and not (device is not None and device.is_fast(config.prec)):
        score -= 0.002
    if has_batchnorm and config.mb < 8:
        score -= 0.01 * (3 - int(math.log2(config.mb)))  # mb 1: -0.03, 2: -0.02, 4: -0.01
    return score


def techniques_of(config: MConfig) -> list[str]:
    """The memory techniques a configuration uses, in MPOptimizer's order."""
    used = []
    if config.mb < config.batch_size:
        used.append(f"micro-batching (mb={config.mb}, {config.accum_steps} accumulation steps)")
    if config.ckpt:
        used.append(f"checkpointing ({config.ckpt} segments)")
    if config.prec != "fp32":
        used.append(f"{config.prec} autocast")
    if config.method != "full":
        used.append(f"train method {config.method}")
    if config.freeze > 0:
        used.append(f"freezing {config.freeze:.0%}")
    return used


@dataclass(frozen=True)
class GraphTotals:
    """Per-sample forward FLOPs and parameter count of a CG (summed once per plan)."""

    flops_per_sample: float
    params: int

    @classmethod
    def of(cls, cg: ComputeGraph) -> GraphTotals:
        return cls(float(cg.total_flops) / max(_graph_batch(cg), 1), max(cg.total_params, 1))


def step_gflops(
    cg: ComputeGraph | GraphTotals, config: MConfig, trainable_params: int | None
) -> float:
    """Rough GFLOPs of one training step: forward, backward where gradients flow,
    recomputation under checkpointing, and a per-micro-batch overhead."""
    totals = cg if isinstance(cg, GraphTotals) else GraphTotals.of(cg)
    fwd = totals.flops_per_sample * config.batch_size
    flowing = 0.05 if config.method == "last" else max(1.0 - config.freeze, 0.05)
    weight_share = min(1.0, (trainable_params or totals.params) / totals.params)
    backward = fwd * (flowing + weight_share)
    recompute = fwd * flowing if config.ckpt else 0.0
    per_micro_batch = totals.flops_per_sample * 2.0
    return (fwd + backward + recompute + per_micro_batch * config.accum_steps) / 1e9


def _graph_batch(cg: ComputeGraph) -> int:
    shapes = [s.shape for s in cg.inputs if s.shape]
    return int(shapes[0][0]) if shapes and isinstance(shapes[0][0], int) else 1


# -- predictions, cached per predictor and graph ------------------------------------

_CACHE_LOCK = threading.Lock()
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, dict[str, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)
_MAX_GRAPHS_PER_PREDICTOR = 16


def _graph_cache(predictor: Any, fingerprint: str) -> dict[str, dict[str, Any]] | None:
    try:
        with _CACHE_LOCK:
            per_predictor = _CACHE.setdefault(predictor, {})
            if fingerprint not in per_predictor and len(per_predictor) >= _MAX_GRAPHS_PER_PREDICTOR:
                per_predictor.pop(next(iter(per_predictor)))
            return per_predictor.setdefault(fingerprint, {})
    except TypeError:  # not weak-referenceable: no caching
        return None


def predict_all(
    cg: ComputeGraph, configs: Sequence[MConfig], predictor: PredictorLike
) -> tuple[list[dict[str, Any]], bool]:
    """Predictions for ``configs`` (cached per predictor and graph); True when all were cached.

    Missing ones are asked in chunks sorted by (freeze, ckpt, method) so that
    the predictor encodes each distinct graph variant once.
    """
    fp = cg.meta.get("fp") or cg.fingerprint
    cache = _graph_cache(predictor, fp)
    specs = [c.format() for c in configs]
    todo = [c for c, s in zip(configs, specs) if cache is None or s not in cache]
    todo.sort(key=lambda c: (c.freeze, c.ckpt, c.method))
    fresh: dict[str, dict[str, Any]] = {}
    for start in range(0, len(todo), PREDICT_CHUNK):
        chunk = todo[start : start + PREDICT_CHUNK]
        results = predictor.predict(cg, chunk)
        if len(results) != len(chunk):
            raise PlanError(
                f"the predictor answered {len(results)} predictions for {len(chunk)} configurations"
            )
        for c, r in zip(chunk, results):
            if not isinstance(r, dict) or "peak_memory_bytes" not in r:
                raise PlanError("the predictor's answer has no peak_memory_bytes")
            fresh[c.format()] = r
    if cache is not None:
        with _CACHE_LOCK:
            cache.update(fresh)
        source = cache
    else:
        source = fresh
    return [source[s] if s in source else fresh[s] for s in specs], not todo


def clear_cache() -> None:
    """Forget every cached prediction."""
    with _CACHE_LOCK:
        _CACHE.clear()


# -- the planner -------------------------------------------------------------------


def _accuracy_of(pred: dict[str, Any], task: str | None) -> float | None:
    acc = pred.get("accuracy")
    if not isinstance(acc, dict) or not acc:
        return None
    if task is not None:
        value = acc.get(task)
        return float(value) if isinstance(value, int | float) else None
    values = [float(v) for v in acc.values() if isinstance(v, int | float)]
    return sum(values) / len(values) if values else None


def _bounded_search(
    configs: list[MConfig],
    evaluate: Any,
    pool: list[Candidate],
    flags: dict[str, bool],
    top_k: int,
    has_bn: bool,
    device: Device | None = None,
    shares: dict[float, float] | None = None,
) -> None:
    """Ask the predictor group by group (same method and freezing), best prior first, and
    stop when the next group's best prior cannot beat the current ``top_k``-th candidate."""
    groups: dict[tuple[str, float], list[MConfig]] = {}
    for c in configs:
        groups.setdefault((c.method, round(c.freeze, 6)), []).append(c)
    shares = shares or {}
    bound = {
        k: max(accuracy_prior(c, has_bn, device, shares.get(c.freeze)) for c in v)
        for k, v in groups.items()
    }
    order = sorted(groups, key=lambda k: -bound[k])
    i = 0
    while i < len(order):
        feasible = sorted((c.accuracy for c in pool if c.fits), reverse=True)
        if flags["accuracy"]:  # predicted accuracies: the prior bounds nothing, ask the rest
            evaluate([c for k in order[i:] for c in groups[k]])
            return
        if len(feasible) >= top_k and bound[order[i]] < feasible[top_k - 1] - 1e-9:
            return
        # growing chunks (1, 1, 2, 4, ... groups) amortise the predictor's per-call cost
        chunk = order[i : i + max(1, i)]
        evaluate([c for k in chunk for c in groups[k]])
        i += len(chunk)


def plan(
    cg: ComputeGraph,
    budget_mb: float | None,
    predictor: PredictorLike,
    *,
    device: Device | str | None = None,
    space: MSpace | None = None,
    time_budget_s: float | None = None,
    top_k: int = 10,
    margin: float | None = None,
    batch_size: int | None = None,
    candidates: Sequence[MConfig | str] | None = None,
    task: str | None = None,
    strict: bool = True,
    search: str = "exhaustive",
) -> PlanResult:
    """Rank the configurations of ``space`` that fit ``budget_mb`` (MiB) for graph ``cg``.

    ``space`` defaults to :func:`default_space` at ``batch_size`` (default 64;
    ignored when a space is given); ``candidates`` replaces the space by an
    explicit list. ``margin`` overrides the predictor's error quantiles.
    ``time_budget_s`` drops configurations whose predicted step latency exceeds
    it (the predictor must have a latency target). ``task`` picks the accuracy
    head to rank by (default: the mean over the predictor's accuracy heads).
    With ``strict`` (the default), raises :class:`PlanError` when nothing fits,
    naming the smallest predicted peak; otherwise the result's ``chosen`` is None.

    ``device`` (a :class:`~aiop.mpopt.device.Device`, a built-in name or a JSON
    file; default ``cpu``, this machine) gives the budget when ``budget_mb`` is
    None, the half precision of the default space, and the step-time factor of
    each precision for the speed tie-break when the predictions carry no
    ``latency_s`` (a predicted latency is the device's own: not scaled again).

    ``search="bounded"`` asks the predictor about groups of configurations in
    order of their best possible accuracy prior and stops once no unasked group
    can enter the top ``top_k``: the same ranking as ``"exhaustive"`` at a
    fraction of the predictions when the budget is not tight (``n_feasible``
    and the smallest peak then count only what was asked; a predictor with
    accuracy heads makes it ask everything, since the prior no longer bounds).
    """
    t0 = time.perf_counter()
    try:
        dev = get_device(device)
    except DeviceError as exc:
        raise PlanError(str(exc)) from None
    budget_source = "given"
    if budget_mb is None:
        if dev.memory_budget_mb is None:
            raise PlanError(
                f"no memory budget: give one, or a device with memory_budget_mb ({dev.name} "
                "has none)"
            )
        budget_mb, budget_source = dev.memory_budget_mb, f"device {dev.name}'s memory"
    if (
        isinstance(budget_mb, bool)
        or not isinstance(budget_mb, int | float)
        or not math.isfinite(budget_mb)
        or budget_mb <= 0
    ):
        raise PlanError(f"the memory budget must be a positive number of MB, got {budget_mb!r}")
    if time_budget_s is not None and (
        not isinstance(time_budget_s, int | float) or not time_budget_s > 0
    ):
        raise PlanError(
            f"the time budget must be a positive number of seconds, got {time_budget_s!r}"
        )
    if not isinstance(top_k, int) or top_k < 1:
        raise PlanError(f"top_k must be a positive integer, got {top_k!r}")
    if margin is None:
        margin, margin_source = margin_from(predictor)
    else:
        if not isinstance(margin, int | float) or not 0 <= margin < 10:
            raise PlanError(f"the margin must be a fraction in [0, 10), got {margin!r}")
        margin_source = "given"
    if candidates is not None:
        configs = [MConfig.parse(c) for c in candidates]
    else:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise PlanError(f"batch_size must be a positive integer, got {batch_size!r}")
        space = space or default_space(cg, batch_size or 64, dev)
        configs = list(space)
    if not configs:
        raise PlanError("no candidate configurations to plan over")
    n_blocks = graph_blocks(cg)
    configs = [c for c in configs if c.ckpt <= n_blocks]
    if not configs:
        raise PlanError(
            f"every candidate asks for more checkpoint segments than the {n_blocks} blocks"
        )

    configs = [c for c in configs if c.prec in dev.precision_time]
    if not configs:
        raise PlanError(
            f"every candidate uses a precision {dev.name} does not train in "
            f"(it has {', '.join(dev.precisions)})"
        )

    min_mb = min_micro_batch(cg)
    configs = [c for c in configs if c.mb >= min_mb]
    if not configs:
        raise PlanError(
            f"every candidate trains micro-batches smaller than {min_mb}: a BatchNorm of this "
            "graph sees one value per channel there, which PyTorch refuses to train"
        )

    has_bn = any(n.op == "BatchNormalization" for n in cg.nodes)
    shares = frozen_shares(cg, [c.freeze for c in configs])
    # a latency head predicts the device its labels were measured on (the shipped one: cpu)
    meta = getattr(predictor, "meta", None)
    latency_device = getattr(predictor, "latency_device", None) or (
        meta.get("latency_device") if isinstance(meta, dict) else None
    )
    own_latency = dev.name == (latency_device or "cpu")
    totals = GraphTotals.of(cg)
    budget_bytes = budget_mb * MB
    pool: list[Candidate] = []
    flags = {"latency": False, "accuracy": False, "cached": True}

    def evaluate(batch: list[MConfig]) -> None:
        preds, was_cached = predict_all(cg, batch, predictor)
        flags["cached"] = flags["cached"] and was_cached
        for c, p in zip(batch, preds):
            acc = _accuracy_of(p, task)
            latency = p.get("latency_s")
            flags["latency"] = flags["latency"] or latency is not None
            flags["accuracy"] = flags["accuracy"] or acc is not None
            cand = Candidate(
                config=c,
                peak_bytes=int(p["peak_memory_bytes"]),
                latency_s=float(latency) if latency is not None else None,
                step_gflops=step_gflops(totals, c, p.get("trainable_params")),
                accuracy=acc
                if acc is not None
                else accuracy_prior(c, has_bn, dev, shares.get(c.freeze)),
                accuracy_source="predicted" if acc is not None else "prior",
                prediction=p,
                time_factor=dev.time_factor(c.prec),
                latency_is_devices=own_latency,
            )
            cand.fits = cand.peak_bytes * (1 + margin) <= budget_bytes and (
                time_budget_s is None
                or (cand.latency_s is not None and cand.latency_s <= time_budget_s)
            )
            pool.append(cand)

    if search == "exhaustive":
        evaluate(configs)
    elif search == "bounded":
        _bounded_search(configs, evaluate, pool, flags, top_k, has_bn, dev, shares)
    else:
        raise PlanError(f"unknown search {search!r}; choose exhaustive or bounded")
    cached = flags["cached"]
    have_latency = flags["latency"]
    if time_budget_s is not None and not have_latency:
        raise PlanError(
            "a time budget needs a predictor trained for latency; this one predicts "
            "memory only (train one with latency labels, or drop the time budget)"
        )
    feasible = [c for c in pool if c.fits]
    feasible.sort(key=Candidate.sort_key)
    smallest = min(pool, key=lambda c: c.peak_bytes)
    result = PlanResult(
        budget_mb=float(budget_mb),
        margin=float(margin),
        margin_source=margin_source,
        n_candidates=len(configs),
        n_evaluated=len(pool),
        ranked=feasible[:top_k],
        smallest=smallest,
        planning_seconds=0.0,
        time_budget_s=time_budget_s,
        n_feasible=len(feasible),
        feasible=feasible,
        cached=cached,
        device=dev,
        budget_source=budget_source,
    )
    result.planning_seconds = round(time.perf_counter() - t0, 6)
    if not feasible and strict:
        need = smallest.peak_bytes * (1 + margin) / MB
        why = f" within {time_budget_s:g} s per step" if time_budget_s is not None else ""
        raise PlanError(
            f"no configuration of {len(configs)} fits {budget_mb:g} MB{why}: the smallest "
            f"predicted peak is {smallest.peak_bytes / MB:.1f} MB ({smallest.spec}), "
            f"{need:.1f} MB with the {margin:.1%} safety margin"
        )
    log.debug("%s", result.explanation())
    return result


def plan_model(
    model: str,
    budget_mb: float | None,
    predictor: PredictorLike | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> PlanResult:
    """:func:`plan` for a ``MODEL`` argument (a .onnx/.pb/.json path, ``zoo:NAME`` or
    ``family:FAMILY:SEED``) with the shipped predictor unless one is given; ``kwargs``
    go to :func:`plan` (``device=``, ``time_budget_s=``, ``batch_size=``, ...)."""
    from aiop.cg import graph_for_model

    if predictor is None:
        from aiop.cli import load_predictor

        predictor = load_predictor(None)
    cg = graph_for_model(model, input_shape)
    return plan(cg, budget_mb, predictor, **kwargs)
