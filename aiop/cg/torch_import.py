"""PyTorch module → :class:`~aiop.cg.graph.ComputeGraph`, through an in-memory ONNX export.

The export runs in training mode without constant folding (DESIGN.md, "Graphs
describe training"): BatchNorm keeps its batch statistics, Dropout its mask,
and every activation autograd keeps stays a node. The module's buffers
(BatchNorm running statistics) are restored afterwards, so building a CG never
changes the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aiop.cg.graph import CGError, ComputeGraph
from aiop.cg.onnx_import import from_onnx

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


@contextlib.contextmanager
def _export_patches() -> Iterator[None]:
    """Work around two refusals of torch 2.13's legacy exporter.

    First, ``nn.MultiheadAttention``.

    While tracing, ``multi_head_attention_forward`` hands ``is_causal`` to
    ``scaled_dot_product_attention`` as a tensor, which it rejects ("argument
    'is_causal' must be bool, not Tensor"). The flag is a constant of the
    trace, so coercing it back to ``bool`` for the export is exact.
    """
    original = F.scaled_dot_product_attention

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) > 5 and isinstance(args[5], torch.Tensor):
            args = (*args[:5], bool(args[5]), *args[6:])
        if isinstance(kwargs.get("is_causal"), torch.Tensor):
            kwargs["is_causal"] = bool(kwargs["is_causal"])
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    # CGs are built at batch 1, where F.batch_norm's Python guard refuses a BatchNorm
    # after global pooling ("Expected more than 1 value per channel when training").
    # The traced graph does not depend on that check, so it is lifted for the export.
    verify = F._verify_batch_size
    F._verify_batch_size = lambda size: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        F._verify_batch_size = verify


def export_onnx_bytes(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    training: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
    do_constant_folding: bool = False,
) -> bytes:
    """Export ``module`` to ONNX bytes; raises :class:`CGError` when export fails."""
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise CGError("the dynamo exporter needs onnxscript: pip install onnxscript") from None
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    was_training = module.training
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    names = [
        f"input_{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))
    ]
    try:
        patch = contextlib.nullcontext() if dynamo else _export_patches()
        with warnings.catch_warnings(), patch:
            warnings.simplefilter("ignore")
            kwargs = (
                {} if dynamo else {"training": mode, "do_constant_folding": do_constant_folding}
            )
            torch.onnx.export(
                module,
                example_inputs,
                buf,
                input_names=names,
                opset_version=opset,
                dynamo=dynamo,
                **kwargs,
            )
    except Exception as exc:  # the exporters raise many types; report one line
        raise CGError(
            f"ONNX export of {type(module).__name__} failed: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        with torch.no_grad():
            for k, v in module.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        module.train(was_training)
    return buf.getvalue()


def default_example_inputs(
    module: nn.Module, input_shape: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Example inputs: ``input_shape`` if given, else the module's own batch-1 inputs."""
    if input_shape is not None:
        return (torch.randn(*[int(d) for d in input_shape]),)
    make_batch = getattr(module, "make_batch", None)
    if callable(make_batch):
        inputs, _ = make_batch(1, generator=torch.Generator().manual_seed(0))
        return tuple(inputs)
    size = getattr(module, "input_size", None)
    if size is None:
        raise CGError(f"{type(module).__name__}: pass input_shape (N,C,H,W); it has no input_size")
    return (torch.randn(1, *size),)


def from_torch(
    module: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    name: str | None = None,
    dynamo: bool = False,
    opset: int = DEFAULT_OPSET,
) -> ComputeGraph:
    """Build the training CG of ``module`` for inputs of ``input_shape`` (batch 1 by default).

    ``example_inputs`` overrides ``input_shape`` for modules with several or
    non-float inputs (e.g. token ids).
    """
    inputs = (
        example_inputs
        if example_inputs is not None
        else default_example_inputs(module, input_shape)
    )
    data = export_onnx_bytes(module, tuple(inputs), training=True, opset=opset, dynamo=dynamo)
    cg = from_onnx(data, name=name or type(module).__name__)
    cg.source = "torch"
    cg.meta["exporter"] = "dynamo" if dynamo else "torchscript"
    return cg
