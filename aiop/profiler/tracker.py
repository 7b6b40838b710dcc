"""A lean memory tracker for one training step, with MemTracker's categories.

PyTorch's ``MemTracker`` hooks every module and deep-copies snapshots for
each of them on every op, which costs about 2 s per MobileNetV2 step even on
fake tensors, and it hooks every parameter (failing on frozen ones). Here the
training loop itself says which phase it is in (:func:`aiop.mconfig.train_step`
calls ``on_phase``), so a single dispatch mode suffices: each new storage is
counted once, under the category of the phase that created it, and uncounted
when it is freed (a weak-reference callback, as in MemTracker).

Categories and how they map onto MemTracker's:

============  ==========  =========================================================
key           MemTracker  what
============  ==========  =========================================================
params        PARAM       parameters
buffers       BUFFER      module buffers (BatchNorm running statistics)
grads         GRAD        ``.grad`` of parameters (relabelled when accumulated)
optimizer     OPT         optimizer state and the step's temporaries
activations   ACT         tensors made in forward, and by recomputation in backward
temporary     TEMP        tensors made in backward (activation gradients)
inputs        OTH         the micro-batch tensors (inputs and targets)
============  ==========  =========================================================

Storages are counted at their ``nbytes()``; on CUDA rounded up to 512 bytes,
the caching allocator's smallest block (as MemTracker does).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from aiop.mconfig.apply import is_recomputing

CATEGORIES: tuple[str, ...] = (
    "params",
    "buffers",
    "grads",
    "optimizer",
    "activations",
    "temporary",
    "inputs",
)
_CUDA_BLOCK = 512


class _Info:
    __slots__ = ("cat", "nbytes", "ref")

    def __init__(self, cat: str, nbytes: int) -> None:
        self.cat = cat
        self.nbytes = nbytes
        self.ref: weakref.ref | None = None


def _storage_bytes(st: torch.UntypedStorage, device: torch.device) -> int:
    n = st.nbytes()
    if device.type == "cuda":
        return math.ceil(n / _CUDA_BLOCK) * _CUDA_BLOCK
    return n


class StepMemoryTracker(TorchDispatchMode):
    """Counts live tensor storage by category; keeps the peak total and its breakdown.

    Use as a context manager around the measured step. Before entering, call
    :meth:`track` for tensors that already exist (parameters, buffers,
    optimizer state). Inside, :meth:`set_phase` with ``"inputs"``,
    ``"forward"``, ``"backward"`` or ``"optimizer"``; backward is recognised
    from autograd itself as well, and recomputation inside it counts as
    activations.
    """

    def __init__(self) -> None:
        super().__init__()
        self._infos: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = dict(self.current)
        self._phase = "activations"
        self._grad_hooks: list[Any] = []

    # -- bookkeeping -----------------------------------------------------------
    def _add(self, t: torch.Tensor, cat: str, relabel: bool = False) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse / exotic tensors have no single storage; they do not occur here
        info = self._infos.get(st)
        if info is not None:
            if relabel and info.cat != cat:
                self.current[info.cat] -= info.nbytes
                self.current[cat] += info.nbytes
                info.cat = cat
            nbytes = _storage_bytes(st, t.device)
            if nbytes != info.nbytes:  # resized in place (out= ops)
                self.current[info.cat] += nbytes - info.nbytes
                self.total += nbytes - info.nbytes
                info.nbytes = nbytes
            return
        info = _Info(cat, _storage_bytes(st, t.device))
        info.ref = weakref.ref(st, self._freed_callback(info))
        self._infos[st] = info
        self.current[cat] += info.nbytes
        self.total += info.nbytes

    def _freed_callback(self, info: _Info) -> Any:
        def freed(_: Any) -> None:
            self.current[info.cat] -= info.nbytes
            self.total -= info.nbytes

        return freed

    def _update_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.current)

    def track(self, tensors: Iterable[torch.Tensor], cat: str) -> None:
        """Count already existing tensors under ``cat`` (relabelling known ones)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t, cat, relabel=True)
        self._update_peak()

    def track_model(self, model: torch.nn.Module, optimizer: Any = None) -> None:
        """Count a model's parameters, buffers, gradients and an optimizer's state."""
        self.track(model.parameters(), "params")
        self.track(model.buffers(), "buffers")
        self.track((p.grad for p in model.parameters() if p.grad is not None), "grads")
        if optimizer is not None:
            self.track(
                (v for state in optimizer.state.values() for v in state.values()), "optimizer"
            )
        for p in model.parameters():
            if p.requires_grad:
                self._grad_hooks.append(
                    p.register_post_accumulate_grad_hook(
                        lambda q: self.track([q.grad], "grads") if q.grad is not None else None
                    )
                )

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.total
        self.peak_breakdown = dict(self.current)

    def set_phase(self, phase: str) -> None:
        """Label new tensors: ``inputs``, ``forward``, ``backward`` or ``optimizer``."""
        self._phase = {
            "inputs": "inputs",
            "forward": "activations",
            "backward": "temporary",
            "optimizer": "optimizer",
        }.get(phase, "activations")

    def close(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()

    # -- the dispatch mode -----------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._phase in ("inputs", "optimizer"):
            cat = self._phase
        elif torch._C._current_graph_task_id() != -1:
            cat = "activations" if is_recomputing() else "temporary"
        else:
            cat = "activations"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, cat)
        self._update_peak()
        return out


def frozen_safe_memtracker() -> Any:
    """PyTorch's ``MemTracker``, made to skip gradient hooks on frozen parameters.

    Stock ``MemTracker`` hooks every parameter it meets and raises on frozen
    ones ("cannot register a hook on a tensor that doesn't require gradient").
    This subclass tracks frozen parameters as PARAM without hooks. It is the
    cross-check for :class:`StepMemoryTracker` (one forward per step only:
    MemTracker refuses a second root forward, so no micro-batches).
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenSafeMemTracker(MemTracker):
        def _track_module_params_and_buffers(
            self, module: torch.nn.Module, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            def grad_hook(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if (
                    install_grad_hooks
                    and param.requires_grad
                    and self._param_to_grad_hook_handles.get(param, None) is None
                ):
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

    return FrozenSafeMemTracker()
