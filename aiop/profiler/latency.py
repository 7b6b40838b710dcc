"""Latency: the median wall time of a full training step under a config, on a real device."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from aiop.mconfig import MConfig, make_optimizer, make_scaler, train_step


@dataclass
class LatencyMeasurement:
    median_s: float
    samples_s: list[float]
    warmup_steps: int


def measure_latency(
    model: nn.Module,
    config: MConfig,
    *,
    steps: int = 10,
    warmup: int = 2,
    resolution: int | None = None,
    seed: int = 0,
) -> LatencyMeasurement:
    """Median seconds of one optimizer step (all micro-batches) of an already prepared model.

    Micro-batches are made once beforehand so that data generation is not timed;
    the first ``warmup`` steps are not timed either (allocator and kernel warm-up).
    """
    if steps < 1 or warmup < 0:
        raise ValueError("latency needs steps >= 1 and warmup >= 0")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    micro = [
        model.make_batch(config.mb, resolution, generator=generator, device=device)
        for _ in range(config.accum_steps)
    ]
    optimizer = make_optimizer(model, config)
    scaler = make_scaler(config, device)
    cuda = device.type == "cuda"
    samples: list[float] = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, optimizer, config, micro_batches=micro, scaler=scaler)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return LatencyMeasurement(statistics.median(samples), samples, warmup)
