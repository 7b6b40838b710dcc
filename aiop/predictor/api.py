"""``Predictor``: fit on measured samples, predict many configurations of a graph, save/load.

Targets and how they are learned:

* ``memory`` — peak training memory (bytes): the analytic estimate times
  ``exp(correction)``; the head learns the log-ratio ``log(measured/analytic)``
  (``stand``-normalised);
* ``latency`` — seconds per optimizer step (all micro-batches): the kernel-level
  step cost of :mod:`aiop.predictor.latency` (the sum of the kernels the step runs,
  each priced by the device's kernel regressors of :mod:`aiop.predictor.kernels`,
  under a few constants fitted on the training labels; ``latency_kind="terms"``:
  the older 30-term analytic model), stored in the file, times ``exp(correction)``,
  the head learning ``log(measured/analytic)`` (``stand``); without the analytic model
  (``analytic=False``, AIO-P's setting) the head predicts it (``log``);
* ``flops`` — forward FLOPs per sample (``log``); the CG's own count is exact
  and is what :meth:`Predictor.predict` reports, the head's value is kept as
  ``flops_predicted`` for comparison with AIO-P's setting;
* ``acc:<task>`` — a task metric (``stand`` or ``stand_flops``, AIO-P's
  ``-tar_norm``). With ``acc_head="forest"`` or ``"ridge"`` a regressor on the graph's
  block readout (:mod:`aiop.predictor.blocks`, :mod:`aiop.predictor.forest`,
  :mod:`aiop.predictor.linear`) answers it instead of the network's head; ``"auto"``
  picks one of the two per family by cross-validation (:mod:`aiop.predictor.acc_heads`).
  Fitted on every labelled graph, refitted on the union when fine-tuned.

The file format is one ``.safetensors`` file: the weights, plus JSON metadata
naming the format, the CG feature version, the GNN spec, the normalisers and
the validation error quantiles; an accuracy readout head's arrays (a forest's trees, a
ridge's coefficients, and the rows it was fitted on, so a fine-tune can refit on their
union) are more tensors in the same file. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiop import __version__
from aiop.cg.graph import ComputeGraph
from aiop.cg.pyg import FEATURE_VERSION, NUM_NODE_FEATURES
from aiop.cg.vocab import OP_VOCAB
from aiop.mconfig import MConfig
from aiop.mconfig.config import VECTOR_NAMES
from aiop.predictor.acc_heads import (
    ACC_HEADS,
    READOUT_HEADS,
    ReadoutHead,
    ReadoutHeadError,
    TargetReadout,
    fit_head,
    fit_target_readout,
)
from aiop.predictor.analytic import PlanCache, estimate_memory, structural_key
from aiop.predictor.blocks import READOUT_NAMES, READOUT_VERSION, block_readout
from aiop.predictor.features import ANALYTIC_NAMES, GraphFeaturizer, analytic_features
from aiop.predictor.forest import DEFAULT_FOREST_KIND, FOREST_KINDS
from aiop.predictor.kernels import DEFAULT_KERNEL_MODEL, KernelModel, KernelModelError
from aiop.predictor.latency import (
    HALF_PRECISIONS,
    KernelLatencyModel,
    LatencyError,
    LatencyModel,
    fit_kernel_latency,
    fit_latency_constants,
    kernel_parts,
    latency_model_from_dict,
    latency_terms,
    term_parts,
)
from aiop.predictor.model import GNNSpec, PerformanceGNN
from aiop.predictor.normalize import Normalizer
from aiop.predictor.share import (
    AccShare,
    check_acc_share,
    choose_share,
    share_for,
    shared_labels,
)

log = logging.getLogger(__name__)

FORMAT = "aiop-predictor"
FORMAT_VERSION = 1
# Graphs whose analytic-model cache a predictor keeps (a server sees many graphs).
PLAN_CACHE_GRAPHS = 32


class PredictorError(ValueError):
    """A predictor file is unusable, or a predictor was asked what it cannot answer."""


@dataclass
class Sample:
    """One measured (graph, configuration) pair; ``labels`` maps target → value."""

    cg: ComputeGraph
    config: MConfig
    labels: dict[str, float]
    family: str = ""


@dataclass
class FitReport:
    epochs: int
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


# One batch's loss from the indices of its samples (None: nothing labelled in it, no step).
BatchLoss = Callable[[list[int]], torch.Tensor | None]


def train_epochs(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batch_loss: BatchLoss,
    n: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    seed_torch: bool = True,
    stop: int | None = None,
    on_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "fit",
) -> FitReport:
    """The training loop of every predictor (:meth:`Predictor.fit`, the fine-tunes and fits of
    :mod:`aiop.predictor.train`, the K-adapters): Adam on ``params`` with a cosine schedule
    over ``epochs``, gradients clipped to ``grad_clip``, ``n`` samples shuffled each epoch by
    ``random.Random(seed)`` into batches of ``batch_size`` whose loss ``batch_loss`` gives.

    Every other parameter of ``model`` is frozen meanwhile (its ``requires_grad`` flag is
    restored afterwards). ``seed_torch``: seed torch's generator (dropout) with ``seed`` first;
    :meth:`Predictor.fit` seeds it before building the network instead, so that the initial
    weights and the training draw from one stream. ``stop``: end after that many epochs of
    the ``epochs``-long schedule (early stopping); ``on_epoch(e)`` runs with the model in eval
    mode before the first epoch (``e = 0``) and after each. The report's ``train_loss`` is each
    epoch's sample-weighted mean batch loss; ``model`` is left in eval mode. A non-finite
    epoch loss raises :class:`PredictorError` (training diverged) instead of leaving NaN
    weights behind.
    """
    from tqdm import tqdm

    stop = epochs if stop is None else stop
    train_ids = {id(p) for p in params}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
    report = FitReport(epochs=stop)
    t0 = time.perf_counter()
    try:
        if seed_torch:
            torch.manual_seed(seed)
        rng = random.Random(seed)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        order = list(range(n))
        if on_epoch is not None:
            on_epoch(0)
        bar = tqdm(range(1, stop + 1), desc=desc, disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            rng.shuffle(order)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = batch_loss(idx)
                if loss is None:
                    continue
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            sched.step()
            report.train_loss.append(total / max(count, 1))
            if not math.isfinite(report.train_loss[-1]):
                # NaN weights would predict NaN everywhere without a word: stop and say why
                raise PredictorError(
                    f"training diverged: loss {report.train_loss[-1]} in epoch {epoch} at "
                    f"learning rate {lr:g}; lower the learning rate"
                )
            bar.set_postfix(loss=f"{report.train_loss[-1]:.4f}")
            model.eval()
            if on_epoch is not None:
                on_epoch(epoch)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.eval()
    report.seconds = time.perf_counter() - t0
    return report


def file_header(fmt: str) -> dict[str, str]:
    """The metadata every predictor file starts with: its format and the CG feature version."""
    return {
        "format": fmt,
        "format_version": str(FORMAT_VERSION),
        "feature_version": str(FEATURE_VERSION),
        "aiop_version": __version__,
    }


def write_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a state dict and string metadata as safetensors, atomically (no pickle)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_weights(path: Path, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_weights`, checking its format and feature version."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PredictorError(f"no such predictor file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PredictorError(f"{path}: not a predictor file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != fmt:
        raise PredictorError(
            f"{path}: not an aiop predictor file of format {fmt!r} (found {meta.get('format')!r})"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise PredictorError(
            f"{path}: predictor format {meta.get('format_version')} is not supported "
            f"(this aiop reads {FORMAT_VERSION})"
        )
    if meta.get("feature_version") != str(FEATURE_VERSION):
        raise PredictorError(
            f"{path}: trained on CG feature version {meta.get('feature_version')}, this aiop "
            f"featurises graphs with version {FEATURE_VERSION}: retrain the predictor"
        )
    return meta, state


def _default_norm(target: str, tar_norm: str, ratio: bool = True) -> str:
    """``ratio``: the target is learned as a log-ratio to an analytic estimate."""
    if target in ("memory", "latency") and ratio:
        return "stand"  # applied to the log-ratio
    if target in ("memory", "latency", "flops"):
        return "log"
    return tar_norm


class Predictor:
    """Predicts memory, latency, FLOPs and task metrics of training configurations.

    The constructor only stores settings (scikit-learn style); :meth:`fit`
    builds and trains the network.
    """

    def __init__(
        self,
        spec: GNNSpec | None = None,
        targets: Sequence[str] = ("memory", "latency", "flops"),
        tar_norm: str = "stand",
        epochs: int = 60,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        grad_clip: float = 5.0,
        seed: int = 0,
        progress: bool = True,
        analytic: bool = True,
        latency_kind: str = "kernels",
        kernel_model: KernelModel | str | Path | None = None,
        acc_head: str = "gnn",
        forest_kind: str = DEFAULT_FOREST_KIND,
        forest_trees: int = 200,
        acc_share: AccShare = 0.0,
    ) -> None:
        self.spec = spec
        if acc_head not in ACC_HEADS:
            raise PredictorError(f"acc_head must be one of {ACC_HEADS}, got {acc_head!r}")
        if forest_kind not in FOREST_KINDS:
            raise PredictorError(f"forest_kind must be one of {FOREST_KINDS}, got {forest_kind!r}")
        if forest_trees < 1:
            raise PredictorError(f"forest_trees must be positive, got {forest_trees}")
        # "gnn": the network's heads predict accuracy (AIO-P); "forest" / "ridge": a regressor
        # on the graph's block readout does (the network still learns every target); "auto":
        # whichever of the two cross-validates better, per family (acc_heads.choose_heads)
        self.acc_head = acc_head
        self.forest_kind = forest_kind
        self.forest_trees = forest_trees
        # cross-task label sharing (aiop.predictor.share): a weight ≥ 0, "cv" to pick one per
        # task, or TASK=WEIGHT pairs; acc_share_chosen records what each task's readout head used
        try:
            self.acc_share = check_acc_share(acc_share)
        except ValueError as exc:
            raise PredictorError(str(exc)) from None
        self.acc_share_chosen: dict[str, float] = {}
        self.acc_readouts: dict[str, TargetReadout] = {}
        if latency_kind not in ("kernels", "terms"):
            raise PredictorError(f"latency_kind must be kernels or terms, got {latency_kind!r}")
        # "kernels": step latency as the sum of the device's kernel times (the default);
        # "terms": the 30-term analytic model (the ablation). ``kernel_model``: a fitted
        # :class:`KernelModel` or its JSON file (default: this CPU's, in the repository)
        self.latency_kind = latency_kind
        self.kernel_model = kernel_model
        # False: AIO-P's setting, the heads see no analytic estimate and predict the
        # targets themselves (the ablation baseline)
        self.analytic = analytic
        self.latency_model: LatencyModel | KernelLatencyModel | None = None
        self.targets = list(targets)
        self.tar_norm = tar_norm
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.seed = seed
        self.progress = progress
        self.model: PerformanceGNN | None = None
        self.normalizers: dict[str, Normalizer] = {}
        self.error_quantiles: dict[str, dict[str, float]] = {}
        self.meta: dict[str, Any] = {}
        self._featurizer = GraphFeaturizer()
        self._plan_caches: OrderedDict[str, PlanCache] = OrderedDict()

    # -- targets -------------------------------------------------------------
    def _ratio(self, target: str) -> bool:
        """Whether ``target`` is learned as a log-ratio to its analytic estimate."""
        if not self.analytic:
            return False
        return target == "memory" or (target == "latency" and self.latency_model is not None)

    def _raw_target(self, target: str, sample: Sample, ref: dict[str, float]) -> float | None:
        value = sample.labels.get(target)
        if value is None or not math.isfinite(value):
            return None
        if self._ratio(target):
            if value <= 0:
                return None
            return math.log(max(value, 1e-12)) - math.log(max(ref[target], 1e-12))
        return float(value)

    def _analytic_latency(self, cache: PlanCache, configs: Sequence[MConfig]) -> np.ndarray:
        """Analytic seconds per step of each config (zeros without a latency model)."""
        model = self.latency_model
        if model is None:
            return np.zeros(len(configs))
        if isinstance(model, KernelLatencyModel):
            # seconds per micro-batch and per step of each (structure, micro-batch,
            # precision, optimizer): a config only scales them by its accumulation steps
            parts: dict[tuple, tuple[float, float]] = {}
            out = np.empty(len(configs))
            mbs: dict[str, set[int]] = {}
            fetched: set[tuple[int, str]] = set()
            for c in configs:
                mbs.setdefault(c.prec, set()).add(c.mb)
            for k, c in enumerate(configs):
                key = (structural_key(c), c.mb, c.prec in HALF_PRECISIONS, c.opt)
                ab = parts.get(key)
                if ab is None:
                    plan = cache.latency_plan(c)
                    nk = plan.graph.kernels if plan.graph is not None else None
                    if nk is not None and (id(nk), c.prec) not in fetched:
                        # the graph's kernel times for every micro-batch size at once
                        model.kernels.prefetch(nk, mbs[c.prec], c.prec)
                        fetched.add((id(nk), c.prec))
                    ab = parts[key] = model.coefficients(plan, c)
                out[k] = c.accum_steps * ab[0] + ab[1]
            return out
        theta = np.asarray(model.constants, dtype=np.float64)
        # seconds per sample, per micro-batch and per step of each (structure, precision,
        # optimizer): a config only scales them by its batch size and accumulation steps
        coef: dict[tuple, np.ndarray] = {}
        rows = np.empty((len(configs), 3))
        scale = np.empty((len(configs), 3))
        for k, c in enumerate(configs):
            key = (structural_key(c), c.prec in HALF_PRECISIONS, c.opt)
            v = coef.get(key)
            if v is None:
                v = coef[key] = term_parts(cache.latency_plan(c), key[1], c.opt) @ theta
            rows[k] = v
            scale[k] = (c.batch_size, c.accum_steps, 1.0)
        return np.einsum("ij,ij->i", rows, scale)

    def analytic_latency(self, cg: ComputeGraph, configs: Iterable[MConfig | str]) -> np.ndarray:
        """Seconds per step of each config by the latency model alone (no GNN correction);
        needs :meth:`fit_latency_model` (or a loaded predictor with a latency model)."""
        if self.latency_model is None:
            raise PredictorError("no latency model: fit one on latency labels first")
        parsed = [MConfig.parse(c) for c in configs]
        return self._analytic_latency(self._plan_cache(self._fp(cg), cg), parsed)

    def _kernels(self) -> KernelModel | None:
        """The kernel model latency is built on (loaded once; None: none available)."""
        km = self.kernel_model
        if isinstance(km, KernelModel):
            return km
        path = Path(km) if km is not None else DEFAULT_KERNEL_MODEL
        try:
            self.kernel_model = KernelModel.load(path)
        except KernelModelError as exc:
            if km is not None:  # a file the caller named must be usable
                raise PredictorError(str(exc)) from None
            log.warning("%s: the 30-term latency model is used instead", exc)
            return None
        return self.kernel_model

    def fit_latency_model(
        self, samples: Sequence[Sample]
    ) -> LatencyModel | KernelLatencyModel | None:
        """Fit the latency model on the samples' latency labels: the kernel-level model's
        few constants (``latency_kind="kernels"`` with a kernel model at hand) or the 30-term
        model's device constants (None, and no latency model, with fewer than 3 labels)."""
        kernels = self._kernels() if self.latency_kind == "kernels" else None
        rows, ys = [], []
        for s in samples:
            y = s.labels.get("latency")
            if y is None or not math.isfinite(y) or y <= 0:
                continue
            cache = self._plan_cache(self._fp(s.cg), s.cg)
            plan = cache.latency_plan(s.config)
            if kernels is not None:
                rows.append(kernel_parts(plan, s.config, kernels))
            else:
                rows.append(latency_terms(plan, s.config))
            ys.append(y)
        if len(ys) < 3:
            self.latency_model = None
            return None
        if kernels is not None:
            self.latency_model = fit_kernel_latency(np.stack(rows), np.asarray(ys), kernels)
        else:
            self.latency_model = fit_latency_constants(np.stack(rows), np.asarray(ys))
        return self.latency_model

    @staticmethod
    def _fp(cg: ComputeGraph) -> str:
        fp = cg.meta.get("fp") or cg.fingerprint
        cg.meta["fp"] = fp
        return str(fp)

    # -- featurisation ---------------------------------------------------------
    def _rows(
        self, samples: Sequence[Sample]
    ) -> tuple[list[Any], np.ndarray, np.ndarray, list[dict[str, float]]]:
        """PyG graphs, config vectors, analytic features and, per sample, the analytic
        estimates its ratio targets are taken against (``refs``)."""
        graphs, configs, analytic, refs = [], [], [], []
        for s in samples:
            fp = self._fp(s.cg)
            plans = self._plan_cache(fp, s.cg)
            graphs.append(self._featurizer.pyg(s.cg, s.config, plans))
            latency = float(self._analytic_latency(plans, [s.config])[0])
            estimate, feats = self._featurizer.analytic(s.cg, s.config, plans, latency)
            configs.append(s.config.as_vector())
            analytic.append(feats if self.analytic else [])
            refs.append({"memory": float(estimate.peak_memory_bytes), "latency": latency})
        width = len(ANALYTIC_NAMES) if self.analytic else 0
        return (
            graphs,
            np.asarray(configs, np.float32),
            np.asarray(analytic, np.float32).reshape(len(samples), width),
            refs,
        )

    def _target_matrix(
        self, samples: Sequence[Sample], refs: Sequence[dict[str, float]]
    ) -> np.ndarray:
        """``[samples, targets]`` normalised targets, NaN where a label is missing; fits the
        normaliser of any target that has none yet (on the labelled samples only)."""
        flops = np.asarray([s.cg.total_flops for s in samples], np.float64)
        y = np.full((len(samples), len(self.targets)), np.nan)
        for j, t in enumerate(self.targets):
            raw = [self._raw_target(t, s, r) for s, r in zip(samples, refs)]
            have = np.asarray([v is not None for v in raw])
            values = np.asarray([v if v is not None else 1.0 for v in raw], np.float64)
            if t not in self.normalizers:
                norm = Normalizer(_default_norm(t, self.tar_norm, self._ratio(t)))
                if have.any():
                    norm.fit(values[have], flops[have])
                self.normalizers[t] = norm
            if have.any():
                y[have, j] = self.normalizers[t].transform(values[have], flops[have])
        return y

    def _loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor | None:
        """Sum over targets of the MSE on the labelled rows; None when no row is labelled."""
        losses = []
        for j, t in enumerate(self.targets):
            mask = ~torch.isnan(target[:, j])
            if t in out and mask.any():
                losses.append(torch.mean((out[t][mask] - target[mask, j]) ** 2))
        return torch.stack(losses).sum() if losses else None

    # -- training --------------------------------------------------------------
    def _tensors(
        self, samples: Sequence[Sample]
    ) -> tuple[list[Any], torch.Tensor, torch.Tensor, torch.Tensor]:
        """PyG graphs, config vectors, analytic features and normalised targets (NaN:
        unlabelled) of ``samples``; fits the normaliser of any target that has none yet."""
        graphs, configs, analytic, refs = self._rows(samples)
        y = torch.tensor(self._target_matrix(samples, refs), dtype=torch.float32)
        return graphs, torch.from_numpy(configs), torch.from_numpy(analytic), y

    def _train_epochs(
        self,
        samples: Sequence[Sample],
        epochs: int,
        *,
        stop: int | None = None,
        params: Sequence[torch.nn.Parameter] | None = None,
        loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor, list[int]], Any] | None = None,
        on_epoch: Callable[[int], None] | None = None,
        seed: int | None = None,
        seed_torch: bool = True,
        desc: str = "fit",
    ) -> FitReport:
        """Train the fitted network in place on ``samples`` with :func:`train_epochs` (this
        predictor's batch size, learning rate, weight decay, clipping and, by default, seed).

        ``params``: the parameters to update (default: all); ``loss_fn(out, y, idx)``: a
        batch's loss from the network's outputs, its normalised targets and its sample indices
        (default: :meth:`_loss`, the MSE). See :func:`train_epochs` for the rest.
        """
        model = self._check_fitted()
        from torch_geometric.data import Batch

        graphs, cfg, ana, y = self._tensors(samples)

        def batch_loss(idx: list[int]) -> torch.Tensor | None:
            out = model(Batch.from_data_list([graphs[i] for i in idx]), cfg[idx], ana[idx])
            if loss_fn is None:
                return self._loss(out, y[idx])
            return loss_fn(out, y[idx], idx)

        return train_epochs(
            model,
            list(model.parameters()) if params is None else list(params),
            batch_loss,
            len(samples),
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            seed=self.seed if seed is None else seed,
            seed_torch=seed_torch,
            stop=stop,
            on_epoch=on_epoch,
            progress=self.progress,
            desc=desc,
        )

    def build(self, samples: Sequence[Sample]) -> None:
        """A fresh, untrained network for the targets ``samples`` label, with the latency model
        and every target's normaliser fitted on them. :meth:`fit` is ``build`` and then the
        training; a custom training loop (``fit_predictor``'s ranking loss) starts here."""
        self._build(samples)
        self._tensors(samples)  # fits the normalisers

    def _build(self, samples: Sequence[Sample]) -> None:
        if not samples:
            raise PredictorError("no samples to fit on")
        # seeded here, not by the loop: the initial weights and the training share one stream
        torch.manual_seed(self.seed)
        targets = [t for t in self.targets if any(t in s.labels for s in samples)]
        if not targets:
            raise PredictorError(f"no sample has any of the targets {self.targets}")
        self.targets = targets
        self.latency_model = None
        if self.analytic and "latency" in targets:
            self.fit_latency_model(samples)
        spec = self.spec or GNNSpec()
        spec.targets = list(self.targets)
        spec.config_dim = len(VECTOR_NAMES)
        spec.analytic_dim = len(ANALYTIC_NAMES) if self.analytic else 0
        self.spec = spec
        self.model = PerformanceGNN(spec)
        self.normalizers = {}

    def fit(self, samples: Sequence[Sample], finetune: bool = False) -> FitReport:
        """Train on ``samples`` (or fine-tune an already fitted predictor)."""
        if not samples:
            raise PredictorError("no samples to fit on")
        fresh = not finetune or self.model is None
        if fresh:
            self._build(samples)  # the normalisers are fitted by the first epoch's tensors
        else:
            torch.manual_seed(self.seed)
        report = self._train_epochs(samples, self.epochs, seed_torch=False)
        self.fit_acc_readout(samples, extend=not fresh)
        return report

    # -- the accuracy readout head ------------------------------------------------------
    @staticmethod
    def acc_features(
        cg: ComputeGraph, configs: Sequence[MConfig], readout: np.ndarray | None = None
    ) -> np.ndarray:
        """``[len(configs), readout + config vector]``: what an accuracy readout head reads
        (``readout``: ``cg``'s :func:`block_readout`, when already computed)."""
        readout = block_readout(cg) if readout is None else readout
        return np.stack([np.concatenate([readout, c.as_vector()]) for c in configs])

    def _fit_readout(
        self, kind: str, x: np.ndarray, y: np.ndarray, trees: int | None = None
    ) -> ReadoutHead:
        return fit_head(
            kind, x, y, forest_kind=self.forest_kind, trees=trees or self.forest_trees,
            seed=self.seed,
        )  # fmt: skip

    def fit_acc_readout(self, samples: Sequence[Sample], extend: bool = False) -> None:
        """(Re)fit each accuracy target's readout heads on ``samples`` (with ``extend``: on
        them and the rows fitted before). Does nothing with ``acc_head="gnn"``. With
        ``acc_share`` the labels are first blended across tasks (:mod:`.share`); with
        ``acc_head="auto"`` the head of each family is chosen again on the rows fitted."""
        if self.acc_head not in (*READOUT_HEADS, "auto"):
            return
        acc_targets = [t for t in self.targets if t.startswith("acc:")]
        # target -> graph -> (cg, family, configs, labels)
        graphs: dict[str, dict[int, tuple[ComputeGraph, str, list[MConfig], list[float]]]] = {}
        for t in acc_targets:
            by_graph = graphs.setdefault(t, {})
            for s in samples:
                if t in s.labels and math.isfinite(s.labels[t]):
                    _, _, cfgs, ys = by_graph.setdefault(id(s.cg), (s.cg, s.family, [], []))
                    cfgs.append(s.config)
                    ys.append(float(s.labels[t]))
        shifts = self._shared_label_shifts(graphs)
        for t in acc_targets:
            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            fams: list[str] = []  # each row's family: auto chooses, and routes, by it
            if extend and t in self.acc_readouts:
                before = self.acc_readouts[t]
                xs, ys, fams = [before.rows_x], [before.rows_y], before.row_families
            for g, (cg, family, cfgs, labels) in graphs[t].items():
                xs.append(self.acc_features(cg, cfgs))
                ys.append(np.asarray(labels, dtype=np.float64) + shifts.get(t, {}).get(g, 0.0))
                fams.extend([family] * len(labels))
            if sum(len(y) for y in ys) < 2:
                log.warning("%s: fewer than 2 labelled rows, no accuracy readout head", t)
                continue
            try:
                readout = fit_target_readout(
                    self.acc_head, np.concatenate(xs), np.concatenate(ys), fams,
                    self._fit_readout, n_readout=len(READOUT_NAMES), seed=self.seed,
                    cv_fit=lambda k, x, y: self._fit_readout(k, x, y, min(self.forest_trees, 100)),
                )  # fmt: skip
            except ReadoutHeadError as exc:
                raise PredictorError(f"{t}: {exc}") from None
            if readout.scores:
                log.info(
                    "%s: accuracy head %s, per family %s (fold SRCC %s)",
                    t, readout.default, readout.by_family, readout.scores,
                )  # fmt: skip
            self.acc_readouts[t] = readout

    def acc_head_summary(self) -> dict[str, dict[str, Any]]:
        """target -> the readout head it answers with, per family where ``auto`` chose one,
        and the fold SRCC behind the choice."""
        return {
            t: {k: v for k, v in r.to_json().items() if k not in ("n_features", "families")}
            for t, r in self.acc_readouts.items()
        }

    def _shared_label_shifts(
        self, graphs: dict[str, dict[int, tuple[ComputeGraph, str, list[MConfig], list[float]]]]
    ) -> dict[str, dict[int, float]]:
        """target -> graph -> what cross-task sharing adds to the graph's labels (none at
        ``acc_share=0``). Graphs are matched across targets by ``cg.meta["model"]``; a model
        with two graphs under one target is not shared. The weight ``cv`` is chosen with the
        ridge for ``acc_head="ridge"`` and the forest otherwise."""
        if all(share_for(self.acc_share, t) == 0 for t in graphs) or len(graphs) < 2:
            return {}
        arch: dict[str, dict[str, tuple[str, float]]] = {}
        graph_of: dict[str, dict[str, int]] = {}
        for t, by_graph in graphs.items():
            seen: dict[str, list[int]] = {}
            for g, (cg, _, _, _) in by_graph.items():
                if cg.meta.get("model"):
                    seen.setdefault(str(cg.meta["model"]), []).append(g)
            graph_of[t] = {m: gs[0] for m, gs in seen.items() if len(gs) == 1}
            arch[t] = {
                m: (by_graph[g][1], float(np.mean(by_graph[g][3]))) for m, g in graph_of[t].items()
            }
        shifts: dict[str, dict[int, float]] = {}
        cv_kind = "ridge" if self.acc_head == "ridge" else "forest"
        for t, models in graph_of.items():
            share = share_for(self.acc_share, t)
            if not models or share == 0:
                continue
            if share == "cv":
                rows = {m: self.acc_features(graphs[t][g][0], graphs[t][g][2][:1])[0]
                        for m, g in models.items()}  # fmt: skip

                def fit_predict(train, ys, test, rows=rows):
                    head = self._fit_readout(
                        cv_kind, np.stack([rows[m] for m in train]), np.asarray(ys),
                        min(self.forest_trees, 100),
                    )  # fmt: skip
                    return head.predict(np.stack([rows[m] for m in test]))

                lam, scores = choose_share(arch, t, fit_predict, seed=self.seed)
                log.info("%s: cross-task sharing %.2f (fold SRCC by weight: %s)", t, lam, scores)
            else:
                lam = float(share)
            self.acc_share_chosen[t] = lam
            blended = shared_labels(arch, t, lam)
            shifts[t] = {g: blended[m] - arch[t][m][1] for m, g in models.items()}
        return shifts

    def _readout_accuracy(
        self, cg: ComputeGraph, configs: Sequence[MConfig]
    ) -> dict[str, np.ndarray]:
        """Each readout head's prediction per configuration. A head that does not read the
        configuration vector (accuracy labels measured under one configuration) is asked
        once per graph."""
        if not self.acc_readouts:
            return {}
        readout = block_readout(cg)
        rows: np.ndarray | None = None
        out = {}
        for t, target in self.acc_readouts.items():
            _, head = target.head_for(readout)
            if head.max_feature_used >= len(readout):
                if rows is None:
                    rows = self.acc_features(cg, configs, readout)
                out[t] = head.predict(rows)
            else:
                one = self.acc_features(cg, configs[:1], readout)
                out[t] = np.repeat(head.predict(one), len(configs))
        return out

    def calibrate(self, samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
        """Record relative-error quantiles on held-out ``samples`` (the planner's safety margin)."""
        out: dict[str, dict[str, float]] = {}
        by_graph: dict[str, list[Sample]] = {}
        for s in samples:
            by_graph.setdefault(s.cg.fingerprint, []).append(s)
        errors: dict[str, list[float]] = {}
        for group in by_graph.values():
            preds = self.predict(group[0].cg, [s.config for s in group])
            for s, p in zip(group, preds):
                for t, key in (("memory", "peak_memory_bytes"), ("latency", "latency_s")):
                    if t in s.labels and key in p:
                        errors.setdefault(t, []).append(p[key] / s.labels[t] - 1.0)
        for t, e in errors.items():
            arr = np.asarray(e)
            out[t] = {
                "n": int(arr.size),
                "q50_abs": float(np.quantile(np.abs(arr), 0.5)),
                "q95_abs": float(np.quantile(np.abs(arr), 0.95)),
                "q99_under": float(max(0.0, -np.quantile(arr, 0.01))),
                "max_under": float(max(0.0, -arr.min())),
            }
        self.error_quantiles = out
        return out

    # -- inference ---------------------------------------------------------------
    def clear_caches(self) -> None:
        """Forget every per-graph cache (PyG variants, analytic plans)."""
        self._featurizer = GraphFeaturizer()
        self._plan_caches.clear()

    def _plan_cache(self, fp: str, cg: ComputeGraph) -> PlanCache:
        """The analytic model's per-graph cache, kept for the last few graphs (LRU)."""
        cache = self._plan_caches.get(fp)
        if cache is None:
            cache = self._plan_caches[fp] = PlanCache(cg)
            while len(self._plan_caches) > PLAN_CACHE_GRAPHS:
                self._plan_caches.popitem(last=False)
        else:
            self._plan_caches.move_to_end(fp)
        return cache

    def _check_fitted(self) -> PerformanceGNN:
        if self.model is None:
            raise PredictorError("the predictor is not fitted: call fit() or Predictor.load()")
        return self.model

    @torch.no_grad()
    def predict(self, cg: ComputeGraph, configs: Iterable[MConfig | str]) -> list[dict[str, Any]]:
        """Predictions for every configuration of one graph, in order.

        The graph is encoded once per distinct (freeze, ckpt, method); the
        heads run on all configurations at once.
        """
        model = self._check_fitted()
        configs = [MConfig.parse(c) for c in configs]
        if not configs:
            return []
        from torch_geometric.data import Batch

        unknown = cg.meta.get("unknown_ops") or sorted(
            {n.op for n in cg.nodes if n.op not in OP_VOCAB}
        )
        if unknown:
            log.warning(
                "graph has ops outside the vocabulary (%s): predictions may be off", unknown
            )
        fp = cg.meta.get("fp") or cg.fingerprint
        cg.meta["fp"] = fp
        cache = self._plan_cache(fp, cg)
        for c in configs:
            c.validate_for(cache.n_blocks, cg.name or "the graph")
        latency_an = self._analytic_latency(cache, configs)
        estimates, analytic, vectors = [], [], []
        totals = (cache.total_params, cache.total_flops)
        for c, lat in zip(configs, latency_an.tolist()):
            est = estimate_memory(cg, c, cache)
            estimates.append(est)
            if self.analytic:
                analytic.append(analytic_features(cg, c, est, totals, lat))
            vectors.append(c.as_vector())
        # one PyG graph per distinct node-flag pattern (structural keys that freeze or
        # recompute the same nodes share it; encoding is row-independent, so this changes
        # no bit of the embeddings)
        keys: dict[tuple, int] = {}
        by_flags: dict[tuple, int] = {}
        groups: list[int] = []
        datas = []
        for c in configs:
            key = structural_key(c)
            index = keys.get(key)
            if index is None:
                sig = cache.flags_signature(c)
                index = by_flags.get(sig)
                if index is None:
                    index = by_flags[sig] = len(datas)
                    datas.append(self._featurizer.pyg(cg, c, cache))
                keys[key] = index
            groups.append(index)
        embeddings = model.encode(Batch.from_data_list(datas))
        emb = embeddings[torch.tensor(groups)]
        width = len(ANALYTIC_NAMES) if self.analytic else 0
        out = model.heads_forward(
            emb,
            torch.tensor(vectors, dtype=torch.float32),
            torch.tensor(analytic, dtype=torch.float32).reshape(len(configs), width),
        )
        total_flops, total_params = int(cache.total_flops), int(cache.total_params)
        flops = np.full(len(configs), float(total_flops))
        results: list[dict[str, Any]] = []
        decoded = {
            t: self.normalizers[t].inverse(out[t].numpy().astype(np.float64), flops) for t in out
        }
        readout_acc = self._readout_accuracy(cg, configs)
        for k, (c, est) in enumerate(zip(configs, estimates)):
            r: dict[str, Any] = {"config": c.format()}
            if "memory" in decoded and self._ratio("memory"):
                peak = est.peak_memory_bytes * math.exp(float(decoded["memory"][k]))
            elif "memory" in decoded:
                peak = float(decoded["memory"][k])
            else:
                peak = float(est.peak_memory_bytes)
            r["peak_memory_bytes"] = round(peak)
            r["peak_memory_bytes_analytic"] = int(est.peak_memory_bytes)
            r["breakdown"] = dict(est.breakdown)
            if "latency" in decoded and self._ratio("latency"):
                r["latency_s"] = float(latency_an[k]) * math.exp(float(decoded["latency"][k]))
                r["latency_s_analytic"] = float(latency_an[k])
            elif "latency" in decoded:
                r["latency_s"] = float(decoded["latency"][k])
            r["flops"] = total_flops
            r["params"] = total_params
            r["trainable_params"] = int(est.trainable_params)
            if "flops" in decoded:
                r["flops_predicted"] = float(decoded["flops"][k])
            for t in decoded:
                if t.startswith("acc:"):
                    value = readout_acc[t][k] if t in readout_acc else decoded[t][k]
                    r.setdefault("accuracy", {})[t[4:]] = float(value)
            results.append(r)
        return results

    # -- persistence ------------------------------------------------------------
    def _state_dict_json(self) -> dict[str, Any]:
        """What a predictor file records besides the weights (shared by every kind)."""
        model = self._check_fitted()
        return {
            "spec": model.spec.to_dict(),
            "targets": self.targets,
            "tar_norm": self.tar_norm,
            "normalizers": {t: n.to_dict() for t, n in self.normalizers.items()},
            "error_quantiles": self.error_quantiles,
            "meta": self.meta,
            "analytic": self.analytic,
            "latency_model": self.latency_model.to_dict() if self.latency_model else None,
            "acc_head": {
                "kind": self.acc_head,
                "forest_kind": self.forest_kind,
                "forest_trees": self.forest_trees,
                "share": self.acc_share,
                "share_chosen": self.acc_share_chosen,
                "readout_version": READOUT_VERSION,
                # target -> its heads' kinds, width and families (files before the ridge
                # head wrote "forests": target -> width)
                "readouts": {t: r.to_json() for t, r in self.acc_readouts.items()},
            },
        }

    def _restore_state_json(self, config: dict[str, Any]) -> None:
        """Inverse of :meth:`_state_dict_json` (the weights are loaded separately)."""
        self.spec = GNNSpec.from_dict(config["spec"])
        self.targets = list(config["targets"])
        self.tar_norm = config["tar_norm"]
        self.normalizers = {t: Normalizer.from_dict(d) for t, d in config["normalizers"].items()}
        self.error_quantiles = config.get("error_quantiles", {})
        self.meta = config.get("meta", {})
        self.analytic = bool(config.get("analytic", True))
        latency = config.get("latency_model")
        try:
            self.latency_model = latency_model_from_dict(latency) if latency else None
            if isinstance(self.latency_model, LatencyModel):
                self.latency_kind = "terms"
        except LatencyError as exc:
            raise PredictorError(f"predictor file: {exc}") from None
        head = config.get("acc_head") or {"kind": "gnn"}
        self.acc_head = head["kind"]
        self.forest_kind = head.get("forest_kind", self.forest_kind)
        self.forest_trees = int(head.get("forest_trees", self.forest_trees))
        self.acc_share = check_acc_share(head.get("share", 0.0))
        self.acc_share_chosen = {t: float(v) for t, v in (head.get("share_chosen") or {}).items()}
        if self.acc_head not in ACC_HEADS:
            raise PredictorError(f"unknown accuracy head {self.acc_head!r}")
        if (head.get("readouts") or head.get("forests")) and head.get(
            "readout_version"
        ) != READOUT_VERSION:
            raise PredictorError(
                f"the predictor's accuracy readout heads read block readout version "
                f"{head.get('readout_version')}, this aiop computes {READOUT_VERSION}: retrain it"
            )
        width = len(ANALYTIC_NAMES) if self.analytic else 0
        if self.spec.analytic_dim != width:
            raise PredictorError(
                f"the predictor reads {self.spec.analytic_dim} analytic features, this aiop "
                f"computes {width} ({', '.join(ANALYTIC_NAMES)}): retrain it"
            )

    def save(self, path: str | Path) -> Path:
        model = self._check_fitted()
        path = Path(path)
        meta = {
            **file_header(FORMAT),
            "config": json.dumps(
                {
                    **self._state_dict_json(),
                    "vocabulary": list(OP_VOCAB),
                    "num_node_features": NUM_NODE_FEATURES,
                    "config_vector": list(VECTOR_NAMES),
                    "analytic_features": list(ANALYTIC_NAMES),
                }
            ),
        }
        return write_weights(path, {**model.state_dict(), **self._readout_tensors()}, meta)

    def _readout_tensors(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for t, readout in self.acc_readouts.items():
            state.update(readout.to_tensors(t))
        return state

    def _restore_readouts(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Take the accuracy readout heads' tensors out of ``state`` (the rest is the
        network's)."""
        head = config.get("acc_head") or {}
        readouts = head.get("readouts")
        if readouts is None:  # a file from before the ridge head: forests only
            readouts = {t: {"kind": "forest", "n_features": n}
                        for t, n in (head.get("forests") or {}).items()}  # fmt: skip
        width = len(READOUT_NAMES) + len(VECTOR_NAMES)
        for t, entry in readouts.items():
            if entry["n_features"] != width:
                raise PredictorError(
                    f"accuracy {entry['kind']} {t} reads {entry['n_features']} features, this "
                    f"aiop gives {width}: retrain it"
                )
            try:
                self.acc_readouts[t] = TargetReadout.from_saved(
                    entry, state, t, n_readout=len(READOUT_NAMES)
                )
            except ReadoutHeadError as exc:
                raise PredictorError(f"accuracy {entry['kind']} {t}: {exc}") from None
        for key in [k for k in state if any(k.startswith(f"acc_{r}/") for r in READOUT_HEADS)]:
            del state[key]

    @classmethod
    def load(cls, path: str | Path) -> Predictor:
        path = Path(path)
        meta, state = read_weights(path, FORMAT)
        try:
            config = json.loads(meta["config"])
            spec = GNNSpec.from_dict(config["spec"])
            pred = cls(spec=spec)
            pred._restore_state_json(config)
            if config.get("vocabulary") != list(OP_VOCAB):
                raise PredictorError(f"{path}: op vocabulary differs from this aiop's")
            pred._restore_readouts(config, state)
            model = PerformanceGNN(spec)
            model.load_state_dict(state)
        except PredictorError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise PredictorError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            raise PredictorError(
                f"{path}: corrupt predictor metadata ({str(exc).splitlines()[0]})"
            ) from None
        model.eval()
        pred.model = model
        return pred
