"""What the predictor sees of one (graph, m-configuration) pair.

* the PyG graph of :func:`aiop.cg.to_pyg` with the configuration's node flags
  (trainable, recomputed); graphs that differ only in their configuration's
  batch-like fields share this part, so it is encoded once per *structural*
  key (:func:`structural_key`);
* the configuration vector :meth:`MConfig.as_vector`;
* the analytic features: the log of every term of the analytic memory model
  and of the step's FLOPs (:data:`ANALYTIC_NAMES`).

Memory is learned as a correction of the analytic estimate: the memory head
predicts ``log(measured / analytic)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from aiop.cg.graph import ComputeGraph
from aiop.cg.pyg import FLAG_FEATURES, NUM_NODE_FEATURES, to_pyg
from aiop.mconfig import MConfig
from aiop.predictor.analytic import MemoryEstimate, estimate_memory, structural_key

ANALYTIC_NAMES: tuple[str, ...] = (
    "log_peak",
    "log_params",
    "log_grads",
    "log_optimizer",
    "log_activations",
    "log_temporary",
    "log_inputs",
    "log_step_flops",
    "trainable_fraction",
)


def step_flops(forward_flops: float, config: MConfig, trainable_fraction: float) -> float:
    """Approximate FLOPs of one training step from the forward FLOPs of one sample: forward,
    plus backward for activations (where anything upstream trains) and weights (trainable
    share)."""
    forward = forward_flops * config.batch_size
    return forward * (1.0 + (1.0 if trainable_fraction > 0 else 0.0) + trainable_fraction)


def _log(v: float) -> float:
    return math.log(max(float(v), 1.0))


def analytic_features(
    cg: ComputeGraph,
    config: MConfig,
    estimate: MemoryEstimate,
    totals: tuple[int, int] | None = None,
) -> list[float]:
    """The :data:`ANALYTIC_NAMES` features; ``totals`` = (params, FLOPs) of ``cg`` if known."""
    params, flops = totals if totals is not None else (cg.total_params, cg.total_flops)
    frac = estimate.trainable_params / max(params, 1)
    return [
        _log(estimate.peak_memory_bytes),
        _log(estimate.params),
        _log(estimate.grads),
        _log(estimate.optimizer),
        _log(estimate.activations),
        _log(estimate.temporary),
        _log(estimate.inputs),
        _log(step_flops(flops, config, frac)),
        frac,
    ]


class GraphFeaturizer:
    """Caches PyG graphs per (graph, structural key) and analytic estimates per config."""

    def __init__(self, maxsize: int = 4096) -> None:
        self._pyg = lru_cache(maxsize=maxsize)(self._pyg_uncached)
        self._graphs: dict[str, ComputeGraph] = {}
        self._base: dict[str, object] = {}  # flag-free PyG graph per fingerprint

    def _pyg_uncached(self, fingerprint: str, key: tuple):
        cg = self._graphs[fingerprint]
        base = self._base.get(fingerprint)
        if base is None:
            base = self._base[fingerprint] = to_pyg(cg)
            del base.config  # the batch of configs is fed to the heads separately
        freeze, ckpt, method = key
        flags = MConfig(batch_size=1, freeze=freeze, ckpt=ckpt, method=method).node_flags(cg)
        data = base.clone()
        start = NUM_NODE_FEATURES - len(FLAG_FEATURES)
        for k, name in enumerate(FLAG_FEATURES):
            data.x[:, start + k] = torch.tensor(flags[name], dtype=torch.float32)
        return data

    def pyg(self, cg: ComputeGraph, config: MConfig):
        fp = cg.meta.get("fp") or cg.fingerprint
        self._graphs.setdefault(fp, cg)
        return self._pyg(fp, structural_key(config))

    def analytic(self, cg: ComputeGraph, config: MConfig) -> tuple[MemoryEstimate, list[float]]:
        estimate = estimate_memory(cg, config)
        return estimate, analytic_features(cg, config, estimate)
