"""The online retraining loop: plan, train for real, measure, compare by ``Aco``, re-plan.

A pretrained model (trained here on clean digits and cached, never downloaded)
meets a stream of drifting domains (:mod:`aiop.tasks.streams`) on a "device"
whose memory is the budget. At the start, whenever the domain changes and
whenever the available memory changes (``--budget-schedule``), the loop
re-plans. A domain change is known from the stream's boundaries
(``drift="metadata"``), detected without labels or metadata from the incoming
batches' statistics (``drift="detect"``, :mod:`aiop.mpopt.drift`), or either
(``"both"``, the default: a device rarely knows its domain, a benchmark does).
Each time it

1. plans with the predictor (:func:`aiop.mpopt.planner.plan`: every candidate
   predicted at once, the safety margin from the predictor's error quantiles);
2. takes the best few candidates that differ in what they train (method,
   freezing, precision) and probes each for a few real steps from the same
   weights, measuring MPOptimizer's accuracy gain per second, ``Aco`` — the
   accuracy gained on the domain's probe set per second of training
   (supervised), or the entropy removed per second (Tent, which has no labels);
3. keeps the planner's first choice unless the evidence says a challenger
   learns better on this model (``selection="evidence"``, the default; see
   :func:`select_probe`): every probe is a paired comparison from the same
   weights on the same batches, scored per probe image (cross-entropy, or
   entropy for Tent), and the comparisons of a pair of train settings add up
   across re-plans, so after the first domain the loop knows which setting
   learned faster on this model and the fixed prior no longer decides. A
   challenger wins when its mean per-image gain over the planner's choice
   passes two standard errors and 5 % of the planner's choice's own gain, in
   this re-plan or pooled over all so far, and it loses no probe accuracy; among
   such challengers the highest ``Aco`` wins. Its weights train on
   (``aiop.mconfig.prepare`` and ``train_step``: what is planned is what
   trains), its probe steps counting as training steps of the stream.
   ``selection="prior"`` is the earlier rule: a challenger must gain more than
   two probe images in this probe alone.

The safety margin is for configurations nobody has run. A probe measures the
real peak, and a step's peak repeats from its second step on (same shapes, the
optimizer state exists), so with ``probe_beyond_margin`` the loop also probes
the most accurate candidate that only the margin rules out (predicted under the
budget itself) under the memory guard: if both of its probe steps stay within
the budget it becomes the first choice, measured rather than predicted; if one
would pass the budget the guard stops it, nothing is lost and it is not tried
again (the margin is not widened: the probe knowingly went inside it).

Every step's real peak memory is measured with the profiler's tracker
(:class:`~aiop.profiler.tracker.StepMemoryTracker`), which here also acts as
the device's memory limit: a step whose live tensors would pass the budget is
stopped like an out-of-memory error, the loop widens its margin by what it saw
and falls back to a smaller configuration, and no weights are lost (the step
had not updated them; if it had, the last checkpoint is restored).
Checkpoints of the adapted weights are safetensors written to a temporary file
and renamed. ``--resume`` continues from the last one.

Modes: ``supervised`` fine-tuning with the stream's labels, and ``tent``
(Wang et al., ICLR 2021): entropy minimisation on the normalisation layers'
affine parameters, with batch statistics instead of running ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aiop.cache import cache_dir
from aiop.mconfig import MConfig, MSpace, make_optimizer, prepare, train_step
from aiop.mpopt.drift import DriftDetector, DriftError
from aiop.mpopt.planner import MB, Candidate, PlanError, PlanResult, PredictorLike, plan
from aiop.profiler.tracker import StepMemoryTracker

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("supervised", "tent")
# What makes the loop re-plan on a domain change (budget changes always do).
DRIFT_MODES: tuple[str, ...] = ("both", "detect", "metadata")
# How the loop picks among probed candidates (see select_probe).
SELECTIONS: tuple[str, ...] = ("evidence", "prior")
# What a re-plan does to the optimizer's state (momentum) when the adopted configuration
# trains the same parameters with the same optimizer as before (see carry_optimizer_state).
OPTIMIZER_STATES: tuple[str, ...] = ("reset", "keep")
# A challenger must beat the planner's choice by this many standard errors of the
# mean per-image paired gain (one-sided, about 2.3 % false switches on noise).
EVIDENCE_Z = 2.0
# ... and by a gain that matters: this share of what the planner's choice itself gained in
# the same probes (nats per probe image; pooled evidence: over the same re-plans), and
# never less than EVIDENCE_MIN_GAIN. Two settings that train almost the same parameters
# (bias-only vs last layer) differ consistently but negligibly; without it the paired
# test calls that significant.
EVIDENCE_MIN_SHARE = 0.05
EVIDENCE_MIN_GAIN = 1e-3
# Inputs are standardised with these constants (MNIST-like digits in [0, 1]).
_MEAN, _STD = 0.5, 0.5
CHECKPOINT = "checkpoint.safetensors"
STATE = "state.json"
WEIGHTS_FORMAT = "aiop-retrain-weights"


class RetrainError(ValueError):
    """Bad retraining settings (schedule, mode, model) or a run that cannot continue."""


class DeviceOutOfMemory(RuntimeError):
    """A step's live tensors passed the device's memory budget (raised by :class:`BudgetGuard`)."""

    def __init__(self, live_bytes: int, limit_bytes: int, phase: str) -> None:
        super().__init__(
            f"step needs more than {live_bytes / MB:.1f} MB of the {limit_bytes / MB:.1f} MB budget"
        )
        self.live_bytes, self.limit_bytes, self.phase = live_bytes, limit_bytes, phase


class BudgetGuard(StepMemoryTracker):
    """The profiler's step tracker with a hard limit: the emulated device runs out of memory.

    On a real edge device the allocator fails; on this CPU the tracker sees the
    same live-tensor total and raises :class:`DeviceOutOfMemory` once it passes
    ``limit_bytes``.
    """

    def __init__(self, limit_bytes: int | None) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.phase_name = "inputs"

    def set_phase(self, phase: str) -> None:
        self.phase_name = phase
        super().set_phase(phase)

    def _update_peak(self) -> None:
        super()._update_peak()
        if self.limit_bytes is not None and self.total > self.limit_bytes:
            raise DeviceOutOfMemory(self.total, self.limit_bytes, self.phase_name)


# -- settings ------------------------------------------------------------------------


def parse_budget_schedule(text: str | None, initial_mb: float) -> list[tuple[int, float]]:
    """``"0:300,40:150"`` → ``[(0, 300.0), (40, 150.0)]`` (step: MB from that step on).

    The initial budget applies from step 0 unless the schedule sets step 0.
    """
    schedule: dict[int, float] = {0: float(initial_mb)}
    if not text:
        return [(0, float(initial_mb))]
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        step_text, sep, mb_text = part.partition(":")
        try:
            step, mb = int(step_text), float(mb_text)
        except ValueError:
            raise RetrainError(
                f"--budget-schedule entry {part!r} is not STEP:MB (e.g. 0:300,40:150)"
            ) from None
        if not sep or step < 0 or not math.isfinite(mb) or mb <= 0:
            raise RetrainError(
                f"--budget-schedule entry {part!r}: STEP must be >= 0 and MB a positive number"
            )
        schedule[step] = mb
    return sorted(schedule.items())


def budget_at(schedule: Sequence[tuple[int, float]], step: int) -> float:
    current = schedule[0][1]
    for start, mb in schedule:
        if start <= step:
            current = mb
    return current


@dataclass
class RetrainSettings:
    """Everything that defines a retraining run (recorded in its report and checkpoint)."""

    model: str = "zoo:mobilenet_v2"
    stream: str = "digits-c"
    budget_mb: float = 300.0
    budget_schedule: list[tuple[int, float]] = field(default_factory=list)
    mode: str = "supervised"
    batch_size: int = 32
    resolution: int = 32
    steps_per_domain: int = 20
    top_k: int = 3
    probe_steps: int = 2
    lr: float | None = None
    eval_size: int = 300
    probe_size: int = 100
    seed: int = 0
    pretrain_epochs: int = 3
    pretrain_samples: int | None = None  # None: the whole clean train split
    enforce_budget: bool = True
    probe_beyond_margin: bool = True  # measure the best candidate only the margin rules out
    drift: str = "both"  # re-plan at the stream's boundaries, detected drift, or both
    drift_threshold: float = 1.0  # shift in reference SDs that counts as drift
    selection: str = "evidence"  # pick among probes on evidence across re-plans, or "prior"
    # a re-plan to a config with the same trainable set: a fresh optimizer, or keep its state
    optimizer_state: str = "reset"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)  # MSpace overrides (e.g. freezes)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RetrainError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.drift not in DRIFT_MODES:
            raise RetrainError(
                f"unknown drift mode {self.drift!r}; choose one of {', '.join(DRIFT_MODES)}"
            )
        if self.selection not in SELECTIONS:
            raise RetrainError(
                f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}"
            )
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise RetrainError(
                f"unknown optimizer state {self.optimizer_state!r}; choose one of "
                f"{', '.join(OPTIMIZER_STATES)}"
            )
        try:
            DriftDetector(threshold=self.drift_threshold)
        except DriftError as exc:
            raise RetrainError(str(exc)) from None
        if not self.budget_schedule:
            self.budget_schedule = [(0, float(self.budget_mb))]
        for key in ("batch_size", "resolution", "steps_per_domain", "top_k", "eval_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RetrainError(f"{key} must be a positive integer, got {value!r}")
        if self.probe_steps < 0 or self.probe_steps > self.steps_per_domain:
            raise RetrainError(
                f"probe_steps must be in 0..steps_per_domain ({self.steps_per_domain})"
            )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.01 if self.mode == "supervised" else 0.002

    def key(self) -> str:
        """A hash of what determines the run (resume refuses a checkpoint of other settings)."""
        d = asdict(self)
        if self.selection == "prior" or self.top_k == 1 or self.probe_steps == 0:
            # the rule that picks among probes changes nothing here (one candidate, or no
            # probe), or it is the earlier rule: keys stay those of runs made before it existed
            del d["selection"]
        if self.optimizer_state == "reset":  # the behaviour before the option existed
            del d["optimizer_state"]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the pretrained model -------------------------------------------------------------


def standardise(images: np.ndarray) -> torch.Tensor:
    return (torch.tensor(images, dtype=torch.float32) - _MEAN) / _STD


def build_model(spec: str, resolution: int, **kwargs: Any) -> nn.Module:
    from aiop.models import build

    return build(spec, num_classes=10, resolution=resolution, **kwargs)


def save_state_atomic(path: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a model's weights and ``meta`` as one safetensors checkpoint, atomically (the
    task package's writer, :func:`aiop.tasks.checkpoints.save_checkpoint`)."""
    from aiop.tasks.checkpoints import save_checkpoint

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return save_checkpoint(state, {**meta, "format": WEIGHTS_FORMAT}, path)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, meta) of a :func:`save_state_atomic` file; :class:`RetrainError` if it is
    missing or not one."""
    from aiop.tasks.checkpoints import load_checkpoint

    state, meta = load_checkpoint(path, WEIGHTS_FORMAT, "retraining", RetrainError)
    meta.pop("format", None)
    return state, meta


def pretrained(
    spec: str,
    resolution: int,
    *,
    source: str = "mnist",
    epochs: int = 3,
    seed: int = 0,
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    samples: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``spec`` trained on the clean ``train`` split of the digits, cached under :func:`cache_dir`.

    Returns the model and a record (cache path, clean test accuracy, whether it was cached).
    """
    from tqdm import tqdm

    from aiop.tasks.streams import Domain, domain_split

    model_kwargs = dict(model_kwargs or {})
    key = json.dumps(
        [spec, resolution, source, epochs, seed, model_kwargs, samples], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = spec.replace(":", "_").replace("/", "_")
    path = cache_dir() / "pretrained" / f"{slug}-r{resolution}-{source}-{digest}.safetensors"
    torch.manual_seed(seed)
    model = build_model(spec, resolution, **model_kwargs)
    if path.is_file():
        try:
            state, meta = load_state(path)
            model.load_state_dict(state)
            return model, {**meta, "path": str(path), "cached": True}
        except Exception as exc:  # a corrupt cache file is rebuilt, not fatal
            log.warning("pretrained cache %s unreadable (%s); retraining", path, exc)
    images, labels = domain_split(
        Domain(), "train", source=source, resolution=resolution, limit=samples
    )
    x_all, y_all = standardise(images), torch.from_numpy(labels.astype(np.int64))
    bs = 64
    steps = epochs * math.ceil(len(y_all) / bs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc=f"pretrain {spec}", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    # train_step clears gradients after its update, not before: a last pretraining
    # gradient left here would be added to the first step of the stream (only in the run
    # that pretrained, not in those that load the cached model)
    opt.zero_grad(set_to_none=True)
    test_x, test_y = domain_split(
        Domain(), "test", source=source, resolution=resolution, limit=samples
    )
    acc = evaluate(model, test_x, test_y)
    meta = {"spec": spec, "resolution": resolution, "source": source, "epochs": epochs,
            "seed": seed, "clean_test_accuracy": acc}  # fmt: skip
    save_state_atomic(path, model, meta)
    return model, {**meta, "path": str(path), "cached": False}


# -- evaluation and the Tent objective ----------------------------------------------------


@torch.no_grad()
def logits_of(model: nn.Module, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    out = [model(standardise(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in eval mode (Tent models use batch statistics there too)."""
    was = model.training
    model.eval()
    try:
        pred = logits_of(model, images).argmax(1).numpy()
    finally:
        model.train(was)
    return float((pred == labels).mean())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (Tent's objective)."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1).mean()


def _entropy_loss(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    return entropy(outputs)


def configure_tent(model: nn.Module) -> None:
    """Normalisation layers use batch statistics (no running estimates), as Tent does."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    model.loss = _entropy_loss  # type: ignore[method-assign,assignment]


def prepare_for(model: nn.Module, config: MConfig, mode: str) -> None:
    """``aiop.mconfig.prepare``, then for Tent only normalisation affine parameters train."""
    prepare(model, config)
    if mode == "tent":
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        keep = {
            id(p)
            for m in model.modules()
            if isinstance(m, norms)
            for p in m.parameters(recurse=False)
            if p.requires_grad
        }
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)


# -- choosing among probes ----------------------------------------------------------------


def setting_key(config: MConfig) -> str:
    """What a configuration trains (its maths up to micro-batching and checkpointing)."""
    return f"{config.method},freeze={config.freeze:g},{config.prec}"


@dataclass
class PairedEvidence:
    """All probes so far of setting ``b`` against setting ``a`` from the same weights.

    ``mean_gain`` is the mean per-probe-image score of ``b`` minus ``a`` (score: minus
    the cross-entropy, or minus the entropy for Tent; higher is better), over every
    re-plan that probed both; ``se`` its standard error; ``accuracy_gain`` the same
    difference of correct probe images (supervised only); ``a_gain`` what ``a`` itself
    gained in those probes (mean score after minus before), the scale of a difference
    that matters.
    """

    a: str
    b: str
    mean_gain: float
    se: float
    accuracy_gain: float
    images: int
    replans: int
    a_gain: float = 0.0

    @property
    def min_gain(self) -> float:
        """The smallest gain that matters: a share of what ``a`` gained, with a floor."""
        return max(EVIDENCE_MIN_GAIN, EVIDENCE_MIN_SHARE * abs(self.a_gain))

    def significant(self, z: float = EVIDENCE_Z) -> bool:
        """``b`` learns better than ``a``: a gain of ``z`` standard errors and at least
        :attr:`min_gain` per image, no probe accuracy lost."""
        return (
            self.images > 1
            and self.mean_gain > max(z * self.se, self.min_gain)
            and self.accuracy_gain >= 0
        )


def paired_evidence(history: Sequence[dict[str, Any]], a: str, b: str) -> PairedEvidence:
    """Pool the per-image paired differences of ``b`` over ``a`` across re-plans.

    Each entry of ``history`` is one re-plan: setting key → ``{"scores": [...],
    "correct": [...] | None, "gain": float}`` of its probe images after the probe steps
    (``gain``: mean score after minus before). Within a re-plan both settings started
    from the same weights and trained on the same batches, so the per-image difference
    is a paired comparison; pooling the re-plans carries what the loop learned about
    this model across domains.
    """
    diffs, acc, a_gains = [], [], []
    replans = 0
    for entry in history:
        if a not in entry or b not in entry:
            continue
        replans += 1
        a_gains += [float(entry[a].get("gain", 0.0))] * len(entry[a]["scores"])
        diffs.append(np.asarray(entry[b]["scores"], float) - np.asarray(entry[a]["scores"], float))
        ca, cb = entry[a].get("correct"), entry[b].get("correct")
        if ca is not None and cb is not None:
            acc.append(np.asarray(cb, float) - np.asarray(ca, float))
    x = np.concatenate(diffs) if diffs else np.zeros(0)
    n = len(x)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return PairedEvidence(
        a=a,
        b=b,
        mean_gain=float(x.mean()) if n else 0.0,
        se=se,
        accuracy_gain=float(np.concatenate(acc).mean()) if acc else 0.0,
        images=n,
        replans=replans,
        a_gain=float(np.mean(a_gains)) if a_gains else 0.0,
    )


def select_probe(
    ok: list[dict[str, Any]], history: Sequence[dict[str, Any]], z: float = EVIDENCE_Z
) -> dict[str, Any]:
    """The probed candidate to train on: the first (the planner's choice) unless the evidence
    says another setting learns better on this model; among those that do, the highest
    ``Aco`` of the probe objective wins.

    A challenger has the evidence (:meth:`PairedEvidence.significant`) when either this
    re-plan's probes show it (the new domain may favour another setting than the earlier
    ones did) or the probes of every re-plan so far, pooled, show it (small gains that no
    single probe separates add up across domains), by a gain that matters
    (``EVIDENCE_MIN_SHARE`` of what the planner's choice's setting gained in the same
    probes, at least ``EVIDENCE_MIN_GAIN``). ``ok`` are probe results (``setting``,
    ``aco_objective``), best-planned first; ``history`` ends with the current re-plan.
    Each challenger gets its ``evidence`` record.
    """
    incumbent = ok[0]
    winners = []
    for r in ok[1:]:
        pooled = paired_evidence(history, incumbent["setting"], r["setting"])
        now = paired_evidence(history[-1:], incumbent["setting"], r["setting"])
        record = {k: v for k, v in asdict(pooled).items() if k not in ("a", "b")}
        record.update(against=pooled.a, min_gain=pooled.min_gain, now_mean_gain=now.mean_gain,
                      now_se=now.se, now_accuracy_gain=now.accuracy_gain,
                      now_min_gain=now.min_gain)  # fmt: skip
        record["significant"] = pooled.significant(z) or now.significant(z)
        r["evidence"] = record
        if r["setting"] != incumbent["setting"] and record["significant"]:
            winners.append(r)
    return max(winners, key=lambda r: r["aco_objective"]) if winners else incumbent


# -- records -------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: int
    domain: str
    budget_mb: float
    config: str
    predicted_peak_bytes: int | None
    measured_peak_bytes: int | None
    seconds: float
    loss: float | None
    event: str = "train"  # train | probe | oom-fallback


@dataclass
class Trainer:
    """A model with its current config and optimizer."""

    model: nn.Module
    config: MConfig
    optimizer: torch.optim.Optimizer | None
    predicted_peak: int | None = None

    @classmethod
    def make(
        cls, model: nn.Module, config: MConfig, mode: str, lr: float, predicted: int | None
    ) -> Trainer:
        prepare_for(model, config, mode)
        return cls(model, config, make_optimizer(model, config, lr), predicted)

    def step(
        self, x: np.ndarray, y: np.ndarray, limit_bytes: int | None
    ) -> tuple[float, int, float]:
        """One real training step under the memory guard: (loss, measured peak, seconds)."""
        inputs = standardise(x)
        targets = torch.from_numpy(y.astype(np.int64))
        guard = BudgetGuard(limit_bytes)
        guard.track_model(self.model, self.optimizer)
        guard.track([inputs, targets], "inputs")
        guard.reset_peak()
        t0 = time.perf_counter()
        try:
            with guard:
                loss = train_step(
                    self.model,
                    self.optimizer,
                    self.config,
                    batch=((inputs,), targets),
                    on_phase=guard.set_phase,
                )
        except DeviceOutOfMemory:
            for p in self.model.parameters():
                p.grad = None
            raise
        except RuntimeError as exc:  # autograd may wrap an exception raised in backward
            if isinstance(exc.__cause__, DeviceOutOfMemory):
                for p in self.model.parameters():
                    p.grad = None
                raise exc.__cause__ from None
            raise
        finally:
            guard.close()
        return float(loss.item()), int(guard.peak), time.perf_counter() - t0


def trainable_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the parameters ``optimizer`` updates, in its order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]]


def carry_optimizer_state(old: Trainer, new: Trainer) -> bool:
    """Give ``new`` a copy of ``old``'s optimizer state (SGD's momentum buffers) when both
    update the same parameters, by name and in the same order, with the same optimizer.

    A re-plan that adopts a configuration with the same trainable set changes how a step
    is computed (micro-batches, checkpointing), not what is optimised, so the momentum
    is still that of these parameters; a fresh optimizer would make the run depend on
    *when* re-plans happen. ``new`` may train a copy of ``old``'s model (a probe): the
    state is deep-copied, so steps of one never move the other's buffers. Returns
    whether the state was carried.
    """
    if old.optimizer is None or new.optimizer is None:
        return False
    if type(old.optimizer) is not type(new.optimizer):
        return False
    if trainable_names(old.model, old.optimizer) != trainable_names(new.model, new.optimizer):
        return False
    # load_state_dict keeps tensors already on the right device and dtype as they are:
    # without the copy a probe would share (and move) the incumbent's momentum
    new.optimizer.load_state_dict(copy.deepcopy(old.optimizer.state_dict()))
    return True


# -- the loop ------------------------------------------------------------------------


class RetrainLoop:
    """One run of online retraining (see the module docstring)."""

    def __init__(
        self,
        settings: RetrainSettings,
        predictor: PredictorLike,
        out_dir: str | Path,
        *,
        progress: bool = True,
        predictor_name: str = "",
        resume: bool = False,
    ) -> None:
        from aiop.tasks.streams import Stream

        self.s = settings
        self.predictor = predictor
        self.predictor_name = predictor_name
        self.out = Path(out_dir)
        self.progress = progress
        self.resume = resume
        self.stream = Stream(
            settings.stream,
            resolution=settings.resolution,
            batch_size=settings.batch_size,
            steps_per_domain=settings.steps_per_domain,
            seed=settings.seed,
            eval_size=settings.eval_size,
            probe_size=settings.probe_size,
        )
        self.steps: list[StepRecord] = []
        self.plans: list[dict[str, Any]] = []
        self.domains: list[dict[str, Any]] = []
        self.margin: float | None = None  # None: the predictor's; widened after an OOM
        self.planning_seconds = 0.0
        self.probe_seconds = 0.0
        self.ooms = 0
        self.detector = DriftDetector(threshold=settings.drift_threshold)
        self.beyond_failed: set[str] = set()  # beyond-margin probes the guard stopped
        self.drift_events: list[dict[str, Any]] = []
        self.broken: dict[str, str] = {}  # configs that cannot train this model, and why
        # per re-plan: setting key -> its probe images' scores after probing (select_probe)
        self.evidence: list[dict[str, Any]] = []

    # -- planning ------------------------------------------------------------------
    def _space(self) -> MSpace:
        from aiop.mpopt.planner import default_space

        base = default_space(self.cg, self.s.batch_size)
        overrides: dict[str, Any] = {"batch_sizes": (self.s.batch_size,)}
        if self.s.mode == "tent":
            overrides["methods"] = ("norm+last",)
        overrides.update({k: tuple(v) for k, v in self.s.space.items()})
        fields = {
            "micro_batches": base.micro_batches,
            "freezes": base.freezes,
            "segments": base.segments,
            "methods": base.methods,
            "precisions": base.precisions,
            "optimizers": base.optimizers,
        }
        fields.update(overrides)
        return MSpace(**fields)

    def _plan(self, budget_mb: float) -> PlanResult:
        t0 = time.perf_counter()
        try:
            result = plan(
                self.cg,
                budget_mb,
                self.predictor,
                space=self.space,
                top_k=max(self.s.top_k, 1),
                margin=self.margin,
            )
        finally:
            self.planning_seconds += time.perf_counter() - t0
        return result

    @staticmethod
    def distinct(
        result: PlanResult,
        k: int,
        exclude: set[str] = frozenset(),
        spread_methods: bool = False,
    ) -> list[Candidate]:
        """The best ``k`` feasible candidates that differ in what they train.

        With ``spread_methods`` the planner's first choice is followed by the best
        candidate of each *other* train method before variants (freezing, precision)
        of a method already taken: the methods are what the prior is least sure of
        (full fine-tuning vs TinyTL's ranking differs between models), so they are
        what the probes must compare. The list stays in the planner's order.
        """
        pool: list[Candidate] = []
        seen: set[str] = set()
        for c in result.feasible:
            key = setting_key(c.config)
            if key in seen or c.spec in exclude:
                continue
            seen.add(key)
            pool.append(c)
            if len(pool) == k and not spread_methods:
                break
        if not spread_methods or len(pool) <= k:
            return pool[:k]
        picked = [0]
        methods = {pool[0].config.method}
        for i, c in enumerate(pool):
            if len(picked) < k and c.config.method not in methods:
                picked.append(i)
                methods.add(c.config.method)
        for i in range(len(pool)):
            if len(picked) < k and i not in picked:
                picked.append(i)
        return [pool[i] for i in sorted(picked)]

    # -- one step, with fallback ---------------------------------------------------
    def _limit(self, budget_mb: float) -> int | None:
        return int(budget_mb * MB) if self.s.enforce_budget else None

    def _widen_margin(self, oom: DeviceOutOfMemory, predicted: int | None) -> None:
        """After an OOM, plan with a margin at least what this prediction missed by."""
        if not predicted:
            return
        seen = oom.live_bytes / predicted - 1.0
        current = self.margin if self.margin is not None else self.plan_result.margin
        self.margin = max(current, seen + 0.05)
        log.warning("step out of memory; planning margin widened to %.1f%%", self.margin * 100)

    # -- checkpoints -----------------------------------------------------------------
    def _save(self, next_step: int) -> None:
        meta = {
            "settings_key": self.s.key(),
            "next_step": next_step,
            "config": self.trainer.config.format(),
            "lite": any("lite" in n for n, _ in self.trainer.model.named_parameters()),
            "margin": self.margin,
        }
        save_state_atomic(self.out / CHECKPOINT, self.trainer.model, meta)
        state = {
            "settings_key": self.s.key(),
            "next_step": next_step,
            "steps": [asdict(r) for r in self.steps],
            "plans": self.plans,
            "domains": self.domains,
            "planning_seconds": self.planning_seconds,
            "probe_seconds": self.probe_seconds,
            "ooms": self.ooms,
            "margin": self.margin,
            "broken": self.broken,
            "drift_events": self.drift_events,
            "beyond_failed": sorted(self.beyond_failed),
            "evidence": self.evidence,
        }
        _write_json_atomic(self.out / STATE, state)

    def _restore_weights(self, model: nn.Module) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state, _ = load_state(path)
        model.load_state_dict(state)
        return True

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        from aiop.cg.torch_import import from_torch

        s = self.s
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        base, pre = pretrained(
            s.model,
            s.resolution,
            source=self.stream.spec.source,
            epochs=s.pretrain_epochs,
            seed=s.seed,
            progress=self.progress,
            model_kwargs=s.model_kwargs,
            samples=s.pretrain_samples,
        )
        self.pretrain = pre
        self.cg = from_torch(copy.deepcopy(base), (1, 3, s.resolution, s.resolution), name=s.model)
        self.space = self._space()
        for _, mb in s.budget_schedule:  # fail before training if a scheduled budget is impossible
            try:
                self._plan(mb)
            except PlanError as exc:
                raise RetrainError(f"budget schedule: {exc}") from None
        if s.mode == "tent":
            configure_tent(base)
        torch.manual_seed(s.seed)
        start = 0
        model = base
        if self.resume:
            start, model = self._load_resume(base)
        n = len(self.stream)
        bar = tqdm(total=n, initial=start, desc="retrain", disable=not self.progress)
        try:
            self._loop(model, start, n, bar)
        except BaseException:
            # whatever stopped the run (a bad budget, Ctrl-C, a predictor that went away):
            # keep what was learned and measured; weights and records stay resumable
            bar.close()
            try:
                self._save(self._next_step())
                _write_json_atomic(
                    self.out / "report.json", self._report(time.perf_counter() - t_start)
                )
            except Exception as exc:  # never mask what stopped the run
                log.warning("could not save the partial run: %s", exc)
            raise
        bar.close()
        current_domain = self.stream.domain_index(n - 1)
        if self.domains and "acc_after" not in self.domains[-1]:
            self._close_domain(current_domain)
        self._save(n)
        report = self._report(time.perf_counter() - t_start)
        _write_json_atomic(self.out / "report.json", report)
        try:
            report["plot"] = str(plot_report(report, self.out / "report.png"))
            _write_json_atomic(self.out / "report.json", report)
        except Exception as exc:  # a missing plotting backend must not lose the report
            log.warning("could not draw the report plot: %s", exc)
        return report

    def _next_step(self) -> int:
        done = [r.step for r in self.steps if r.event not in ("oom-fallback", "config-error")]
        return max(done) + 1 if done else 0

    def _loop(self, model: nn.Module, start: int, n: int, bar: Any) -> None:
        s = self.s
        # the domain whose record is the last one (open or closed); -1 before the first
        current_domain = self.domains[-1]["index"] if self.domains else -1
        current_budget: float | None = None
        self.trainer = Trainer(model, MConfig(batch_size=s.batch_size), None)
        need_plan = True
        step = start
        acc_now: float | None = None
        use_boundaries = s.drift in ("both", "metadata")
        detect = s.drift in ("both", "detect")
        while step < n:
            d_index = self.stream.domain_index(step)
            budget = budget_at(s.budget_schedule, step)
            reasons = []
            if d_index != current_domain:
                # the per-domain records are the benchmark's view: kept in every drift mode
                if self.domains and "acc_after" not in self.domains[-1]:
                    self._close_domain(current_domain)
                    self._save(step)
                self._open_domain(d_index)
                acc_now = self.domains[-1]["acc_before"]
                current_domain = d_index
                if use_boundaries:
                    reasons.append(f"domain {self.stream.domains[d_index].name}")
            if budget != current_budget:
                reasons.append(f"budget {budget:g} MB")
                current_budget = budget
            x, y = self.stream.batch(step)
            if detect and not (reasons or need_plan):
                event = self.detector.update(x, step)
                if event is not None:
                    self._on_drift(event)
                    reasons.append(event.describe())
            if reasons or need_plan:
                step = self._replan_and_probe(step, budget, ", ".join(reasons) or "fallback", bar)
                need_plan = False
                self.detector.reset()  # what comes after a re-plan is the new reference
                continue  # probes may have consumed steps (and crossed a domain end)
            try:
                loss, peak, secs = self.trainer.step(x, y, self._limit(budget))
            except DeviceOutOfMemory as oom:
                self._on_oom(step, budget, oom)
                need_plan = True
                continue
            except (RuntimeError, ValueError) as exc:
                # a config the model cannot train (e.g. BatchNorm over a 1x1 map of one
                # sample): never again in this run, and plan around it
                self.broken[self.trainer.config.format()] = _first_line(exc)
                self._record(step, budget, None, None, 0.0, "config-error")
                need_plan = True
                continue
            self._record(step, budget, loss, peak, secs, "train")
            bar.update()
            bar.set_postfix(
                domain=self.stream.domains[d_index].name,
                acc=f"{acc_now:.3f}" if acc_now is not None else "-",
                config=_short(self.trainer.config),
                peak=f"{peak / MB:.0f}/{budget:g}MB",
            )
            step += 1
            if step % max(s.steps_per_domain // 2, 1) == 0:
                self._save(step)

    def _on_drift(self, event: Any) -> None:
        """Record a detected drift with where the stream's true boundary was."""
        d = self.stream.domain_index(event.step)
        start = d * self.s.steps_per_domain
        self.drift_events.append(
            {
                **asdict(event),
                "domain": self.stream.domains[d].name,
                "steps_after_boundary": event.step - start,
            }
        )
        log.info("%s", event.describe())

    def _drift_summary(self) -> dict[str, Any]:
        """How detected drifts line up with the stream's boundaries (known only here)."""
        spd = self.s.steps_per_domain
        window = max(spd // 2, 1)  # an event this soon after a boundary detected it
        starts = [i * spd for i in range(1, len(self.stream.domains))]
        first = self._next_step()
        starts = [b for b in starts if b < first]
        hit: dict[int, int] = {}
        false_alarms = 0
        for e in self.drift_events:
            b = e["step"] - e["steps_after_boundary"]
            if b in starts and e["steps_after_boundary"] < window and b not in hit:
                hit[b] = e["steps_after_boundary"]
            else:
                false_alarms += 1
        out: dict[str, Any] = {
            "mode": self.s.drift,
            "threshold": self.s.drift_threshold,
            "events": len(self.drift_events),
        }
        if self.s.drift != "detect":
            # boundaries re-plan from the metadata and reset the detector: its events
            # (if any) are drifts inside a domain, not detections of a boundary
            return out
        return {
            **out,
            "boundaries": len(starts),
            "boundaries_detected": len(hit),
            "false_alarms": false_alarms,
            "mean_delay_steps": float(np.mean(list(hit.values()))) if hit else None,
        }

    def _load_resume(self, base: nn.Module) -> tuple[int, nn.Module]:
        path, state_path = self.out / CHECKPOINT, self.out / STATE
        if not path.is_file() or not state_path.is_file():
            raise RetrainError(f"--resume: no checkpoint in {self.out} (run without --resume)")
        weights, meta = load_state(path)
        if meta.get("settings_key") != self.s.key():
            raise RetrainError(
                f"--resume: the checkpoint in {self.out} is of a run with other settings"
            )
        if meta.get("lite"):
            from aiop.models.tinytl import insert_lite_residual

            insert_lite_residual(base)
        base.load_state_dict(weights)
        state = json.loads(state_path.read_text())
        self.steps = [StepRecord(**r) for r in state["steps"]]
        self.plans, self.domains = state["plans"], state["domains"]
        self.planning_seconds = state["planning_seconds"]
        self.probe_seconds = state["probe_seconds"]
        self.ooms = state["ooms"]
        self.margin = state["margin"]
        self.broken = state.get("broken", {})
        self.drift_events = state.get("drift_events", [])
        self.beyond_failed = set(state.get("beyond_failed", []))
        self.evidence = state.get("evidence", [])
        start = int(meta["next_step"])
        self.steps = [r for r in self.steps if r.step < start]
        return start, base

    def _open_domain(self, index: int) -> None:
        x, y = self.stream.eval_set(index)
        self.domains.append(
            {
                "index": index,
                "domain": self.stream.domains[index].name,
                "acc_before": evaluate(self.trainer.model, x, y),
                "configs": [],
            }
        )

    def _close_domain(self, index: int) -> None:
        x, y = self.stream.eval_set(index)
        rec = self.domains[-1]
        rec["acc_after"] = evaluate(self.trainer.model, x, y)
        rec["steps"] = sum(1 for r in self.steps if r.domain == rec["domain"])

    def _record(
        self, step: int, budget: float, loss: float | None, peak: int | None, secs: float, ev: str
    ) -> None:
        self.steps.append(
            StepRecord(
                step=step,
                domain=self.stream.domain_at(step).name,
                budget_mb=budget,
                config=self.trainer.config.format(),
                predicted_peak_bytes=self.trainer.predicted_peak,
                measured_peak_bytes=peak,
                seconds=round(secs, 5),
                loss=loss,
                event=ev,
            )
        )
        spec = self.trainer.config.format()
        if self.domains and spec not in self.domains[-1]["configs"]:
            self.domains[-1]["configs"].append(spec)

    def _on_oom(self, step: int, budget: float, oom: DeviceOutOfMemory) -> None:
        self.ooms += 1
        self._widen_margin(oom, self.trainer.predicted_peak)
        self._record(step, budget, None, oom.live_bytes, 0.0, "oom-fallback")
        # weights may be half-updated by an OOM inside optimizer.step(): go back to the checkpoint
        if oom.phase == "optimizer" and not self._restore_weights(self.trainer.model):
            log.warning("no checkpoint to restore after an OOM inside optimizer.step()")

    def _replan_and_probe(self, step: int, budget: float, reason: str, bar: Any) -> int:
        """Plan, probe the top distinct candidates by Aco, adopt the best; returns the next step."""
        s = self.s
        d_index = self.stream.domain_index(step)
        tried: set[str] = set()
        while True:
            try:
                self.plan_result = self._plan(budget)
            except PlanError as exc:
                raise RetrainError(f"step {step}: {exc}") from None
            cands = self.distinct(
                self.plan_result,
                s.top_k,
                exclude=tried | set(self.broken),
                spread_methods=s.selection == "evidence",
            )
            if not cands:
                raise RetrainError(
                    f"step {step}: every candidate that fits {budget:g} MB ran out of memory"
                )
            # probes use the next steps' batches, but never past this domain
            domain_end = (d_index + 1) * s.steps_per_domain
            n_probe = min(s.probe_steps, domain_end - step) if len(cands) > 1 else 0
            if n_probe == 0:  # nothing to compare: the planner's best, no probe
                cands = cands[:1]
            beyond = self._beyond_margin(budget, cands[0], tried) if n_probe >= 2 else None
            probe_x, probe_y = self.stream.probe_set(d_index)
            before = self._probe_scores(self.trainer.model, probe_x, probe_y)
            results = []
            for cand in [beyond, *cands] if beyond else cands:
                tried.add(cand.spec)
                results.append(
                    self._probe(
                        cand, step, n_probe, budget, before, probe_x, probe_y, cand is beyond
                    )
                )
            ok = [r for r in results if r["ok"]]
            if ok:
                break
            self.plans.append(self._plan_record(step, budget, reason, results, None))
            reason = "fallback after out-of-memory probes"
        best = self._select(ok, len(probe_y))
        self.trainer = best.pop("trainer")
        for r in results:
            r.pop("trainer", None)
        self.plans.append(self._plan_record(step, budget, reason, results, best["config"]))
        # the winner's probe steps are training steps of the stream
        for k, rec in enumerate(best["records"]):
            self._record(step + k, budget, rec[0], rec[1], rec[2], "probe")
            bar.update()
        return step + n_probe

    def _beyond_margin(
        self, budget: float, first: Candidate, exclude: set[str]
    ) -> Candidate | None:
        """The most accurate candidate that only the safety margin rules out: predicted
        under ``budget`` itself and ranked above the plan's ``first`` choice (None if none)."""
        if not self.s.probe_beyond_margin:
            return None
        t0 = time.perf_counter()
        try:  # the predictions are cached: this is a sort
            loose = plan(self.cg, budget, self.predictor, space=self.space, margin=0.0,
                         strict=False)  # fmt: skip
        except PlanError:
            return None
        finally:
            self.planning_seconds += time.perf_counter() - t0
        margin = self.plan_result.margin
        for c in loose.feasible:  # ranked best first
            if c.sort_key() >= first.sort_key():
                return None
            skip = c.spec in exclude or c.spec in self.broken or c.spec in self.beyond_failed
            if not skip and c.peak_bytes * (1 + margin) > budget * MB:
                return c
        return None

    def _select(self, ok: list[dict[str, Any]], n_images: int) -> dict[str, Any]:
        """The probed candidate to adopt (see the module docstring, step 3)."""
        if self.s.selection == "evidence":
            if len(ok) > 1 and ok[0]["records"]:  # a comparison was made: remember it
                entry: dict[str, Any] = {}
                for r in ok:  # a setting probed twice (beyond the margin too): the first
                    record = {"scores": r["scores"], "correct": r["correct"]}
                    entry.setdefault(r["setting"], {**record, "gain": r["objective_gain"]})
                self.evidence.append(entry)
            return select_probe(ok, self.evidence)
        # The earlier rule: the planner's first choice stays unless a challenger's probe
        # gain beats it by more than the probes' noise (two probe images); among such
        # challengers the highest Aco wins. Aco alone rewards configurations that learn
        # little but fast: on short probes it traded accuracy for speed.
        tolerance = 2.0 / max(n_images, 1) if self.s.mode == "supervised" else 0.02
        incumbent = ok[0]
        challengers = [r for r in ok[1:] if r["gain"] > incumbent["gain"] + tolerance]
        return max(challengers, key=lambda r: r["aco"]) if challengers else incumbent

    def _probe_scores(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """The probe set seen by ``model`` (eval mode): ``metric`` (higher is better:
        accuracy, or minus the mean entropy for Tent), per-image ``scores`` (minus the
        cross-entropy, or minus the entropy) and per-image ``correct`` (None for Tent)."""
        was = model.training
        model.eval()
        try:
            logits = logits_of(model, x).float()
        finally:
            model.train(was)
        logp = logits.log_softmax(1)
        if self.s.mode == "tent":
            scores = (logp.exp() * logp).sum(1)  # minus the entropy of each prediction
            return {"metric": float(scores.mean()), "scores": scores.numpy(), "correct": None}
        target = torch.as_tensor(np.array(y, dtype=np.int64))  # a copy: y may be read-only
        scores = logp.gather(1, target[:, None])[:, 0]
        correct = (logits.argmax(1) == target).numpy()
        return {"metric": float(correct.mean()), "scores": scores.numpy(), "correct": correct}

    def _probe(
        self,
        cand: Candidate,
        step: int,
        n_probe: int,
        budget: float,
        before: dict[str, Any],
        probe_x: np.ndarray,
        probe_y: np.ndarray,
        beyond_margin: bool = False,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.trainer.model) if n_probe else self.trainer.model
        trainer = Trainer.make(
            model, cand.config, self.s.mode, self.s.learning_rate, cand.peak_bytes
        )
        carried = self.s.optimizer_state == "keep" and carry_optimizer_state(self.trainer, trainer)
        records: list[tuple[float, int, float]] = []
        out: dict[str, Any] = {
            "config": cand.spec,
            "predicted_peak_bytes": cand.peak_bytes,
            "rule": cand.rule,
            "prior": cand.accuracy,
            "setting": setting_key(cand.config),
            "beyond_margin": beyond_margin,
            "optimizer_state_kept": carried,
        }
        try:
            for k in range(n_probe):
                x, y = self.stream.batch(step + k)
                records.append(trainer.step(x, y, self._limit(budget)))
        except DeviceOutOfMemory as oom:
            self.ooms += 1
            if beyond_margin:  # it knowingly went inside the margin: not a prediction miss
                self.beyond_failed.add(cand.spec)
            else:
                self._widen_margin(oom, cand.peak_bytes)
            self.probe_seconds += time.perf_counter() - t0
            return {**out, "ok": False, "oom_at_bytes": oom.live_bytes, "aco": -math.inf}
        except (RuntimeError, ValueError) as exc:  # the model cannot train this config
            self.broken[cand.spec] = _first_line(exc)
            self.probe_seconds += time.perf_counter() - t0
            return {**out, "ok": False, "error": self.broken[cand.spec], "aco": -math.inf}
        train_s = sum(r[2] for r in records)
        after = self._probe_scores(model, probe_x, probe_y) if n_probe else before
        gain = after["metric"] - before["metric"]
        objective_gain = float(np.mean(after["scores"]) - np.mean(before["scores"]))
        self.probe_seconds += time.perf_counter() - t0 - train_s
        return {
            **out,
            "ok": True,
            "gain": gain,
            "objective_gain": objective_gain,
            "train_seconds": round(train_s, 4),
            # MPOptimizer's Aco: probe accuracy (Tent: minus entropy) gained per second,
            # and the same for the per-image objective (finer: 100 probe images move
            # accuracy in steps of 0.01)
            "aco": gain / train_s if train_s > 0 else 0.0,
            "aco_objective": objective_gain / train_s if train_s > 0 else 0.0,
            "scores": [round(float(v), 5) for v in after["scores"]],
            "correct": None if after["correct"] is None else [bool(v) for v in after["correct"]],
            "measured_peak_bytes": max((r[1] for r in records), default=None),
            "records": records,
            "trainer": trainer,
        }

    def _plan_record(
        self, step: int, budget: float, reason: str, results: list[dict[str, Any]], chosen: Any
    ) -> dict[str, Any]:
        p = self.plan_result
        return {
            "step": step,
            "domain": self.stream.domain_at(step).name,
            "reason": reason,
            "budget_mb": budget,
            "margin": p.margin,
            "n_candidates": p.n_candidates,
            "n_feasible": p.n_feasible,
            "planning_seconds": p.planning_seconds,
            "explanation": p.explanation(),
            "probed": [
                {k: v for k, v in r.items() if k not in ("records", "trainer", "scores", "correct")}
                for r in results
            ],
            "chosen": chosen,
        }

    def _report(self, seconds: float) -> dict[str, Any]:
        measured = [r for r in self.steps if r.measured_peak_bytes is not None]
        completed = [r for r in measured if r.event != "oom-fallback"]
        violations = [r for r in completed if r.measured_peak_bytes > r.budget_mb * MB]
        errors = [
            r.measured_peak_bytes / r.predicted_peak_bytes - 1
            for r in completed
            if r.predicted_peak_bytes
        ]
        after = [d["acc_after"] for d in self.domains if "acc_after" in d]
        return {
            "settings": {**asdict(self.s), "learning_rate": self.s.learning_rate},
            "stream": self.stream.describe(),
            "predictor": self.predictor_name,
            "pretrained": self.pretrain,
            "domains": self.domains,
            "mean_accuracy_after": float(np.mean(after)) if after else None,
            "mean_accuracy_before": float(np.mean([d["acc_before"] for d in self.domains])),
            "steps": [asdict(r) for r in self.steps],
            "plans": self.plans,
            "configs_chosen": [p["chosen"] for p in self.plans if p["chosen"]],
            "budget_violations": len(violations),
            "out_of_memory_fallbacks": self.ooms,
            "drift_events": self.drift_events,
            "drift_detection": self._drift_summary(),
            "configs_that_failed": self.broken,
            "max_peak_over_budget": max(
                (r.measured_peak_bytes / (r.budget_mb * MB) for r in completed), default=None
            ),
            "prediction_error": {
                "median": float(np.median(errors)) if errors else None,
                "max": float(np.max(errors)) if errors else None,
            },
            "planning_seconds": round(self.planning_seconds, 4),
            "probe_overhead_seconds": round(self.probe_seconds, 4),
            "train_seconds": round(sum(r.seconds for r in self.steps), 4),
            "wall_seconds": round(seconds, 2),
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _short(config: MConfig) -> str:
    parts = [f"mb{config.mb}"]
    if config.freeze:
        parts.append(f"f{config.freeze:g}")
    if config.ckpt:
        parts.append(f"ck{config.ckpt}")
    if config.method != "full":
        parts.append(config.method)
    if config.prec != "fp32":
        parts.append(config.prec)
    return ",".join(parts)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# -- the plot ------------------------------------------------------------------------


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Accuracy per domain, peak memory per step against the budget, and config changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), height_ratios=(1, 1.3))
    doms = report["domains"]
    xs = np.arange(len(doms))
    ax1.bar(xs - 0.2, [d["acc_before"] for d in doms], 0.4, label="on arrival")
    ax1.bar(xs + 0.2, [d.get("acc_after", np.nan) for d in doms], 0.4, label="after adapting")
    ax1.set_xticks(xs, [d["domain"] for d in doms], rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("test accuracy")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    s = report["settings"]
    ax1.set_title(f"{s['model']} on {s['stream']} ({s['mode']})")
    steps = [r for r in report["steps"] if r["measured_peak_bytes"] is not None]
    ok = [r for r in steps if r["event"] != "oom-fallback"]
    oom = [r for r in steps if r["event"] == "oom-fallback"]
    ax2.plot([r["step"] for r in ok], [r["measured_peak_bytes"] / MB for r in ok], ".",
             label="measured peak")  # fmt: skip
    pred = [r for r in ok if r["predicted_peak_bytes"]]
    ax2.plot([r["step"] for r in pred], [r["predicted_peak_bytes"] / MB for r in pred], "x",
             alpha=0.5, label="predicted peak")  # fmt: skip
    if oom:
        ax2.plot([r["step"] for r in oom], [r["measured_peak_bytes"] / MB for r in oom], "rv",
                 label="out of memory → fallback")  # fmt: skip
    sched = s["budget_schedule"]
    n = len(report["steps"]) and max(r["step"] for r in report["steps"]) + 1
    bx, by = [], []
    for i, (start, mb) in enumerate(sched):
        stop = sched[i + 1][0] if i + 1 < len(sched) else n
        bx += [start, stop]
        by += [mb, mb]
    ax2.plot(bx, by, "k-", lw=1.5, label="budget")
    last = None
    for r in report["steps"]:
        if r["config"] != last:
            ax2.axvline(r["step"], color="grey", lw=0.5, ls=":")
            ax2.text(r["step"], ax2.get_ylim()[1] * 0.02 + 1, _short(MConfig.parse(r["config"])),
                     rotation=90, fontsize=6, va="bottom")  # fmt: skip
            last = r["config"]
    ax2.set_xlabel("step")
    ax2.set_ylabel("MB (MiB)")
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- the command -----------------------------------------------------------------------


def run_from_args(args: Any) -> int:
    """``aiop retrain``: resolve the predictor, run the loop, print the report."""
    from aiop.cli import emit, format_table, human_bytes
    from aiop.mpopt.cli import resolve_predictor
    from aiop.tasks.streams import get_stream

    get_stream(args.stream)  # unknown stream: a clear error before anything heavy
    schedule = parse_budget_schedule(args.budget_schedule, args.budget_mb)
    if not args.model.startswith(("zoo:", "family:")):
        raise RetrainError(
            f"--model must be zoo:NAME or family:FAMILY:SEED (a model aiop can train), "
            f"got {args.model!r}"
        )
    predictor, source = resolve_predictor(args.predictor, args.fallback_predictor)
    settings = RetrainSettings(
        model=args.model,
        stream=args.stream,
        budget_mb=args.budget_mb,
        budget_schedule=schedule,
        mode=args.mode,
        batch_size=args.batch_size,
        resolution=args.resolution,
        steps_per_domain=args.steps_per_domain,
        top_k=args.top_k,
        seed=args.seed,
        drift=args.drift,
        drift_threshold=args.drift_threshold,
        probe_beyond_margin=not args.no_probe_beyond_margin,
        selection=args.selection,
        optimizer_state=getattr(args, "optimizer_state", "reset"),
    )
    loop = RetrainLoop(
        settings,
        predictor,
        args.out,
        progress=not args.no_progress,
        predictor_name=source,
        resume=args.resume,
    )
    report = loop.run()

    def text() -> str:
        rows = [
            {
                "domain": d["domain"],
                "acc on arrival": f"{d['acc_before']:.3f}",
                "acc after": f"{d.get('acc_after', float('nan')):.3f}",
                "configs": "; ".join(d["configs"]),
            }
            for d in report["domains"]
        ]
        peaks = [r["measured_peak_bytes"] for r in report["steps"] if r["measured_peak_bytes"]]
        tail = [
            f"mean accuracy {report['mean_accuracy_before']:.3f} on arrival → "
            f"{report['mean_accuracy_after']:.3f} after adapting",
            f"max measured peak {human_bytes(max(peaks)) if peaks else '-'}; budget violations "
            f"{report['budget_violations']}; out-of-memory fallbacks "
            f"{report['out_of_memory_fallbacks']}",
            f"planning {report['planning_seconds']:.2f} s, "
            f"probes {report['probe_overhead_seconds']:.1f} s, "
            f"training {report['train_seconds']:.1f} s, wall {report['wall_seconds']:.0f} s",
            f"report: {Path(args.out) / 'report.json'}; plot: {report.get('plot', '-')}",
        ]
        return format_table(rows) + "\n\n" + "\n".join(tail)

    emit(args, report, text)
    return 0


RunHook = Callable[[RetrainLoop], None]
