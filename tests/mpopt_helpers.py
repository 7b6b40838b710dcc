"""Shared settings of the retraining-loop tests: a tiny model on a short stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiop.mpopt.loop import RetrainSettings


def tiny_retrain_settings(
    *,
    budget_mb: float,
    steps_per_domain: int,
    batch_size: int,
    segments: Sequence[int] = (0,),
    **overrides: Any,
) -> RetrainSettings:
    """:class:`RetrainSettings` of a quarter-width MobileNetV2 at 16 px on ``digits-c-short``,
    pretrained one epoch on 200 digits, with a small space (freeze 0 or 0.5, fp32,
    ``segments``); what the tests vary (budget, stream length, batch) must be given,
    anything else may be overridden."""
    base: dict[str, Any] = dict(
        model="zoo:mobilenet_v2",
        model_kwargs={"width_mult": 0.25},
        stream="digits-c-short",
        budget_mb=budget_mb,
        steps_per_domain=steps_per_domain,
        batch_size=batch_size,
        resolution=16,
        pretrain_epochs=1,
        pretrain_samples=200,
        eval_size=40,
        probe_size=30,
        top_k=2,
        probe_steps=1,
        space={"freezes": (0.0, 0.5), "segments": tuple(segments), "precisions": ("fp32",)},
    )
    base.update(overrides)
    return RetrainSettings(**base)
