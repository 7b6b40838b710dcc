"""One PyTorch module per CG node: the op implementations behind :mod:`aiop.cg.to_torch`.

Weighted ops become real ``nn`` layers (``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm2d``, ``nn.LayerNorm`` ...) so parameters, buffers and autograd's
saved tensors are those of the network the graph was exported from. Every other
op is an :class:`FnOp`: a module-level function of ONNX semantics plus the
node's static arguments (attributes, literal constants) and its constant
tensors (as parameters when they derive from learned parameters, as buffers
otherwise). No closures hold modules, so ``copy.deepcopy`` of a built module is
a faithful copy.

Builders take an :class:`OpSpec` (the node, its constants and the build
options) and return the module; unsupported ops are listed by
:func:`unsupported_ops` before anything is built.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aiop.cg.graph import CGError, ComputeGraph, ConstTensor, Node

log = logging.getLogger(__name__)

INT_MAX = 2**62  # ONNX exporters write INT64_MAX-ish bounds for "to the end"

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# ONNX TensorProto element types (Cast's "to").
_ONNX_ELEM = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


class Runtime:
    """State shared by a built module's ops during one forward: the batch sizes.

    ``cg_batch`` is the graph's batch (first dim of its first input);
    ``batch`` the batch of the current call.
    """

    def __init__(self, cg_batch: int | None) -> None:
        self.cg_batch = cg_batch
        self.batch = cg_batch
        self.inputs: dict[str, Any] = {}  # this call's graph inputs, by name

    def __deepcopy__(self, memo: dict[int, Any]) -> Runtime:
        copy = Runtime(self.cg_batch)
        memo[id(self)] = copy
        return copy


@dataclass
class OpSpec:
    """What a builder needs: the node, the graph's constants and weights, the options."""

    node: Node
    cg: ComputeGraph
    runtime: Runtime
    use_weights: bool
    # Parameters already built for a constant (weights shared between nodes).
    shared: dict[str, nn.Parameter] = field(default_factory=dict)
    # Export-time shapes of the graph's tensors, by name.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.node.attrs

    def name_at(self, pos: int) -> str:
        return self.node.inputs[pos] if pos < len(self.node.inputs) else ""

    def const(self, pos: int) -> ConstTensor | None:
        return self.cg.constants.get(self.name_at(pos))

    def is_const(self, pos: int) -> bool:
        return self.const(pos) is not None

    def present(self, pos: int) -> bool:
        return bool(self.name_at(pos))

    def value(self, pos: int) -> np.ndarray | None:
        """The constant's value (literal or weight), or None when unknown/absent."""
        name = self.name_at(pos)
        c = self.cg.constants.get(name)
        if c is None:
            return None
        if c.value is not None:
            return np.asarray(c.value, dtype=_np_dtype(c.dtype)).reshape(c.shape)
        arr = self.cg.weights.get(name)
        return None if arr is None else np.asarray(arr)

    def ints(self, pos: int) -> list[int] | None:
        v = self.value(pos)
        return None if v is None else [int(x) for x in v.reshape(-1)]

    def scalar(self, pos: int) -> float | None:
        v = self.value(pos)
        return None if v is None or v.size != 1 else float(v.reshape(-1)[0])

    def is_param(self, pos: int) -> bool:
        c = self.const(pos)
        return bool(c is not None and c.param_names and c.dtype.startswith(("float", "bfloat")))

    def in_shape(self, pos: int) -> tuple[int, ...]:
        """CG-time shape of the tensor at input ``pos`` (``()`` when unknown)."""
        c = self.const(pos)
        if c is not None:
            return tuple(c.shape)
        return self.shapes.get(self.name_at(pos), ())

    def weight(self, pos: int) -> torch.Tensor | None:
        """The constant as a tensor when its value is known and weights are used."""
        if not self.use_weights:
            c = self.const(pos)
            if c is not None and c.value is None:
                return None
        v = self.value(pos)
        if v is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(v).copy())


def tensor_shapes(cg: ComputeGraph) -> dict[str, tuple[int, ...]]:
    """Export-time shape of every node output (outputs are listed with their present shapes)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for n in cg.nodes:
        present = [o for o in n.outputs if o]
        for o, shape in zip(present, n.output_shapes):
            shapes[o] = tuple(shape)
    return shapes


def _eps(attrs: dict[str, Any]) -> float:
    """A norm's epsilon, undoing float32 storage (1e-5 is 9.99999975e-06 in the file), so
    a rebuilt PyTorch network matches its original bit for bit."""
    return float(f"{float(attrs.get('epsilon', 1e-5)):.7g}")


def _np_dtype(dtype: str) -> Any:
    return {"bfloat16": np.float32}.get(dtype, dtype)


def param_leaf(spec: OpSpec, pos: int, default: str) -> str:
    c = spec.const(pos)
    leaf = c.param_names[0].rsplit(".", 1)[-1] if c is not None and c.param_names else default
    leaf = re.sub(r"\W", "_", leaf)
    return leaf if leaf and not leaf[0].isdigit() else f"p_{leaf}"


# -- the generic functional op ---------------------------------------------------------


class FnOp(nn.Module):
    """A non-weighted op: ``fn(self, inputs)`` with its constants bound.

    ``slots`` maps every ONNX input position to where its value comes from:
    ``("x", k)`` the k-th runtime argument, ``("t", attr)`` a parameter or
    buffer of this module, ``("h", (k, attr))`` a parameter of the k-th
    *holder* (a module elsewhere in the tree that owns it, see
    :meth:`borrow`), ``("v", value)`` a literal, ``("n", None)`` absent.
    ``param_consts`` names the graph constant behind each parameter attribute.

    Ops of TF graphs whose meaning depends on NHWC element order (a Reshape of a
    feature map, a rank-changing Squeeze or slice) carry ``_perm_in`` (applied to
    their 4-D runtime inputs) and ``_perm_out`` (applied to a result of that rank):
    the op runs on the NHWC view and hands back the CG's NCHW layout.
    """

    def __init__(self, op: str, fn: Callable[..., Any], attrs: dict[str, Any]) -> None:
        super().__init__()
        self.op = op
        self.fn = fn
        self.attrs = dict(attrs)
        self.slots: list[tuple[str, Any]] = []
        self.runtime: Runtime | None = None
        self.param_consts: dict[str, str] = {}
        # Plain list, not submodules: the holders are registered where they belong.
        self._holders: list[nn.Module] = []

    def borrow(self, attr: str, holder: nn.Module, leaf: str) -> None:
        """Read parameter ``attr`` from ``holder.leaf`` instead of owning it.

        An original network that reads a parameter as an attribute
        (``torch.cat([self.tokens.cls_token, x])``) never calls the module that
        owns it; a holder that is never called keeps that module's place in
        :func:`~aiop.mconfig.apply.forward_order` (last) and its parameters
        together, so freezing counts the same layers.
        """
        del self._parameters[attr]
        self.param_consts.pop(attr, None)
        if not any(h is holder for h in self._holders):
            self._holders.append(holder)
        k = next(i for i, h in enumerate(self._holders) if h is holder)
        self.slots = [("h", (k, leaf)) if s == ("t", attr) else s for s in self.slots]

    def forward(self, *xs: Any) -> Any:
        ins: list[Any] = []
        perm_in = self.attrs.get("_perm_in")
        if perm_in is not None:  # a TF graph's NHWC op: its 4-D inputs back to NHWC
            xs = tuple(x.permute(*perm_in) if x.dim() == len(perm_in) else x for x in xs)
        for kind, ref in self.slots:
            if kind == "x":
                ins.append(xs[ref])
            elif kind == "t":
                ins.append(getattr(self, ref))
            elif kind == "h":
                ins.append(getattr(self._holders[ref[0]], ref[1]))
            elif kind == "v":
                ins.append(ref)
            else:
                ins.append(None)
        out = self.fn(self, ins)
        perm_out = self.attrs.get("_perm_out")
        if perm_out is not None and isinstance(out, torch.Tensor) and out.dim() == len(perm_out):
            out = out.permute(*perm_out)  # NHWC result shown in the CG's NCHW layout
        return out

    def extra_repr(self) -> str:
        return self.op


def fn_op(spec: OpSpec, fn: Callable[..., Any], literal: Sequence[int] = ()) -> FnOp:
    """Bind a node's inputs: runtime tensors, literals (positions in ``literal`` as numpy
    values, small float scalars as Python floats), params and buffers."""
    node = spec.node
    mod = FnOp(node.op, fn, node.attrs)
    mod.runtime = spec.runtime
    k = 0
    used: set[str] = set()
    for pos, name in enumerate(node.inputs):
        if not name:
            mod.slots.append(("n", None))
            continue
        c = spec.cg.constants.get(name)
        if c is None:
            mod.slots.append(("x", k))
            k += 1
            continue
        if pos in literal and c.value is not None:
            mod.slots.append(("v", spec.value(pos)))
            continue
        if spec.is_param(pos):
            attr = param_leaf(spec, pos, f"p{pos}")
            while attr in used:
                attr += "_"
            used.add(attr)
            param = spec.shared.get(name)
            if param is None:
                param = new_param(spec, pos, default=1.0 if node.op in ("Mul", "Div") else None)
                spec.shared[name] = param
            mod.register_parameter(attr, param)
            mod.param_consts[attr] = name
            mod.slots.append(("t", attr))
            continue
        v = spec.value(pos)
        if v is not None and v.size == 1 and c.dtype.startswith("float") and node.op in _SCALAR_OK:
            mod.slots.append(("v", float(v.reshape(-1)[0])))
            continue
        t = spec.weight(pos)
        if t is None:
            t = torch.zeros(c.shape, dtype=_TORCH_DTYPES.get(c.dtype, torch.float32))
        attr = f"c{pos}"
        mod.register_buffer(attr, t, persistent=True)
        mod.slots.append(("t", attr))
    return mod


# Elementwise ops where a float scalar constant can stay a Python number (as in the
# original code: ``x * 0.5``), so no buffer or broadcast tensor appears.
_SCALAR_OK = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


def new_param(spec: OpSpec, pos: int, default: float | None = None) -> nn.Parameter:
    """A parameter for the constant at ``pos``: its value, or an initialisation."""
    c = spec.const(pos)
    assert c is not None
    t = spec.weight(pos) if spec.use_weights else None
    if t is None:
        t = torch.empty(c.shape)
        if default is not None:
            nn.init.constant_(t, default)
        else:
            nn.init.normal_(t, std=0.02)
    return nn.Parameter(t.float() if not t.is_floating_point() else t)


def set_param(
    param_holder: nn.Module, attr: str, spec: OpSpec, pos: int, reshape: Any = None
) -> None:
    """Point ``holder.attr`` at the constant's shared parameter, or fill it from the weights."""
    name = spec.name_at(pos)
    shared = spec.shared.get(name)
    if shared is not None and (reshape is None or tuple(shared.shape) == tuple(reshape)):
        setattr(param_holder, attr, shared)
        return
    t = spec.weight(pos) if spec.use_weights else None
    target = getattr(param_holder, attr)
    if t is not None:
        with torch.no_grad():
            target.copy_(t.reshape(target.shape).to(target.dtype))
    if isinstance(target, nn.Parameter) and name:
        spec.shared[name] = target


# -- shape helpers ---------------------------------------------------------------------


def batch_shape(x: torch.Tensor, target: list[int], cg_in0: int | None) -> list[int]:
    """Reshape's batch rule: the target's first dim scales with the input's first dim.

    When the data tensor's first dim differs from its export-time value
    ``cg_in0`` (another batch), a positive target first dim ``t0`` becomes
    ``t0 * x.shape[0] / cg_in0`` when that is whole: ``[1, -1]`` at batch 1 becomes
    ``[B, -1]``, ``[B*heads, n, d]`` keeps its heads, ``[B, p, p, ...]`` from
    ``(B*p*p, n, c)`` comes back to ``B``.
    """
    if not target or cg_in0 is None or cg_in0 <= 0 or x.dim() == 0:
        return target
    n0 = x.shape[0]
    if n0 == cg_in0 or target[0] <= 0 or (target[0] * n0) % cg_in0:
        return target
    return [target[0] * n0 // cg_in0, *target[1:]]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# -- functional implementations (ONNX semantics) ---------------------------------------


def _binary(torch_fn: Callable[[Any, Any], Any]) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        return torch_fn(ins[0], ins[1])

    return fn


def _div(m: FnOp, ins: list[Any]) -> Any:
    a, b = ins
    if isinstance(a, torch.Tensor) and not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(m: FnOp, ins: list[Any]) -> Any:
    a, b = ins
    return torch.pow(a, b)


def _variadic(torch_fn: Callable[[Any, Any], Any]) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        out = ins[0]
        for x in ins[1:]:
            out = torch_fn(out, x)
        return out

    return fn


def _mean(m: FnOp, ins: list[Any]) -> Any:
    out = ins[0]
    for x in ins[1:]:
        out = out + x
    return out / len(ins)


def _unary(torch_fn: Callable[[Any], Any]) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        return torch_fn(ins[0])

    return fn


def _leaky_relu(m: FnOp, ins: list[Any]) -> Any:
    return F.leaky_relu(ins[0], m.attrs.get("alpha", 0.01))


def _elu(m: FnOp, ins: list[Any]) -> Any:
    return F.elu(ins[0], m.attrs.get("alpha", 1.0))


def _celu(m: FnOp, ins: list[Any]) -> Any:
    return F.celu(ins[0], m.attrs.get("alpha", 1.0))


def _selu(m: FnOp, ins: list[Any]) -> Any:
    alpha = m.attrs.get("alpha", 1.67326319217681884765625)
    gamma = m.attrs.get("gamma", 1.05070102214813232421875)
    if abs(alpha - 1.6732632) < 1e-6 and abs(gamma - 1.0507010) < 1e-6:
        return F.selu(ins[0])
    x = ins[0]
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _hardsigmoid(m: FnOp, ins: list[Any]) -> Any:
    alpha, beta = m.attrs.get("alpha", 0.2), m.attrs.get("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6:
        return F.hardsigmoid(ins[0])
    return torch.clamp(alpha * ins[0] + beta, 0.0, 1.0)


def _gelu(m: FnOp, ins: list[Any]) -> Any:
    return F.gelu(ins[0], approximate=m.attrs.get("approximate", "none"))


def _silu(m: FnOp, ins: list[Any]) -> Any:
    return F.silu(ins[0])


def _softplus(m: FnOp, ins: list[Any]) -> Any:
    return F.softplus(ins[0])


def _prelu(m: FnOp, ins: list[Any]) -> Any:
    x, slope = ins
    if slope.numel() == 1 or (x.dim() >= 2 and slope.numel() == x.shape[1]):
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def _clip(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else m.attrs.get("min")
    hi = ins[2] if len(ins) > 2 else m.attrs.get("max")
    lo = _num(lo)
    hi = _num(hi)
    if lo == 0.0 and hi == 6.0:
        return F.relu6(x)  # what nn.ReLU6 runs (hardtanh): same saved tensors
    if lo is not None and hi is not None and x.is_floating_point():
        return F.hardtanh(x, lo, hi)
    return torch.clamp(x, lo, hi)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return float(v.reshape(-1)[0]) if v.numel() else None
    if isinstance(v, np.ndarray):
        return float(v.reshape(-1)[0]) if v.size else None
    return float(v)


def _softmax_like(torch_fn: Callable[..., Any]) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        x = ins[0]
        opset = m.attrs.get("_opset", 13)
        axis = m.attrs.get("axis", -1 if opset >= 13 else 1)
        axis = _axis(axis, x.dim())
        if opset < 13 and axis != x.dim() - 1:
            # Before opset 13: softmax of the input coerced to 2-D at ``axis``.
            shape = x.shape
            return torch_fn(x.reshape(*shape[:axis], -1), dim=-1).reshape(shape)
        return torch_fn(x, dim=axis)

    return fn


def _concat(m: FnOp, ins: list[Any]) -> Any:
    ts = [t for t in ins if t is not None]
    axis = _axis(m.attrs.get("axis", 0), ts[0].dim())
    rt = m.runtime
    # Batch rule: a constant folded at the graph's batch (an expanded CLS token)
    # follows the call's batch when the other inputs carry it.
    if (
        axis != 0
        and rt is not None
        and rt.cg_batch
        and rt.batch != rt.cg_batch
        and any(t.shape[0] == rt.batch for t in ts)
    ):
        ts = [t.expand(rt.batch, *t.shape[1:]) if t.shape[0] == rt.cg_batch == 1 else t for t in ts]
    if m.attrs.get("new_axis"):  # TF Pack: stack along a new axis
        return torch.stack(ts, dim=_axis(m.attrs.get("axis", 0), ts[0].dim() + 1))
    return torch.cat(ts, dim=axis)


def _reshape(m: FnOp, ins: list[Any]) -> Any:
    x, shape = ins
    target = [
        int(s)
        for s in (
            shape.tolist()
            if isinstance(shape, torch.Tensor)
            else np.asarray(shape).reshape(-1).tolist()
        )
    ]
    cg_in0 = m.attrs.get("_cg_in0")
    rt = m.runtime
    known = rt is not None and rt.cg_batch and rt.batch and x.dim()
    if cg_in0 is None and known and (x.shape[0] * rt.cg_batch) % rt.batch == 0:
        # Export-time shape unknown: assume the first dim scaled with the batch.
        cg_in0 = x.shape[0] * rt.cg_batch // rt.batch
    if target and not (target[0] == 0 and not m.attrs.get("allowzero", 0)):
        target = batch_shape(x, target, cg_in0)  # a copied (0) first dim is already right
    if not m.attrs.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


def _flatten(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    axis = _axis(m.attrs.get("axis", 1), x.dim())
    if axis == 0:
        return x.reshape(1, -1)
    return x.reshape(math.prod(x.shape[:axis]), -1) if axis > 1 else x.flatten(1)


def _transpose(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    perm = m.attrs.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _squeeze(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    axes = _axes_of(m, ins)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _unsqueeze(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    axes = _axes_of(m, ins)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _axes_of(m: FnOp, ins: list[Any], pos: int = 1) -> list[int] | None:
    if len(ins) > pos and ins[pos] is not None:
        v = ins[pos]
        return [
            int(a)
            for a in (
                v.tolist() if isinstance(v, torch.Tensor) else np.asarray(v).reshape(-1).tolist()
            )
        ]
    axes = m.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _expand(m: FnOp, ins: list[Any]) -> Any:
    x, shape = ins
    target = [
        int(s)
        for s in np.asarray(
            shape if not isinstance(shape, torch.Tensor) else shape.tolist()
        ).reshape(-1)
    ]
    rt = m.runtime
    # Batch rule: a target that expands to the graph's batch follows the call's batch.
    if (
        rt is not None
        and rt.cg_batch
        and rt.batch != rt.cg_batch
        and target
        and target[0] == rt.cg_batch
    ):
        if x.dim() >= len(target) and x.shape[x.dim() - len(target)] == rt.batch:
            pass
        else:
            target[0] = rt.batch
    rank = max(x.dim(), len(target))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ts = [1] * (rank - len(target)) + target
    out = [max(a, b) if b != -1 else a for a, b in zip(xs, ts)]
    return x.expand(*out)


def _tile(m: FnOp, ins: list[Any]) -> Any:
    x, reps = ins
    return x.repeat(
        *[
            int(r)
            for r in np.asarray(
                reps if not isinstance(reps, torch.Tensor) else reps.tolist()
            ).reshape(-1)
        ]
    )


def _gather(m: FnOp, ins: list[Any]) -> Any:
    x, idx = ins
    axis = _axis(m.attrs.get("axis", 0), x.dim())
    if isinstance(idx, np.ndarray):
        if idx.ndim == 0:
            i = int(idx)
            return x.select(axis, i + x.shape[axis] if i < 0 else i)
        idx = torch.from_numpy(idx.astype(np.int64)).to(x.device)
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if axis == 0 and x.dim() == 2 and x.is_floating_point():
        return F.embedding(idx, x)  # what nn.Embedding runs: saves the indices only
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _gather_elements(m: FnOp, ins: list[Any]) -> Any:
    x, idx = ins
    axis = _axis(m.attrs.get("axis", 0), x.dim())
    idx = _as_tensor(idx, x.device).long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _as_tensor(v: Any, device: Any = None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(np.asarray(v), device=device)


def _split(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    axis = _axis(m.attrs.get("axis", 0), x.dim())
    sizes = _axes_of(m, ins) if len(ins) > 1 and ins[1] is not None else m.attrs.get("split")
    n_out = m.attrs.get("_n_out", 1)
    if not sizes:
        n = m.attrs.get("num_outputs", n_out)
        size = -(-x.shape[axis] // n)
        return tuple(torch.split(x, size, dim=axis))
    return tuple(torch.split(x, [int(s) for s in sizes], dim=axis))


def _slice(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]

    def ints(v: Any) -> list[int] | None:
        if v is None:
            return None
        return [
            int(a)
            for a in (
                v.tolist() if isinstance(v, torch.Tensor) else np.asarray(v).reshape(-1).tolist()
            )
        ]

    if len(ins) > 1:
        starts, ends = ints(ins[1]), ints(ins[2])
        axes = ints(ins[3]) if len(ins) > 3 else None
        steps = ints(ins[4]) if len(ins) > 4 else None
    else:  # opset < 10 (and TF slices): attributes
        starts, ends, axes = m.attrs["starts"], m.attrs["ends"], m.attrs.get("axes")
        steps = m.attrs.get("steps")
    assert starts is not None and ends is not None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    out = x
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        n = x.shape[a]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            out = out.narrow(a, s, max(0, e - s)) if st == 1 else _step_slice(out, a, s, e, st)
        else:
            s = max(0, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            idx = torch.arange(s, e, st, device=x.device)
            out = out.index_select(a, idx)
    shape = m.attrs.get("_out_shape")
    if shape is not None:  # TF StridedSlice's shrink/new axes: the result's own rank
        rest = [int(d) for d in shape[1:]]
        keeps = m.attrs.get("_keeps_batch") and math.prod(rest) > 0
        # -1, not out.shape[0]: a traced export keeps static shapes
        out = out.reshape(-1 if keeps else int(shape[0]), *rest)
    return out


def _step_slice(x: torch.Tensor, axis: int, s: int, e: int, step: int) -> torch.Tensor:
    index = [slice(None)] * x.dim()
    index[axis] = slice(s, e, step)
    return x[tuple(index)]


def _cast(m: FnOp, ins: list[Any]) -> Any:
    to = m.attrs.get("to", 1)
    dtype = _TORCH_DTYPES.get(to) if isinstance(to, str) else _ONNX_ELEM.get(to)  # TF: a name
    return ins[0].to(dtype or torch.float32)


def _where(m: FnOp, ins: list[Any]) -> Any:
    c, a, b = ins
    return torch.where(_as_tensor(c), a, b)


def _shape(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    start, end = m.attrs.get("start", 0), m.attrs.get("end", x.dim())
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


def _constant_of_shape(m: FnOp, ins: list[Any]) -> Any:
    shape = [int(s) for s in _as_tensor(ins[0]).tolist()]
    return torch.full(shape, m.attrs.get("_fill", 0.0))


def _range(m: FnOp, ins: list[Any]) -> Any:
    s, e, d = (float(_as_tensor(v)) for v in ins)
    return torch.arange(s, e, d)


def _trilu(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    k = int(_as_tensor(ins[1])) if len(ins) > 1 and ins[1] is not None else 0
    return torch.triu(x, k) if m.attrs.get("upper", 1) else torch.tril(x, k)


def _depth_to_space(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    b = m.attrs["blocksize"]
    if m.attrs.get("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    b = m.attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def _pad(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        pads = [int(p) for p in _as_tensor(ins[1]).tolist()]
        value = _num(ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
        axes = _axes_of(m, ins, 3) if len(ins) > 3 and ins[3] is not None else None
    else:
        pads, value, axes = list(m.attrs["pads"]), m.attrs.get("value", 0.0), None
    rank = x.dim()
    axes = [_axis(a, rank) for a in (axes or range(rank))]
    k = len(axes)
    begin, end = pads[:k], pads[k:]
    full = {a: (b, e) for a, b, e in zip(axes, begin, end)}
    torch_pads: list[int] = []
    last = max((a for a, (b, e) in full.items() if b or e), default=-1)
    for a in range(rank - 1, -1, -1):
        if a < last and a not in full and not torch_pads:
            continue
        b, e = full.get(a, (0, 0))
        torch_pads += [b, e]
        if a <= min(full):
            break
    # Drop trailing zero pairs so F.pad only touches the dims it must.
    while len(torch_pads) >= 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if not torch_pads:
        return x
    mode = m.attrs.get("mode", "constant")
    mode = {"edge": "replicate"}.get(mode, mode)
    if mode == "constant":
        return F.pad(x, torch_pads, value=value or 0.0)
    return F.pad(x, torch_pads, mode=mode)


def _pool_pads(
    m: FnOp, x: torch.Tensor, kernel: list[int], strides: list[int], dil: list[int]
) -> tuple[torch.Tensor, list[int]]:
    """ONNX pads/auto_pad → symmetric torch padding (asymmetric pads applied with F.pad)."""
    nd = len(kernel)
    auto = m.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), kernel, strides, dil, auto == "SAME_UPPER")
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(m.attrs.get("pads", [0] * (2 * nd)))
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return x, begin
    extra = []
    for b, e in zip(reversed(begin), reversed(end)):
        extra += [b, e]
    fill = float("-inf") if m.op == "MaxPool" else 0.0
    return F.pad(x, extra, value=fill), [0] * nd


def _same_pads(
    size: list[int], kernel: list[int], strides: list[int], dil: list[int], upper: bool
) -> list[int]:
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dil):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


def _maxpool(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    kernel = list(m.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(m.attrs.get("strides", [1] * nd))
    dil = list(m.attrs.get("dilations", [1] * nd))
    x, pads = _pool_pads(m, x, kernel, strides, dil)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return fn(x, kernel, strides, pads, dil, ceil_mode=bool(m.attrs.get("ceil_mode", 0)))


def _avgpool(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    kernel = list(m.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(m.attrs.get("strides", [1] * nd))
    include = bool(m.attrs.get("count_include_pad", 0))
    auto = m.attrs.get("auto_pad", "NOTSET")
    pads = list(m.attrs.get("pads", [0] * (2 * nd)))
    if auto == "NOTSET" and pads[:nd] == pads[nd:]:
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, kernel, strides, pads[:nd], bool(m.attrs.get("ceil_mode", 0)), include)
    # Asymmetric padding: pad explicitly and divide by the count of real elements.
    xp, _ = _pool_pads(m, x, kernel, strides, [1] * nd)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    out = fn(xp, kernel, strides, 0, bool(m.attrs.get("ceil_mode", 0)), True)
    if include:
        return out
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    onesp, _ = _pool_pads(m, ones, kernel, strides, [1] * nd)
    count = fn(onesp, kernel, strides, 0, bool(m.attrs.get("ceil_mode", 0)), True)
    return out / count


def _global_avg(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    nd = x.dim() - 2
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    return fn(x, 1)


def _global_max(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _reduce(kind: str) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        x = ins[0]
        axes = _axes_of(m, ins)
        keep = bool(m.attrs.get("keepdims", 1))
        if not axes:
            if m.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(_axis(a, x.dim()) for a in axes)
        if kind == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if kind == "max":
            return torch.amax(x, dim=dims, keepdim=keep)
        if kind == "min":
            return torch.amin(x, dim=dims, keepdim=keep)
        if kind == "prod":
            out = x
            for d in sorted(dims, reverse=True):
                out = out.prod(dim=d, keepdim=keep)
            return out
        if kind == "l2":
            return torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keep)
        if kind == "l1":
            return x.abs().sum(dim=dims, keepdim=keep)
        if kind == "sumsquare":
            return (x * x).sum(dim=dims, keepdim=keep)
        raise AssertionError(kind)

    return fn


def _argmax(kind: str) -> Callable[[FnOp, list[Any]], Any]:
    def fn(m: FnOp, ins: list[Any]) -> Any:
        x = ins[0]
        axis = m.attrs.get("axis", 0)
        keep = bool(m.attrs.get("keepdims", 1))
        f = torch.argmax if kind == "max" else torch.argmin
        return f(x, dim=axis, keepdim=keep)

    return fn


def _resize(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    if m.attrs.get("_upsample"):  # Upsample-7/9: scales input at position 1
        scales_in, sizes_in = ins[1] if len(ins) > 1 else m.attrs.get("scales"), None
    else:
        scales_in = ins[2] if len(ins) > 2 else None
        sizes_in = ins[3] if len(ins) > 3 else None
    nd = x.dim() - 2
    sizes = (
        [int(s) for s in _as_tensor(sizes_in).tolist()]
        if sizes_in is not None and _numel(sizes_in)
        else None
    )
    scales = (
        [float(s) for s in _as_tensor(scales_in).tolist()]
        if scales_in is not None and _numel(scales_in)
        else None
    )
    mode = m.attrs.get("mode", "nearest")
    ctm = m.attrs.get("coordinate_transformation_mode", "half_pixel")
    size = sizes[2:] if sizes else None
    sf = scales[2:] if scales else None
    if mode == "nearest":
        nearest = m.attrs.get("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=size, scale_factor=None if size else sf, mode="nearest")
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest in (
            "round_prefer_ceil",
            "round_prefer_floor",
        ):
            return F.interpolate(
                x, size=size, scale_factor=None if size else sf, mode="nearest-exact"
            )
        if ctm == "tf_half_pixel_for_nn":
            return F.interpolate(
                x, size=size, scale_factor=None if size else sf, mode="nearest-exact"
            )
        return F.interpolate(x, size=size, scale_factor=None if size else sf, mode="nearest")
    if mode == "linear" and ctm == "asymmetric" and nd == 2:
        out_hw = size or [math.floor(n * f) for n, f in zip(x.shape[2:], sf or [])]
        return _asymmetric_bilinear(x, [int(v) for v in out_hw])
    tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd] if mode == "linear" else "bicubic"
    align = ctm == "align_corners"
    # torch's default (recompute_scale_factor=None) matches ONNX half_pixel with the given scales
    return F.interpolate(
        x, size=size, scale_factor=None if size else sf, mode=tmode, align_corners=align
    )


def _asymmetric_bilinear(x: torch.Tensor, out_hw: list[int]) -> torch.Tensor:
    """Bilinear resize sampling source ``i · in / out`` (TF1's default ``ResizeBilinear``,
    ONNX ``asymmetric``), which ``F.interpolate`` has no mode for: separable, by gathers."""
    y = x
    for axis, n_out in zip((2, 3), out_hw):
        n_in = y.shape[axis]
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        shape = [1] * y.dim()
        shape[axis] = n_out
        frac = (src - lo).to(x.dtype).reshape(shape)
        y = y.index_select(axis, lo) * (1 - frac) + y.index_select(axis, hi) * frac
    return y


def _numel(v: Any) -> int:
    return int(v.numel() if isinstance(v, torch.Tensor) else np.asarray(v).size)


def _matmul(m: FnOp, ins: list[Any]) -> Any:
    a, b = ins[0], ins[1]
    if m.attrs.get("_adj_a"):  # TF BatchMatMul's adj_x / MatMul's transpose_a
        a = a.transpose(-1, -2)
    if m.attrs.get("_adj_b"):
        b = b.transpose(-1, -2)
    return torch.matmul(a, b)


def _gemm(m: FnOp, ins: list[Any]) -> Any:
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if m.attrs.get("transA", 0):
        a = a.t()
    if m.attrs.get("transB", 0):
        b = b.t()
    alpha, beta = m.attrs.get("alpha", 1.0), m.attrs.get("beta", 1.0)
    out = torch.matmul(a, b)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


def _einsum(m: FnOp, ins: list[Any]) -> Any:
    return torch.einsum(m.attrs["equation"], *ins)


def _dropout(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    p = _num(ins[1]) if len(ins) > 1 and ins[1] is not None else m.attrs.get("ratio", 0.5)
    # The training-mode input of the export says what the exporter ran; what the built
    # module runs follows its own train()/eval(), like nn.Dropout.
    return F.dropout(x, float(p or 0.0), m.training)


def _conv_fn(m: FnOp, ins: list[Any]) -> Any:
    """Convolution with a weight computed at run time (weight standardisation ...)."""
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(m.attrs.get("strides", [1] * nd))
    dil = list(m.attrs.get("dilations", [1] * nd))
    x, pads = _pool_pads(m, x, kernel, strides, dil)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, strides, pads, dil, m.attrs.get("group", 1))


def _instance_norm(m: FnOp, ins: list[Any]) -> Any:
    x, scale, bias = ins
    return F.instance_norm(x, weight=scale, bias=bias, eps=m.attrs.get("epsilon", 1e-5))


def _lrn(m: FnOp, ins: list[Any]) -> Any:
    a = m.attrs
    return F.local_response_norm(
        ins[0], a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    )


def _layer_norm_fn(m: FnOp, ins: list[Any]) -> Any:
    x = ins[0]
    scale = ins[1] if len(ins) > 1 else None
    bias = ins[2] if len(ins) > 2 else None
    axis = _axis(m.attrs.get("axis", -1), x.dim())
    return F.layer_norm(x, x.shape[axis:], scale, bias, m.attrs.get("epsilon", 1e-5))


def _not(m: FnOp, ins: list[Any]) -> Any:
    return torch.logical_not(ins[0])


def _identity(m: FnOp, ins: list[Any]) -> Any:
    return ins[0]


def _cumsum(m: FnOp, ins: list[Any]) -> Any:
    x, axis = ins
    return torch.cumsum(x, int(_as_tensor(axis)))


def _floor_div(m: FnOp, ins: list[Any]) -> Any:
    return torch.div(ins[0], ins[1], rounding_mode="floor")


def _squared_difference(m: FnOp, ins: list[Any]) -> Any:
    d = ins[0] - ins[1]
    return d * d


def _mod(m: FnOp, ins: list[Any]) -> Any:
    a, b = ins
    return torch.fmod(a, b) if m.attrs.get("fmod", 0) else torch.remainder(a, b)


def _bn_fn(m: FnOp, ins: list[Any]) -> Any:
    """BatchNormalization with statistics or affine terms computed at run time."""
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, m.attrs.get("epsilon", 1e-5))


FUNCTIONS: dict[str, Callable[[FnOp, list[Any]], Any]] = {
    "Add": _variadic(torch.add),  # TF's AddN imports as an Add of N inputs
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Mod": _mod,
    "FloorDiv": _floor_div,
    "SquaredDifference": _squared_difference,
    "Rsqrt": _unary(torch.rsqrt),
    "Square": _unary(torch.square),
    "Not": _not,
    "Relu": _unary(F.relu),
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Celu": _celu,
    "Selu": _selu,
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": _hardsigmoid,
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "SiLU": _silu,
    "Mish": _unary(F.mish),
    "Softplus": _softplus,
    "Softsign": _unary(F.softsign),
    "PRelu": _prelu,
    "Clip": _clip,
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Identity": _identity,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Concat": _concat,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "Tile": _tile,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Split": _split,
    "Slice": _slice,
    "Cast": _cast,
    "Where": _where,
    "Shape": _shape,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Trilu": _trilu,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Pad": _pad,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avg,
    "GlobalMaxPool": _global_max,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "ReduceProd": _reduce("prod"),
    "ReduceL2": _reduce("l2"),
    "ReduceL1": _reduce("l1"),
    "ReduceSumSquare": _reduce("sumsquare"),
    "ArgMax": _argmax("max"),
    "ArgMin": _argmax("min"),
    "Resize": _resize,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Dropout": _dropout,
    "InstanceNormalization": _instance_norm,
    "LRN": _lrn,
    "LayerNormalization": _layer_norm_fn,
    "CumSum": _cumsum,
    "Conv": _conv_fn,
    "BatchNormalization": _bn_fn,
}
# Input positions read as literals (shapes, axes, bounds): they never become buffers.
LITERAL_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Resize": (1, 2, 3),
    "Pad": (1, 2, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL2": (1,),
    "ReduceL1": (1,),
    "ReduceSumSquare": (1,),
    "Clip": (1, 2),
    "Dropout": (1, 2),
    "Gather": (1,),
    "GatherElements": (1,),
    "Trilu": (1,),
    "CumSum": (1,),
    "ConstantOfShape": (0,),
}
# Ops a builder makes into real nn layers when their weights are constants.
LAYER_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
     "GroupNormalization", "InstanceNormalization"}
)  # fmt: skip
SUPPORTED_OPS = frozenset(FUNCTIONS) | LAYER_OPS | {"Upsample"}


def op_name(node: Node) -> str:
    """The ONNX op a CG node runs (``source_op`` for ONNX-imported graphs)."""
    src = node.source_op or node.op
    return src.split("::")[-1] if src.startswith(("com.microsoft::", "ai.onnx::")) else src


def onnx_ops(cg: ComputeGraph) -> ComputeGraph:
    """``cg`` with every node's ``source_op`` the ONNX op it runs.

    ONNX imports already are; a TF graph (``source == "tf"``) keeps TF's op in
    ``source_op`` ("Conv2D", TF's ``Mean``, ``Split`` with the axis first) while
    the importer wrote ONNX semantics into ``op``, inputs and constants. Ops the
    TF importer did not know stay unbuildable as ``tf::Op`` (a TF ``Where`` is
    not ONNX's).
    """
    if cg.source != "tf":
        return cg
    unknown = set(cg.meta.get("unknown_ops", ()))
    nodes = [
        replace(n, source_op=f"tf::{n.source_op}" if n.source_op in unknown else n.op)
        for n in cg.nodes
    ]
    return replace(cg, nodes=nodes)


def unsupported_ops(cg: ComputeGraph) -> dict[str, int]:
    """Ops of ``cg`` that cannot be built, with their node counts."""
    cg = onnx_ops(cg)
    bad: dict[str, int] = {}
    for n in cg.nodes:
        if n.op == "Input":
            continue
        op = op_name(n)
        if op not in SUPPORTED_OPS:
            bad[op] = bad.get(op, 0) + 1
    return bad


def check_buildable(cg: ComputeGraph) -> None:
    """Raise one :class:`CGError` naming every op that cannot be built, or none."""
    if cg.nodes and not any(n.inputs for n in cg.nodes if n.op != "Input"):
        raise CGError(
            f"graph {cg.name or '(unnamed)'} has no operands to build from "
            "(its nodes record no input tensors; re-import it with this aiop)"
        )
    bad = unsupported_ops(cg)
    if bad:
        listed = ", ".join(sorted(bad))
        total = sum(bad.values())
        plural = "s" if total > 1 else ""
        raise CGError(f"cannot build a PyTorch module for op(s) {listed} ({total} node{plural})")


# -- weighted layers -------------------------------------------------------------------


class Conv(nn.Module):
    """Conv1d/2d/3d with ONNX's asymmetric ``pads``/``auto_pad`` applied by F.pad when needed."""

    def __init__(self, conv: nn.Module, pre_pad: list[int] | None) -> None:
        super().__init__()
        self.conv = conv
        self.pre_pad = pre_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad:
            x = F.pad(x, self.pre_pad)
        return self.conv(x)


def _conv_pads(
    spec: OpSpec, kernel: list[int], strides: list[int], dil: list[int]
) -> tuple[list[int], list[int] | None]:
    nd = len(kernel)
    auto = spec.attrs.get("auto_pad", "NOTSET")
    in_shape = spec.in_shape(0)
    if auto in ("SAME_UPPER", "SAME_LOWER") and len(in_shape) == nd + 2:
        pads = _same_pads(list(in_shape[2:]), kernel, strides, dil, auto == "SAME_UPPER")
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(spec.attrs.get("pads", [0] * (2 * nd)))
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return begin, None
    extra: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        extra += [b, e]
    return [0] * nd, extra


def build_conv(spec: OpSpec) -> nn.Module:
    if not spec.is_const(1) or (spec.present(2) and not spec.is_const(2)):
        return fn_op(spec, _conv_fn)
    w_shape = tuple(spec.const(1).shape)  # type: ignore[union-attr]
    nd = len(w_shape) - 2
    kernel = list(w_shape[2:])
    strides = list(spec.attrs.get("strides", [1] * nd))
    dil = list(spec.attrs.get("dilations", [1] * nd))
    groups = int(spec.attrs.get("group", 1))
    pads, pre = _conv_pads(spec, kernel, strides, dil)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    conv = cls(
        w_shape[1] * groups, w_shape[0], kernel, strides, pads, dil, groups, bias=spec.present(2)
    )
    set_param(conv, "weight", spec, 1, w_shape)
    if spec.present(2):
        set_param(conv, "bias", spec, 2)
    return Conv(conv, pre) if pre else conv


def build_conv_transpose(spec: OpSpec) -> nn.Module:
    w_shape = tuple(spec.const(1).shape) if spec.is_const(1) else None  # type: ignore[union-attr]
    if w_shape is None:
        raise CGError(f"{spec.node.name}: ConvTranspose with a computed weight is not supported")
    nd = len(w_shape) - 2
    kernel = list(spec.attrs.get("kernel_shape", w_shape[2:]))
    strides = list(spec.attrs.get("strides", [1] * nd))
    dil = list(spec.attrs.get("dilations", [1] * nd))
    groups = int(spec.attrs.get("group", 1))
    pads = list(spec.attrs.get("pads", [0] * (2 * nd)))
    out_pad = list(spec.attrs.get("output_padding", [0] * nd))
    begin, end = pads[:nd], pads[nd:]
    # torch pads both ends alike: pad by the smaller amount, crop the rest (TF's SAME at
    # stride 2 crops one row/column at the end)
    common = [min(b, e) for b, e in zip(begin, end)]
    crop = [(b - c, e - c) for b, e, c in zip(begin, end, common)]
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
    conv = cls(
        w_shape[0], w_shape[1] * groups, kernel, strides, common, out_pad, groups,
        bias=spec.present(2), dilation=dil,
    )  # fmt: skip
    set_param(conv, "weight", spec, 1, w_shape)
    if spec.present(2):
        set_param(conv, "bias", spec, 2)
    return CroppedConvTranspose(conv, crop) if any(any(c) for c in crop) else conv


class CroppedConvTranspose(nn.Module):
    """A transposed convolution with ONNX's asymmetric ``pads``: the output cropped per side
    (a view of the full output, which is what stays allocated)."""

    def __init__(self, conv: nn.Module, crop: list[tuple[int, int]]) -> None:
        super().__init__()
        self.conv = conv
        self.crop = crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for axis, (b, e) in enumerate(self.crop, start=2):
            if b or e:
                y = y.narrow(axis, b, y.shape[axis] - b - e)
        return y


class Linear(nn.Linear):
    """nn.Linear with ONNX Gemm's alpha/beta (1 for every PyTorch export)."""

    def __init__(self, k: int, n: int, bias: bool, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__(k, n, bias=bias)
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0 and self.beta == 1.0:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight) * self.alpha
        return out if self.bias is None else out + self.beta * self.bias


def build_gemm(spec: OpSpec) -> nn.Module:
    a = spec.attrs
    c_ok = not spec.present(2) or spec.is_param(2) or spec.is_const(2)
    if spec.is_const(0) or not spec.is_const(1) or a.get("transA", 0) or not c_ok:
        return fn_op(spec, _gemm)
    w_shape = tuple(spec.const(1).shape)  # type: ignore[union-attr]
    trans_b = bool(a.get("transB", 0))
    n, k = (w_shape[0], w_shape[1]) if trans_b else (w_shape[1], w_shape[0])
    c_shape = tuple(spec.const(2).shape) if spec.present(2) else ()  # type: ignore[union-attr]
    if spec.present(2) and math.prod(c_shape) != n:
        return fn_op(spec, _gemm)  # a bias that is not per output column
    lin = Linear(k, n, bias=spec.present(2), alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0))
    _set_linear_weight(lin, spec, 1, trans_b)
    if spec.present(2):
        set_param(lin, "bias", spec, 2, (n,))
    return lin


def _set_linear_weight(lin: nn.Linear, spec: OpSpec, pos: int, transposed: bool) -> None:
    """Linear's [N, K] weight from a [N, K] (transB) or [K, N] (MatMul) constant."""
    name = spec.name_at(pos)
    shared = spec.shared.get(name)
    if shared is not None and tuple(shared.shape) == tuple(lin.weight.shape):
        lin.weight = shared
        return
    t = spec.weight(pos) if spec.use_weights else None
    if t is not None:
        with torch.no_grad():
            lin.weight.copy_(t if transposed else t.t())
    spec.shared[name] = lin.weight


def build_matmul(spec: OpSpec, bias_pos: tuple[str, int] | None = None) -> nn.Module:
    """MatMul(x, W[K, N]) with a constant 2-D W → nn.Linear (weight W.T), fused with the
    following Add of a bias when ``bias_pos`` names it (torch's export of Linear on 3-D
    inputs), so autograd saves what nn.Linear saves."""
    if spec.is_const(0) or not spec.is_const(1) or len(spec.const(1).shape) != 2:  # type: ignore[union-attr]
        return fn_op(spec, _matmul)
    k, n = spec.const(1).shape  # type: ignore[union-attr]
    lin = Linear(k, n, bias=bias_pos is not None)
    _set_linear_weight(lin, spec, 1, transposed=False)
    return lin


def build_batchnorm(spec: OpSpec) -> nn.Module:
    if not all(spec.is_const(p) for p in range(1, 5)):
        return fn_op(spec, _bn_fn)
    c = int(math.prod(spec.const(1).shape))  # type: ignore[union-attr]
    rank = len(spec.in_shape(0)) or 4
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        rank, nn.BatchNorm2d
    )
    # ONNX weighs the old statistic (0.9 as float32); torch the new one (0.1)
    momentum = float(f"{1.0 - float(spec.attrs.get('momentum', 0.9)):.7g}")
    affine = spec.is_param(1) or spec.is_param(2)
    bn = cls(c, eps=_eps(spec.attrs), momentum=momentum, affine=affine)
    if affine:
        set_param(bn, "weight", spec, 1)
        set_param(bn, "bias", spec, 2)
    for pos, attr in ((3, "running_mean"), (4, "running_var")):
        t = spec.weight(pos) if spec.use_weights else None
        if t is not None:
            with torch.no_grad():
                getattr(bn, attr).copy_(t.reshape(-1))
    return bn


def build_layernorm(spec: OpSpec) -> nn.Module:
    shape = spec.in_shape(0)
    if not spec.is_const(1) or (spec.present(2) and not spec.is_const(2)) or not shape:
        return fn_op(spec, _layer_norm_fn)
    axis = _axis(int(spec.attrs.get("axis", -1)), len(shape))
    ln = nn.LayerNorm(tuple(shape[axis:]), eps=_eps(spec.attrs), bias=spec.present(2))
    set_param(ln, "weight", spec, 1)
    if spec.present(2):
        set_param(ln, "bias", spec, 2)
    return ln


class GroupNorm(nn.GroupNorm):
    """GroupNormalization-18 (scale/bias per group) or -21 (per channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def build_groupnorm(spec: OpSpec) -> nn.Module:
    shape = spec.in_shape(0)
    groups = int(spec.attrs["num_groups"])
    c = shape[1] if len(shape) > 1 else int(math.prod(spec.const(1).shape))  # type: ignore[union-attr]
    gn = GroupNorm(groups, c, eps=_eps(spec.attrs))
    for pos, attr in ((1, "weight"), (2, "bias")):
        t = spec.weight(pos) if spec.use_weights else None
        if t is not None:
            t = t.reshape(-1)
            if t.numel() == groups and groups != c:
                t = t.repeat_interleave(c // groups)
            with torch.no_grad():
                getattr(gn, attr).copy_(t)
    return gn


def build_instancenorm(spec: OpSpec) -> nn.Module:
    if not (spec.is_param(1) and spec.is_param(2)):
        return fn_op(spec, _instance_norm)
    shape = spec.in_shape(0)
    c = int(math.prod(spec.const(1).shape))  # type: ignore[union-attr]
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(
        len(shape), nn.InstanceNorm2d
    )
    norm = cls(c, eps=_eps(spec.attrs), affine=True)
    set_param(norm, "weight", spec, 1)
    set_param(norm, "bias", spec, 2)
    return norm


def build_generic(spec: OpSpec) -> FnOp:
    op = op_name(spec.node)
    if op == "Upsample":
        mod = fn_op(spec, _resize, literal=(1,))
        mod.attrs["_upsample"] = True
        return mod
    return fn_op(spec, FUNCTIONS[op], literal=LITERAL_INPUTS.get(op, ()))


BUILDERS: dict[str, Callable[[OpSpec], nn.Module]] = {
    "Conv": build_conv,
    "ConvTranspose": build_conv_transpose,
    "Gemm": build_gemm,
    "MatMul": build_matmul,
    "BatchNormalization": build_batchnorm,
    "LayerNormalization": build_layernorm,
    "GroupNormalization": build_groupnorm,
    "InstanceNormalization": build_instancenorm,
}
