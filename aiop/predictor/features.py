"""What the predictor sees of one (graph, m-configuration) pair.

* the PyG graph of :func:`aiop.cg.to_pyg` with the configuration's node flags
  (trainable, recomputed); graphs that differ only in their configuration's
  batch-like fields share this part, so it is encoded once per *structural*
  key (:func:`structural_key`);
* the configuration vector :meth:`MConfig.as_vector`;
* the analytic features: the log of every term of the analytic memory model,
  of the step's FLOPs and of the analytic step latency (:data:`ANALYTIC_NAMES`).

Memory is learned as a correction of the analytic estimate: the memory head
predicts ``log(measured / analytic)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from aiop.cg.graph import ComputeGraph
from aiop.cg.pyg import FLAG_FEATURES, NUM_NODE_FEATURES, to_pyg
from aiop.mconfig import MConfig
from aiop.mconfig.config import node_blocks
from aiop.predictor.analytic import MemoryEstimate, PlanCache, estimate_memory, structural_key

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
    "log_latency_analytic",
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
    latency_s: float = 0.0,
) -> list[float]:
    """The :data:`ANALYTIC_NAMES` features; ``totals`` = (params, FLOPs) of ``cg`` if known,
    ``latency_s`` the analytic step latency (0 when the predictor has no latency model)."""
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
        math.log(latency_s) if latency_s > 0 else 0.0,
    ]


class GraphFeaturizer:
    """Caches PyG graphs per (graph, structural key), bounded for long-running servers.

    At most ``max_graphs`` graphs are kept (least recently used out), and at most
    ``maxsize`` PyG variants over all of them.
    """

    def __init__(self, maxsize: int = 4096, max_graphs: int = 64) -> None:
        self.maxsize = maxsize
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[str, ComputeGraph] = OrderedDict()
        self._base: dict[str, Any] = {}  # flag-free PyG graph per fingerprint
        self._blocks: dict[str, list[int | None]] = {}  # node_blocks per fingerprint
        self._variants: OrderedDict[tuple[str, tuple], Any] = OrderedDict()

    def _variant(
        self, fingerprint: str, key: tuple, flags: dict[str, list[bool]] | None = None
    ) -> Any:
        cg = self._graphs[fingerprint]
        base = self._base.get(fingerprint)
        if base is None:
            base = self._base[fingerprint] = to_pyg(cg)
            del base.config  # the batch of configs is fed to the heads separately
        if flags is None:
            freeze, ckpt, method = key
            blocks = self._blocks.get(fingerprint)
            if blocks is None:
                blocks = self._blocks[fingerprint] = node_blocks(cg)
            config = MConfig(batch_size=1, freeze=freeze, ckpt=ckpt, method=method)
            flags = config.node_flags(cg, blocks=blocks)
        data = base.clone()
        start = NUM_NODE_FEATURES - len(FLAG_FEATURES)
        for k, name in enumerate(FLAG_FEATURES):
            data.x[:, start + k] = torch.tensor(flags[name], dtype=torch.float32)
        return data

    def _remember(self, fingerprint: str, cg: ComputeGraph) -> None:
        if fingerprint in self._graphs:
            self._graphs.move_to_end(fingerprint)
            return
        self._graphs[fingerprint] = cg
        while len(self._graphs) > self.max_graphs:
            old, _ = self._graphs.popitem(last=False)
            self._base.pop(old, None)
            self._blocks.pop(old, None)
            for k in [k for k in self._variants if k[0] == old]:
                del self._variants[k]

    def pyg(self, cg: ComputeGraph, config: MConfig, plans: PlanCache | None = None) -> Any:
        """The PyG graph of ``cg`` with ``config``'s node flags (cached); ``plans``, the
        analytic model's :class:`PlanCache` of ``cg``, shares its node plan (computed once
        per structural key for both)."""
        fp = cg.meta.get("fp") or cg.fingerprint
        self._remember(fp, cg)
        key = (fp, structural_key(config))
        data = self._variants.get(key)
        if data is None:
            flags = plans.node_flags(config) if plans is not None else None
            data = self._variants[key] = self._variant(*key, flags)
            while len(self._variants) > self.maxsize:
                self._variants.popitem(last=False)
        else:
            self._variants.move_to_end(key)
        return data

    def analytic(
        self,
        cg: ComputeGraph,
        config: MConfig,
        plans: PlanCache | None = None,
        latency_s: float = 0.0,
    ) -> tuple[MemoryEstimate, list[float]]:
        estimate = estimate_memory(cg, config, plans)
        totals = (plans.total_params, plans.total_flops) if plans is not None else None
        return estimate, analytic_features(cg, config, estimate, totals, latency_s)
