"""``profile``: the ground truth for one (model, m-configuration) pair.

Memory comes from :mod:`aiop.profiler.memory` (``meta``, ``real`` or
``cuda``), FLOPs and parameter counts from thop and the CG
(:mod:`aiop.profiler.flops`), latency from timed real steps
(:mod:`aiop.profiler.latency`; on CPU for ``meta`` and ``real``, on the GPU for
``cuda``).
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import aiop
from aiop.mconfig import MConfig, Plan, prepare
from aiop.mconfig.apply import disable_checkpointing, enable_checkpointing
from aiop.profiler.flops import FlopsCount, count_flops
from aiop.profiler.latency import measure_latency
from aiop.profiler.memory import MODES, ProfilerError, measure_memory

log = logging.getLogger(__name__)

ModelArg = str | Callable[[], nn.Module] | nn.Module


@dataclass
class ProfileResult:
    """Everything measured for one (model, config). Memory in bytes, time in seconds.

    ``flops`` is the forward FLOPs of one sample (batch 1) at ``resolution``,
    2 × MACs (see :mod:`aiop.profiler.flops`). ``breakdown`` holds the live bytes
    per category at the peak (params, buffers, grads, optimizer, activations,
    temporary, inputs; they sum to the tracker's peak). In ``cuda`` mode
    ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` and the
    breakdown (and ``tracker_peak_bytes``) the tracker's view of the same step.
    """

    model: str
    config: str
    mode: str
    device: str
    resolution: int
    peak_memory_bytes: int
    breakdown: dict[str, int]
    tracker_peak_bytes: int
    params: int
    trainable_params: int
    plan: Plan
    micro_batches_run: int
    flops: int | None = None
    flops_thop: int | None = None
    flops_cg: int | None = None
    flops_rel_diff: float | None = None
    params_thop: int | None = None
    params_cg: int | None = None
    flops_cg_error: str | None = None
    latency_s: float | None = None
    latency_samples_s: list[float] | None = None
    cuda: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    tool_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``aiop profile --json`` output)."""
        out: dict[str, Any] = {
            "model": self.model,
            "config": self.config,
            "mode": self.mode,
            "device": self.device,
            "resolution": self.resolution,
            "peak_memory_bytes": self.peak_memory_bytes,
            "breakdown": dict(self.breakdown),
            "tracker_peak_bytes": self.tracker_peak_bytes,
            "flops": self.flops,
            "flops_thop": self.flops_thop,
            "flops_cg": self.flops_cg,
            "flops_rel_diff": self.flops_rel_diff,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "params_thop": self.params_thop,
            "params_cg": self.params_cg,
            "latency_s": self.latency_s,
            "checkpointed_blocks": self.plan.checkpointed_blocks,
            "segments": [list(s) for s in self.plan.segments],
            "frozen_layers": self.plan.n_frozen_units,
            "layers": len(self.plan.units),
            "micro_batches_run": self.micro_batches_run,
            "timings_s": dict(self.timings_s),
            "tool_version": self.tool_version,
        }
        if self.flops_cg_error:
            out["flops_cg_error"] = self.flops_cg_error
        if self.latency_samples_s is not None:
            out["latency_samples_s"] = list(self.latency_samples_s)
        if self.cuda:
            out["cuda"] = dict(self.cuda)
        return out


def tool_version() -> str:
    return f"aiop {aiop.__version__}, torch {torch.__version__}"


def _device_name(mode: str) -> str:
    if mode == "meta":
        return "meta (FakeTensorMode, CPU semantics)"
    if mode == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _fake_copy(module: nn.Module) -> nn.Module:
    """A copy of a real module whose parameters and buffers are fake tensors of the active mode.

    The real weights are never copied: ``deepcopy`` is handed their fake twins
    through its memo.
    """
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = active_fake_mode()
    assert mode is not None
    with unset_fake_temporarily():
        memo: dict[int, Any] = {}
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = mode.from_tensor(b)
        return copy.deepcopy(module, memo)


def resolve_model(
    model: ModelArg, resolution: int | None = None
) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module], str]:
    """(factory for meta mode, factory for real modes, name) of a spec, a factory or a module.

    A spec is built at ``resolution`` when one is given (some architectures,
    e.g. ViT position embeddings, depend on it).
    """
    if isinstance(model, str) and model.lower().endswith((".onnx", ".pb")):
        # a user's file: profiled through the trainable module built from its CG
        from aiop.cg.to_torch import module_factory

        factory = module_factory(model)
        return factory, factory, Path(model).stem
    if isinstance(model, str):
        try:
            from aiop.models import build  # lazily: the zoo sits beside, not below, us
        except ImportError as exc:
            raise ProfilerError(
                f"cannot build {model!r}: aiop.models.build is unavailable"
            ) from exc

        def from_spec() -> nn.Module:
            return build(model, resolution=resolution)

        return from_spec, from_spec, model
    if isinstance(model, nn.Module):
        name = type(model).__name__
        return (lambda: _fake_copy(model)), (lambda: copy.deepcopy(model)), name
    if callable(model):
        name = getattr(model, "__name__", None) or type(model).__name__
        return model, model, name
    raise ProfilerError(
        f"profile() takes a model spec, a factory or a module, not {type(model).__name__}"
    )


def _per_sample_flops(cg: Any) -> tuple[int, int]:
    """(forward FLOPs of one sample, params) of a file's graph, whatever its batch size."""
    batch = cg.inputs[0].shape[0] if cg.inputs and cg.inputs[0].shape else 1
    batch = batch if isinstance(batch, int) and batch > 0 else 1
    return round(cg.total_flops / batch), int(cg.total_params)


def profile(
    model: ModelArg,
    config: MConfig | str,
    mode: str = "meta",
    *,
    latency: bool = False,
    flops: bool = True,
    resolution: int | None = None,
    latency_steps: int = 10,
    latency_warmup: int = 2,
    seed: int = 0,
    name: str | None = None,
    max_micro_batches: int | None = None,
) -> ProfileResult:
    """Profile a model under an m-configuration.

    ``model`` is a spec (``zoo:NAME``, ``family:FAMILY:SEED``, resolved by
    :func:`aiop.models.build`), a factory returning a fresh model (meta mode
    calls it inside ``FakeTensorMode``), or a module (copied, never changed).
    ``config`` is an :class:`MConfig` or a SPEC string. ``flops`` counts FLOPs
    on a real CPU copy (thop and the CG); ``latency`` times ``latency_steps``
    real steps after ``latency_warmup`` (CPU unless ``mode="cuda"``).
    Raises :class:`MConfigError` / :class:`ProfilerError` on bad input.
    """
    if mode not in MODES:
        raise ProfilerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ProfilerError(f"resolution must be a positive integer, got {resolution!r}")
    config = MConfig.parse(config)
    meta_factory, real_factory, default_name = resolve_model(model, resolution)
    name = name or default_name
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    mem = measure_memory(
        meta_factory if mode == "meta" else real_factory,
        config,
        mode,
        resolution=resolution,
        seed=seed,
        name=name,
        max_micro_batches=max_micro_batches,
    )
    timings["memory"] = time.perf_counter() - t0

    result = ProfileResult(
        model=name,
        config=config.format(),
        mode=mode,
        device=_device_name(mode),
        resolution=mem.resolution,
        peak_memory_bytes=mem.peak_bytes,
        breakdown=mem.breakdown,
        tracker_peak_bytes=mem.tracker_peak_bytes,
        params=mem.params,
        trainable_params=mem.trainable_params,
        plan=mem.plan,
        micro_batches_run=mem.micro_batches_run,
        cuda=mem.cuda,
        tool_version=tool_version(),
    )
    if flops or latency:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        device = "cuda" if mode == "cuda" else None
        if device:
            with torch.device(device):
                real = real_factory()
        else:
            real = real_factory()
        plan = prepare(real, config, name)
        timings["build"] = time.perf_counter() - t0
        if flops:
            t0 = time.perf_counter()
            cpu_model = real if mode != "cuda" else copy.deepcopy(real).cpu()
            disable_checkpointing(cpu_model)  # export and count the plain forward
            file_cg = getattr(meta_factory, "cg", None)
            # A user's file already is a graph: count on it rather than re-exporting the
            # rebuilt module (whose export loses the file's static shapes).
            count: FlopsCount = count_flops(cpu_model, resolution, use_cg=file_cg is None)
            if file_cg is not None:
                count.flops_cg, count.params_cg = _per_sample_flops(file_cg)
            if plan.segments and cpu_model is real:
                enable_checkpointing(real, plan.segments)
            result.flops = count.flops
            result.flops_thop, result.flops_cg = count.flops_thop, count.flops_cg
            result.params_thop, result.params_cg = count.params_thop, count.params_cg
            result.flops_rel_diff = count.rel_diff
            result.flops_cg_error = count.cg_error
            timings["flops"] = time.perf_counter() - t0
        if latency:
            t0 = time.perf_counter()
            lat = measure_latency(
                real,
                config,
                steps=latency_steps,
                warmup=latency_warmup,
                resolution=resolution,
                seed=seed,
            )
            result.latency_s = lat.median_s
            result.latency_samples_s = lat.samples_s
            timings["latency"] = time.perf_counter() - t0
    result.timings_s = {k: round(v, 4) for k, v in timings.items()}
    return result
