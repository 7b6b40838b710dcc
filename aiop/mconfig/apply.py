"""Make a model train under an m-configuration, for real.

:func:`prepare` switches the train method (TinyTL), freezes the first layers
and turns on gradient checkpointing over the trainable blocks; it returns a
:class:`Plan` that records what it did (trainable parameter names, the
checkpointed block ranges) so that CG flags can match. :func:`make_optimizer`
and :func:`train_step` then run one optimizer step: micro-batches with gradient
accumulation under autocast, then ``optimizer.step()`` and
``zero_grad(set_to_none=True)``. The profiler and the retraining loop share
this code, so what is measured is what trains.

Checkpointing keeps the model's structure and parameter names: the
``model.blocks`` ``ModuleList`` is given a subclass whose iteration yields one
callable per segment (running the segment's blocks under non-reentrant
:func:`torch.utils.checkpoint.checkpoint`) followed by pass-throughs for the
segment's other blocks, so any ``forward`` written as ``for block in
self.blocks`` checkpoints without change. Recomputation runs BatchNorm with
momentum 0, so running statistics are updated once per forward, not twice.
Limitation: a forward that taps the outputs of blocks *inside* a segment
(``enumerate(self.blocks)`` with ``feature_indices``) sees the segment's output
there; classification forwards are exact.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aiop.mconfig.config import MConfig, MConfigError, method_trains

log = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...], Any]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_recompute_depth = 0


def is_recomputing() -> bool:
    """True while a checkpointed segment is being recomputed in backward."""
    return _recompute_depth > 0


@dataclass
class Plan:
    """What :func:`prepare` did to a model under a config."""

    config: MConfig
    trainable_params: list[str]
    frozen_params: list[str]
    units: list[str]  # parameterised layers (module paths) in forward order
    n_frozen_units: int
    n_blocks: int
    first_trainable_block: int | None  # None: no block needs gradients
    segments: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) block ranges

    @property
    def checkpointed_blocks(self) -> list[int]:
        return [b for start, stop in self.segments for b in range(start, stop)]

    @property
    def effective_segments(self) -> int:
        """Segments actually used (ckpt is capped by the trainable blocks)."""
        return len(self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.format(),
            "n_units": len(self.units),
            "n_frozen_units": self.n_frozen_units,
            "n_trainable_params_tensors": len(self.trainable_params),
            "n_blocks": self.n_blocks,
            "first_trainable_block": self.first_trainable_block,
            "segments": [list(s) for s in self.segments],
            "checkpointed_blocks": self.checkpointed_blocks,
        }


# -- train methods and freezing -------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return isinstance(
        module,
        nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm | nn.LocalResponseNorm,
    )


def apply_method(model: nn.Module, method: str) -> None:
    """Set ``requires_grad`` for a TinyTL train method (inserting lite residuals if needed).

    Uses :func:`aiop.models.tinytl.set_train_method` when it exists; otherwise the
    rules of :func:`aiop.mconfig.config.method_trains` (which cannot insert lite
    residual modules).
    """
    try:
        from aiop.models import tinytl  # lazily: the zoo sits beside, not below, us
    except ImportError:
        tinytl = None
    if tinytl is not None and hasattr(tinytl, "set_train_method"):
        tinytl.set_train_method(model, method)
        return
    if method.startswith("lite") and not any("lite" in n for n, _ in model.named_parameters()):
        raise MConfigError(f"method={method} needs aiop.models.tinytl, which is not available")
    from aiop.models.base import parameterised_modules

    units = parameterised_modules(model)
    has_head = isinstance(getattr(model, "head", None), nn.Module)
    for k, (name, module) in enumerate(units):
        in_head = name.startswith("head.") or name == "head" if has_head else k == len(units) - 1
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            p.requires_grad_(method_trains(method, full, in_head, _is_norm(module)))


def forward_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameterised modules in the order a forward pass first calls them.

    Registration order is not always forward order (a ResNet block registers
    its ``downsample`` after ``conv1`` but runs it first); exported CGs list
    nodes in execution order, so freezing must count layers that way too. One
    eval-mode, no-grad forward of a single sample (its own RNG, so the global
    one is untouched) records the order; modules it never calls come last, in
    registration order. If that forward fails, registration order is used.
    """
    from aiop.models.base import parameterised_modules

    units = parameterised_modules(model)
    names = {id(m): n for n, m in units}
    seen: dict[str, nn.Module] = {}

    def record(module: nn.Module, _: Any) -> None:
        name = names.get(id(module))
        if name is not None and name not in seen:
            seen[name] = module

    was_training = model.training
    handles = [m.register_forward_pre_hook(record) for _, m in units]
    try:
        device = next((p.device for p in model.parameters()), None)
        generator = torch.Generator().manual_seed(0)
        inputs, _ = model.make_batch(1, generator=generator, device=device)
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # an unusual model still trains; it just counts in its own order
        log.debug("forward order unavailable (%s); using registration order", exc)
        return units
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(seen.items()) + [(n, m) for n, m in units if n not in seen]


def freeze_layers(model: nn.Module, config: MConfig) -> tuple[list[str], int]:
    """Freeze the first ``config.freeze`` fraction of parameterised layers (in forward order,
    see :func:`forward_order`); return (layer names in that order, number frozen)."""
    units = forward_order(model) if config.freeze > 0 else []
    if not units:
        from aiop.models.base import parameterised_modules

        units = parameterised_modules(model)
    n = config.n_frozen_units(len(units))
    for _, module in units[:n]:
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
    return [name for name, _ in units], n


def _first_trainable_block(model: nn.Module) -> int | None:
    """Index of the first block whose activations autograd must keep (None: none does)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    stem = getattr(model, "stem", None)
    if stem is not None and any(p.requires_grad for p in stem.parameters()):
        return 0
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return None


# -- gradient checkpointing --------------------------------------------------------


@contextlib.contextmanager
def _recompute_context(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Recompute with BatchNorm momentum 0 so running statistics are not updated twice."""
    global _recompute_depth
    norms = [
        m
        for b in blocks
        for m in b.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)


class _Segment:
    """Runs blocks[start:stop] under non-reentrant checkpointing."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)

    def _run(self, x: Any) -> Any:
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, x: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._run(x)
        return checkpoint(
            self._run,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _recompute_context(self.blocks)),
        )


def _passthrough(x: Any) -> Any:
    return x


class CheckpointedBlocks(nn.ModuleList):
    """A ``ModuleList`` whose iteration runs segments of blocks under checkpointing."""

    _aiop_segments: list[tuple[int, int]]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        mods = list(self._modules.values())
        starts = {start: stop for start, stop in self._aiop_segments}
        i = 0
        while i < len(mods):
            if i in starts:
                stop = starts[i]
                yield _Segment(mods[i:stop])
                for _ in range(i + 1, stop):
                    yield _passthrough
                i = stop
            else:
                yield mods[i]
                i += 1


def enable_checkpointing(model: nn.Module, segments: Sequence[tuple[int, int]]) -> None:
    """Checkpoint ``model.blocks`` over the given [start, stop) block ranges."""
    blocks = model.blocks
    if not segments:
        disable_checkpointing(model)
        return
    if type(blocks) is nn.ModuleList:
        blocks.__class__ = CheckpointedBlocks
    elif not isinstance(blocks, CheckpointedBlocks):
        raise MConfigError(f"model.blocks is a {type(blocks).__name__}, not an nn.ModuleList")
    blocks._aiop_segments = [(int(a), int(b)) for a, b in segments]


def disable_checkpointing(model: nn.Module) -> None:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, CheckpointedBlocks):
        blocks.__class__ = nn.ModuleList
        del blocks._aiop_segments


# -- the whole preparation -------------------------------------------------------------


def prepare(model: nn.Module, config: MConfig | str, name: str = "the model") -> Plan:
    """Make ``model`` train under ``config``: method, freezing, checkpointing. Returns the plan."""
    from aiop.models.base import split_segments

    config = MConfig.parse(config)
    config.validate_for(model, name)
    disable_checkpointing(model)
    apply_method(model, config.method)
    units, n_frozen = freeze_layers(model, config)
    model.train()
    n_blocks = len(getattr(model, "blocks", ()))
    first = _first_trainable_block(model)
    segments: list[tuple[int, int]] = []
    if config.ckpt and first is not None:
        k = min(config.ckpt, n_blocks - first)
        if k < config.ckpt:
            log.info(
                "ckpt=%d capped to %d: only blocks %d..%d need gradients",
                config.ckpt,
                k,
                first,
                n_blocks - 1,
            )
        segments = [(first + r.start, first + r.stop) for r in split_segments(n_blocks - first, k)]
        enable_checkpointing(model, segments)
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return Plan(
        config=config,
        trainable_params=[n for n, t in names if t],
        frozen_params=[n for n, t in names if not t],
        units=units,
        n_frozen_units=n_frozen,
        n_blocks=n_blocks,
        first_trainable_block=first,
        segments=segments,
    )


def make_optimizer(
    model: nn.Module, config: MConfig, lr: float | None = None
) -> torch.optim.Optimizer | None:
    """The config's optimizer over the trainable parameters (None when all are frozen).

    SGD uses momentum 0.9 (so it keeps one state tensor per parameter); Adam and
    AdamW keep two plus a step count. ``foreach=False`` keeps the step's
    temporary memory to one parameter at a time, as on a memory-limited device.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    if config.opt == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=0.9, foreach=False)
    if config.opt == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr, foreach=False)
    if config.opt == "adamw":
        return torch.optim.AdamW(params, lr=1e-3 if lr is None else lr, foreach=False)
    raise MConfigError(f"unknown opt {config.opt!r}")


def make_scaler(config: MConfig, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training on a real device (None otherwise)."""
    device = torch.device(device)
    if config.prec != "fp16" or device.type == "meta":
        return None
    return torch.amp.GradScaler(device.type)


def autocast(config: MConfig, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The config's autocast context (a no-op for fp32)."""
    if config.prec == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[config.prec])


def split_batch(batch: Batch, config: MConfig) -> list[Batch]:
    """Cut a full batch into ``accum_steps`` micro-batches (views, no copies)."""
    inputs, targets = batch
    n = config.accum_steps

    def cut(x: Any) -> list[Any]:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == config.batch_size:
            return list(x.split(config.mb))
        if isinstance(x, tuple | list):
            parts = [cut(v) for v in x]
            return [type(x)(p[i] for p in parts) for i in range(n)]
        return [x] * n

    cut_inputs = [cut(x) for x in inputs]
    cut_targets = cut(targets)
    return [(tuple(ci[i] for ci in cut_inputs), cut_targets[i]) for i in range(n)]


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: MConfig,
    batch: Batch | None = None,
    *,
    micro_batches: Iterable[Batch] | Callable[[int], Batch] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_phase: Callable[[str], None] | None = None,
    max_micro_batches: int | None = None,
) -> torch.Tensor:
    """One optimizer step under ``config``; returns the batch's mean loss (detached).

    With ``optimizer=None`` the gradients are accumulated and left in ``.grad``
    (no step, no ``zero_grad``). With no trainable parameter at all the step is
    a forward pass without autograd.

    Give either the full ``batch`` (``(inputs, targets)`` with ``bs`` samples, cut
    into micro-batches) or ``micro_batches``: an iterable of ``accum_steps``
    micro-batches, or a callable ``i -> micro-batch`` that builds each one when
    needed (so that only one micro-batch is alive at a time). Each micro-batch's
    loss is divided by the number of micro-batches, so with a loss that is a
    mean over samples the accumulated gradients equal full-batch ones.
    ``on_phase`` is told ``"inputs"``, ``"forward"``, ``"backward"`` and
    ``"optimizer"`` as the step moves on (the profiler uses it to label memory).
    ``max_micro_batches`` runs only the first few micro-batches (losses still
    divided by the full count): from the second on, every micro-batch repeats
    the same memory pattern, so the meta profiler need not run them all.
    """
    if (batch is None) == (micro_batches is None):
        raise ValueError("give exactly one of batch and micro_batches")
    notify = on_phase or (lambda phase: None)
    n = config.accum_steps
    if batch is not None:
        parts = split_batch(batch, config)

        def get(i: int) -> Batch:
            return parts[i]
    elif callable(micro_batches):
        get = micro_batches
    else:
        parts = list(micro_batches)  # type: ignore[arg-type]
        n = len(parts)

        def get(i: int) -> Batch:
            return parts[i]

    scale = n
    if max_micro_batches is not None:
        n = max(1, min(n, max_micro_batches))
    device_type = _device_type(model)
    trains = any(p.requires_grad for p in model.parameters())
    total: torch.Tensor | None = None
    for i in range(n):
        notify("inputs")
        inputs, targets = get(i)
        notify("forward")
        with torch.set_grad_enabled(trains), autocast(config, device_type):
            outputs = model(*inputs)
            loss = model.loss(outputs, targets) if hasattr(model, "loss") else outputs
            del outputs
        scaled = loss / scale
        del inputs, targets
        if trains:
            notify("backward")
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_value = scaled.detach()
        del loss, scaled
        total = loss_value if total is None else total + loss_value
    if trains and optimizer is not None:
        notify("optimizer")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    notify("done")
    assert total is not None
    return total
