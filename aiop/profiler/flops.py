"""FLOPs and parameter counts: from thop and from the computational graph.

``flops`` throughout aiop is the FLOPs of **one forward pass of one sample**
(batch 1) at the profiled resolution, counted as 2 × multiply-accumulates
(thop's MACs × 2, AIO-P's label). It does not depend on the m-configuration
except through the train method (lite residual modules add FLOPs); a training
step costs roughly ``bs × flops × 3`` (forward, backward for activations and
weights) plus recomputation, which the predictor can learn from the config.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class FlopsCount:
    """FLOPs of one forward pass at batch 1 (2 × MACs) and parameter counts, two ways."""

    flops_thop: int | None = None
    params_thop: int | None = None
    flops_cg: int | None = None
    params_cg: int | None = None
    cg_error: str | None = None

    @property
    def flops(self) -> int | None:
        """thop's count when there is one (the published convention), else the CG's."""
        return self.flops_thop if self.flops_thop is not None else self.flops_cg

    @property
    def rel_diff(self) -> float | None:
        """|thop − CG| / thop: how far the two counts disagree (None if one is missing)."""
        if not self.flops_thop or self.flops_cg is None:
            return None
        return abs(self.flops_thop - self.flops_cg) / self.flops_thop


def thop_count(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(FLOPs = 2 × thop MACs, thop params) of ``model(*inputs)``; leaves the model as it was."""
    import thop

    was_training = model.training
    # thop prints to stdout and registers buffers on every module; keep both contained.
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        macs, params = thop.profile(model, inputs=inputs, verbose=False)
    for m in model.modules():
        m._buffers.pop("total_ops", None)
        m._buffers.pop("total_params", None)
    model.train(was_training)
    return round(2 * macs), int(params)


def cg_count(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(FLOPs, params) of the CG exported from ``model(*inputs)`` (raises when export fails)."""
    from aiop.cg import from_torch  # lazily: the CG importer may be absent or fail

    cg = from_torch(model, example_inputs=inputs)
    return int(cg.total_flops), int(cg.total_params)


def count_flops(model: nn.Module, resolution: int | None = None, use_cg: bool = True) -> FlopsCount:
    """Count a real (not fake) model's forward FLOPs at batch 1, with thop and the CG."""
    out = FlopsCount()
    (inputs, _) = model.make_batch(1, resolution)
    try:
        out.flops_thop, out.params_thop = thop_count(model, tuple(inputs))
    except Exception as exc:  # thop chokes on some custom modules; the CG may still count
        log.warning("thop could not count FLOPs: %s", exc)
    if use_cg:
        try:
            out.flops_cg, out.params_cg = cg_count(model, tuple(inputs))
        except Exception as exc:  # an unfinished or failing exporter must not stop profiling
            out.cg_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.info("no CG FLOPs: %s", out.cg_error)
    return out
