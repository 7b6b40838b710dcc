"""Peak memory of one training step under an m-configuration, in three modes.

The measured step is the *second* optimizer step (so the optimizer state
exists): a first step on zero gradients creates the state, then the tracked
step runs every micro-batch with accumulation, ``optimizer.step()`` and
``zero_grad(set_to_none=True)``. Each micro-batch is made (``model.make_batch``)
when it is needed, as a data loader would yield it, so ``inputs`` is one
micro-batch.

* ``meta``: the model is built inside ``FakeTensorMode``; nothing is computed,
  shapes and storages are. From the second micro-batch on the memory pattern
  repeats, so only the first ``META_MICRO_BATCHES`` micro-batches run.
* ``real``: a real CPU step under the same tracker; every micro-batch runs.
* ``cuda``: a real CUDA step; the peak is ``torch.cuda.max_memory_allocated``
  over the step (``max_memory_reserved`` reported too), the breakdown is the
  tracker's view of the same step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aiop.mconfig import MConfig, Plan, make_optimizer, prepare, train_step
from aiop.profiler.tracker import CATEGORIES, StepMemoryTracker

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("meta", "real", "cuda")
# Micro-batches the meta mode runs: the first allocates gradients, the second
# accumulates into them, and all later ones repeat the second exactly.
META_MICRO_BATCHES = 2


class ProfilerError(ValueError):
    """The profiler cannot do what was asked; the message says why."""


@dataclass
class MemoryMeasurement:
    """Peak memory of one step and where it went (bytes)."""

    mode: str
    peak_bytes: int
    breakdown: dict[str, int]
    tracker_peak_bytes: int
    plan: Plan
    params: int
    trainable_params: int
    micro_batches_run: int
    resolution: int
    cuda: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _fake_safe_module_to() -> Iterator[None]:
    """Make ``module.to(device, dtype)`` a no-op when nothing would change, on fake tensors.

    ``Module._apply`` always swaps fake parameters (``swap_tensors``), and the
    weak reference a fake tensor carries forbids it: ``Couldn't swap
    Conv2d.weight``. Model code such as TinyTL's lite-residual insertion calls
    ``.to(device=ref.device, dtype=ref.dtype)`` to follow the model, which
    changes nothing; skipping it is exact.
    """
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        same = memory_format is None and all(
            (device is None or t.device.type == torch.device(device).type)
            and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
            for t in (*self.parameters(), *self.buffers())
        )
        return self if same else original(self, *args, **kwargs)

    nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def build_model(
    factory: Callable[[], nn.Module], device: str | torch.device | None = None
) -> nn.Module:
    """Call ``factory`` (under ``torch.device(device)`` when given) and check the contract."""
    if device is not None:
        with torch.device(device):
            model = factory()
    else:
        model = factory()
    if not isinstance(model, nn.Module):
        raise ProfilerError(f"the model factory returned a {type(model).__name__}, not a module")
    if not hasattr(model, "make_batch"):
        raise ProfilerError(f"{type(model).__name__} has no make_batch(); profile an aiop BlockNet")
    return model


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Create the state a first optimizer step would leave, without running one.

    The state's shapes do not depend on the gradients' values, and a forward
    and backward pass (or, on fake tensors, even a step) would only cost time.
    SGD keeps a momentum buffer per parameter, Adam/AdamW two moments and a
    scalar step count (as their ``_init_group`` makes them); any other optimizer
    takes one real step on zero gradients.
    """
    if optimizer is None:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        if isinstance(optimizer, torch.optim.SGD):
            if optimizer.defaults.get("momentum", 0):
                for p in params:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
            return
        adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        if adam and not optimizer.defaults.get("amsgrad"):
            from torch.optim.optimizer import _get_scalar_dtype

            for p in params:
                optimizer.state[p].update(
                    step=torch.tensor(0.0, dtype=_get_scalar_dtype()),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
            return
        for p in params:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(
    factory: Callable[[], nn.Module],
    config: MConfig,
    mode: str = "meta",
    *,
    resolution: int | None = None,
    seed: int = 0,
    name: str = "the model",
    max_micro_batches: int | None = None,
) -> MemoryMeasurement:
    """Peak memory of the second training step of ``factory()`` under ``config``."""
    if mode not in MODES:
        raise ProfilerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "cuda" and not torch.cuda.is_available():
        raise ProfilerError("mode=cuda needs a CUDA device, and none is available")
    if mode == "meta" and max_micro_batches is None:
        max_micro_batches = META_MICRO_BATCHES
    if mode == "meta":
        with _fake_mode():
            return _measure(factory, config, mode, resolution, seed, name, max_micro_batches)
    gc.collect()  # garbage of earlier runs must not free itself inside the measured step
    torch.manual_seed(seed)
    return _measure(factory, config, mode, resolution, seed, name, max_micro_batches)


def _measure(
    factory: Callable[[], nn.Module],
    config: MConfig,
    mode: str,
    resolution: int | None,
    seed: int,
    name: str,
    max_micro_batches: int | None,
) -> MemoryMeasurement:
    device = torch.device("cuda") if mode == "cuda" else torch.device("cpu")
    with _fake_safe_module_to() if mode == "meta" else contextlib.nullcontext():
        model = build_model(factory, device if mode == "cuda" else None)
        plan = prepare(model, config, name)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(seed)

    def micro_batch(_: int) -> Any:
        return model.make_batch(config.mb, resolution, generator=generator, device=device)

    _create_optimizer_state(model, optimizer)
    tracker = StepMemoryTracker()
    tracker.track_model(model, optimizer)
    tracker.reset_peak()
    cuda: dict[str, int] = {}
    if mode == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda["allocated_before_step"] = torch.cuda.memory_allocated()
    n_run = (
        config.accum_steps
        if max_micro_batches is None
        else min(config.accum_steps, max_micro_batches)
    )
    try:
        with tracker:
            train_step(
                model,
                optimizer,
                config,
                micro_batches=micro_batch,
                on_phase=tracker.set_phase,
                max_micro_batches=max_micro_batches,
            )
    finally:
        tracker.close()
    peak = tracker.peak
    if mode == "cuda":
        torch.cuda.synchronize()
        cuda["max_allocated"] = torch.cuda.max_memory_allocated()
        cuda["max_reserved"] = torch.cuda.max_memory_reserved()
        peak = cuda["max_allocated"]
    breakdown = {k: int(tracker.peak_breakdown.get(k, 0)) for k in CATEGORIES}
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.debug("%s %s %s: peak %d B %s", name, config, mode, peak, breakdown)
    return MemoryMeasurement(
        mode=mode,
        peak_bytes=int(peak),
        breakdown=breakdown,
        tracker_peak_bytes=int(tracker.peak),
        plan=plan,
        params=int(params),
        trainable_params=int(trainable),
        micro_batches_run=n_run,
        resolution=int(resolution or model.example_input_shape(1)[-1]),
        cuda=cuda,
    )
