"""CG → trainable PyTorch module (AIO-P's CG-to-PyTorch builder, for ONNX and TF graphs).

:func:`to_torch` builds one module per CG node (op implementations in
:mod:`aiop.cg.torch_ops`): weighted ops become real ``nn`` layers whose
parameters take the file's initializers (or are initialised when the graph
carries no weights, e.g. under ``FakeTensorMode`` for the meta profiler), and
training-mode behaviour (BatchNorm batch statistics, Dropout) follows the
module's ``train()``/``eval()`` as in the original framework.

Frozen TF graphs build the same way: their importer writes ONNX semantics
into ``Node.op``, the operands and ONNX-layout weights (see
:mod:`aiop.cg.tf_import`), and the module takes NCHW inputs like the CG says.

Three export patterns are fused back into the op the network ran, so that
autograd saves the same tensors as the original (memory fidelity):
``MatMul(x, W) + b`` → ``F.linear`` (torch's export of ``nn.Linear`` on 3-D
inputs), the Erf form of GELU → ``F.gelu``, and ``x * sigmoid(x)`` → ``F.silu``.

Structure: the built :class:`GraphModule` is a ``BlockNet`` look-alike,
``stem`` → ``blocks`` (an ``nn.ModuleList``) → ``head``. Block boundaries are
*cut points*: positions in topological order where exactly one activation is
live (graph inputs aside), so each block is single-tensor-in/out and the
profiler's gradient checkpointing and freezing work on any user graph. When the
parameter names say the graph came from an aiop ``BlockNet`` (``blocks.N.*``),
blocks follow the original's blocks and stem/head/other modules keep their
top-level names, so train methods (``last`` trains ``head``) select the same
parameters. Parameters are registered as ``<part>.<module path with dots as
underscores>.<leaf>``, in topological order.

Batch rule: a graph is usually built at batch 1 (``cg_batch``), and exporters
bake that batch into constants. At another batch: a Reshape's constant first
dim ``t0`` scales with its input's first dim (``t0 × now / at export``, when
whole: ``[1, -1]`` → ``[B, -1]``, ``[B·heads, n, d]`` keeps its heads; a copied
``0`` stays a copy); an Expand whose constant first dim equals ``cg_batch``
expands to the call's batch; a Concat (axis ≠ 0) of a constant folded at batch 1
(an expanded CLS token) with batch-B tensors expands the constant. At the
graph's own batch nothing changes.

Lifetimes (``lifetimes="locals"``, the default): intermediate tensors are
dropped when the original Python code would have dropped them, read from the
exporter's module scopes: an argument of a module call lives until the call
returns, a child module's result used by its parent's return expression (the
parent's last own op) lives until the parent returns, anything else dies after
its last use (``"last_use"`` for that everywhere). This is what makes the
rebuilt module's peak match the original's when a frozen backbone runs without
autograd (no saved tensors to dominate).

Parameters the original read as attributes of a module it never called
(``torch.cat([self.tokens.cls_token, x])``: the node's scope is not the
parameter's module) are owned by a holder module of that name that is never
called, so freezing, which counts parameterised modules in the order a forward
calls them, counts the same layers as on the original.

``make_batch``/``loss``: random inputs of the graph's shapes at any batch
(float inputs ~ N(0, 1); integer inputs uniform below the embedding table's
size); a single 2-D output of width K > 1 is a classifier (cross-entropy,
``num_classes`` = K); anything else trains toward zeros (MSE).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aiop.cg.graph import CGError, ComputeGraph, Node
from aiop.cg.lite import block_lite_spec
from aiop.cg.torch_ops import (
    BUILDERS,
    FnOp,
    OpSpec,
    Runtime,
    build_generic,
    build_matmul,
    check_buildable,
    onnx_ops,
    op_name,
    set_param,
    tensor_shapes,
    unsupported_ops,
)
from aiop.models.layers import LiteSpec

log = logging.getLogger(__name__)

__all__ = [
    "GraphModule",
    "check_buildable",
    "module_factory",
    "module_from_file",
    "to_torch",
    "unsupported_ops",
]

_FLOAT = ("float", "bfloat")


@dataclass
class _Step:
    """One executed op: the node it came from (possibly fused), its tensors, where it lives."""

    node: Node
    op: str
    inputs: list[str]  # runtime (non-constant) inputs, in the module's argument order
    outputs: list[str]
    consts: list[str] = field(default_factory=list)  # constant inputs (for labels)
    fused: list[Node] = field(default_factory=list)  # other nodes folded into this one
    container: str = ""
    attr: str = ""


# -- pattern fusion ---------------------------------------------------------------------


def _consumers(cg: ComputeGraph) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(cg.nodes):
        for t in n.inputs:
            if t:
                out.setdefault(t, []).append(i)
    return out


def _scalar(cg: ComputeGraph, name: str) -> float | None:
    c = cg.constants.get(name)
    if c is None or c.value is None or len(c.value) != 1:
        return None
    return float(c.value[0])


def _other(node: Node, name: str) -> str | None:
    """The other input of a binary node that has ``name`` at one position."""
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]


def fusions(cg: ComputeGraph) -> dict[int, tuple[str, list[int], dict[str, Any]]]:
    """Node index of the last node of a fused pattern → (op, all node indices, info)."""
    cons = _consumers(cg)
    nodes = cg.nodes
    outputs = {o.name for o in cg.outputs}
    fused: dict[int, tuple[str, list[int], dict[str, Any]]] = {}
    taken: set[int] = set()

    def only(name: str) -> int | None:
        c = cons.get(name, [])
        return c[0] if len(c) == 1 and name not in outputs else None

    for i, n in enumerate(nodes):
        if i in taken:
            continue
        op = op_name(n)
        if op == "MatMul" and len(n.inputs) == 2 and n.inputs[1] in cg.constants:
            w = cg.constants[n.inputs[1]]
            j = only(n.outputs[0])
            if len(w.shape) == 2 and n.inputs[0] not in cg.constants and j is not None:
                add = nodes[j]
                b = _other(add, n.outputs[0]) if op_name(add) == "Add" else None
                bc = cg.constants.get(b) if b else None
                if bc is not None and bc.param_names and math.prod(bc.shape) == w.shape[1]:
                    fused[j] = ("Linear", [i, j], {"bias": b})
                    taken |= {i, j}
        elif op == "Erf":
            # GELU's Erf form: x / sqrt(2) → Erf → + 1 → × x → × 0.5 (either order).
            div = next((k for k, m in enumerate(nodes) if n.inputs[0] in m.outputs), None)
            if div is None or div in taken:
                continue
            d = nodes[div]
            sqrt2 = math.sqrt(2.0)
            if op_name(d) == "Div" and abs((_scalar(cg, d.inputs[1]) or 0) - sqrt2) < 1e-3:
                x = d.inputs[0]
            elif op_name(d) == "Mul":
                x = next(
                    (t for t in d.inputs if t in cg.constants and
                     abs((_scalar(cg, t) or 0) - 1 / sqrt2) < 1e-4), None,
                )  # fmt: skip
                x = _other(d, x) if x else None
            else:
                x = None
            if x is None or only(d.outputs[0]) != i:
                continue
            a = only(n.outputs[0])
            if a is None or op_name(nodes[a]) != "Add":
                continue
            one = _other(nodes[a], n.outputs[0])
            if one is None or _scalar(cg, one) != 1.0:
                continue
            m1 = only(nodes[a].outputs[0])
            if m1 is None or op_name(nodes[m1]) != "Mul":
                continue
            o1 = _other(nodes[m1], nodes[a].outputs[0])
            m2 = only(nodes[m1].outputs[0])
            if m2 is None or op_name(nodes[m2]) != "Mul":
                continue
            o2 = _other(nodes[m2], nodes[m1].outputs[0])
            if {o1, o2} != {x, o2 if o1 == x else o1} or not (
                (o1 == x and _scalar(cg, o2 or "") == 0.5)
                or (o2 == x and _scalar(cg, o1 or "") == 0.5)
            ):
                continue
            fused[m2] = ("Gelu", [div, i, a, m1, m2], {"x": x})
            taken |= {div, i, a, m1, m2}
        elif op == "Sigmoid":
            j = only(n.outputs[0])
            if j is None or op_name(nodes[j]) != "Mul":
                continue
            if _other(nodes[j], n.outputs[0]) == n.inputs[0] and n.inputs[0] not in cg.constants:
                fused[j] = ("SiLU", [i, j], {"x": n.inputs[0]})
                taken |= {i, j}
    return fused


def _plan_steps(cg: ComputeGraph) -> list[_Step]:
    fused = fusions(cg)
    inner = {k for _, idx, _ in fused.values() for k in idx}
    steps: list[_Step] = []
    for i, n in enumerate(cg.nodes):
        if n.op == "Input":
            continue
        if i in fused:
            kind, idx, info = fused[i]
            first = cg.nodes[idx[0]]
            members = [cg.nodes[k] for k in idx]
            if kind == "Linear":
                node = replace(first, op="MatMul", outputs=list(n.outputs))
                consts = [first.inputs[1], info["bias"]]
                steps.append(
                    _Step(node, "Linear", [first.inputs[0]], list(n.outputs), consts, members)
                )
            else:
                node = replace(
                    n, op=kind, source_op=kind, inputs=[info["x"]], attrs={}, name=first.name
                )
                steps.append(_Step(node, kind, [info["x"]], list(n.outputs), [], members))
            continue
        if i in inner:
            continue
        rt_inputs = [t for t in n.inputs if t and t not in cg.constants]
        consts = [t for t in n.inputs if t and t in cg.constants]
        steps.append(_Step(n, op_name(n), rt_inputs, [o for o in n.outputs], consts))
    return steps


def _resolve_missing(cg: ComputeGraph, steps: list[_Step]) -> list[_Step]:
    """Operands the importer could not keep: an Expand to a computed shape (``F.normalize``
    exports Expand(norm, Shape(x))) becomes the identity, its consumer broadcasting
    instead; any other missing operand is an error."""
    have = {s.name for s in cg.inputs} | set(cg.constants)
    missing: list[str] = []
    for k, s in enumerate(steps):
        lost = [t for t in s.inputs if t not in have]
        if lost and s.op == "Expand" and s.node.inputs[1:] == lost:
            node = replace(s.node, op="Identity", source_op="Identity", inputs=s.node.inputs[:1])
            steps[k] = replace(s, node=node, op="Identity", inputs=s.inputs[:1])
        elif lost:
            missing.append(f"{lost[0]} of {s.node.name}")
        have |= {o for o in s.outputs if o}
    if missing:
        raise CGError(
            f"graph {cg.name or '(unnamed)'} lacks {len(missing)} operand(s) to build from, "
            f"e.g. {missing[0]}"
        )
    return steps


# -- partition into stem / blocks / head -------------------------------------------------


def _label(param: str) -> str:
    parts = param.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return f"blocks.{parts[1]}"
    return parts[0] if len(parts) > 1 else ""


_CLEAN = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+$")
_BUFFER_POS = {"BatchNormalization": (3, 4)}


def _step_params(cg: ComputeGraph, step: _Step) -> list[str]:
    """Learned parameters a step reads, by name (the constant's own name when it is one:
    eval exports share equal-valued initializers, so origins can name another layer)."""
    names: list[str] = []
    skip = {step.node.inputs[p] for p in _BUFFER_POS.get(step.op, ()) if p < len(step.node.inputs)}
    for c in step.consts:
        const = cg.constants.get(c)
        if const is None or c in skip or not const.param_names:
            continue
        if not const.dtype.startswith(_FLOAT):
            continue
        own = [c] if _CLEAN.match(c) else const.param_names
        names += [p for p in own if p not in names]
    return names


def _step_label(cg: ComputeGraph, step: _Step) -> str:
    """Top-level module of a step: from its parameters, else the exporter's scope."""
    params = _step_params(cg, step)
    if params:
        return _label(params[0])
    scope = (step.fused[0] if step.fused else step.node).scope
    first = scope.split("/")[0] if scope else ""
    if re.fullmatch(r"blocks\.\d+", first):
        return first
    first = first.split(".")[0]
    return first if first.isidentifier() else ""


def _cut_points(cg: ComputeGraph, steps: list[_Step]) -> list[int]:
    """Step positions p (0 < p < len) before which exactly one float activation is live."""
    graph_inputs = {s.name for s in cg.inputs}
    outputs = {o.name for o in cg.outputs}
    last_use: dict[str, int] = {}
    for k, s in enumerate(steps):
        for t in s.inputs:
            last_use[t] = k
    for t in outputs:
        last_use[t] = len(steps)
    dtype = {o: d for s in steps for o, d in zip(s.node.outputs, s.node.output_dtypes)}
    live: set[str] = set()
    cuts: list[int] = []
    for k, s in enumerate(steps):
        if k > 0 and len(live) == 1:
            (t,) = live
            if dtype.get(t, "float32").startswith(_FLOAT) and t not in outputs:
                cuts.append(k)
        live = {t for t in live if last_use.get(t, -1) > k}
        live |= {o for o in s.outputs if o and last_use.get(o, -1) > k and o not in graph_inputs}
    return cuts


def _partition(cg: ComputeGraph, steps: list[_Step]) -> tuple[list[int], bool]:
    """Step ranges as boundaries [0, b1, ..., n]: pre = first range, post = last, blocks between.

    Returns (bounds, blocknet) where blocknet says the labels follow an aiop BlockNet.
    """
    n = len(steps)
    cuts = _cut_points(cg, steps)
    bounds = [0, *cuts, n]
    atoms = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    labels = []
    for a, b in atoms:
        labels.append({lab for s in steps[a:b] if (lab := _step_label(cg, s))})
    blocknet = any(lab.startswith("blocks.") for labs in labels for lab in labs)
    # Unlabelled atoms join the atom before them (the first joins the next).
    groups: list[tuple[int, int, str | None]] = []
    for (a, b), labs in zip(atoms, labels):
        key = None if not labs else (next(iter(labs)) if len(labs) == 1 else f"mixed{a}")
        has_params = any(_step_params(cg, s) for s in steps[a:b])
        if not blocknet:
            key = f"atom{a}" if has_params else None  # each parameterised atom: a group
        if groups and (key is None or groups[-1][2] == key or groups[-1][2] is None):
            ga, _, gkey = groups[-1]
            groups[-1] = (ga, b, gkey if key is None else key)
        else:
            groups.append((a, b, key))
    if blocknet:
        idx = [k for k, g in enumerate(groups) if g[2] and g[2].startswith("blocks.")]
        first, last = idx[0], idx[-1]
        if groups[first][0] == 0 and first < last:
            first += 1  # the blocks need a stem to hand them a single tensor
        if groups[first][0] == 0:
            return [0, 0, n], True
        post_start = groups[last][1]
        inner = [g[0] for g in groups[first : last + 1]]
        return [0, *inner, post_start, n], True
    if len(groups) == 1:
        return [0, 0, n], False  # everything is the head (train method "last" still trains)
    if len(groups) == 2:
        return [0, groups[1][0], n], False
    return [0, *(g[0] for g in groups[1:]), n], False


# -- the built module -----------------------------------------------------------------------


_RESERVED = frozenset(dir(nn.Module)) | {
    "blocks", "runtime", "input_size", "num_classes", "make_batch", "loss", "forward",
    "example_input_shape", "graph_name", "feature_indices",
}  # fmt: skip


def _sanitize(text: str) -> str:
    s = re.sub(r"\W", "_", text).strip("_")
    return s if s and not s[0].isdigit() else f"m_{s}"


class _Part(nn.Module):
    """Runs a range of steps; blocks are single-tensor-in/out (checkpointable)."""

    def __init__(self) -> None:
        super().__init__()
        self._plan: list[tuple[str, str, list[str], list[str], list[str]]] = []
        self._in: str = ""
        self._out: str = ""
        self._runtime: Runtime | None = None
        self._lite: LiteSpec | None = None

    def lite_spec(self) -> LiteSpec | None:
        """What TinyTL's lite residual needs, read from the graph (see :func:`block_lite_spec`)."""
        return self._lite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self._in: x}
        _execute(self, self._plan, env, self._runtime)
        return env[self._out]


def _execute(
    root: nn.Module,
    plan: list[tuple[str, str, list[str], list[str], list[str]]],
    env: dict[str, Any],
    runtime: Runtime | None,
) -> None:
    """Run steps (container, attr, inputs, outputs, freed-after) against ``env``, in place."""
    extra = runtime.inputs if runtime is not None else {}
    for container, attr, ins, outs, free in plan:
        mod = getattr(getattr(root, container), attr) if container else getattr(root, attr)
        args = [env[t] if t in env else extra[t] for t in ins]
        if isinstance(mod, FnOp):
            y = mod(*args)
        else:
            y = mod(args[0])
        if isinstance(y, tuple):
            for o, v in zip(outs, y):
                if o:
                    env[o] = v
        else:
            env[outs[0]] = y
            if len(outs) > 1 and isinstance(mod, nn.modules.batchnorm._BatchNorm):
                # Training-mode BatchNormalization's extra outputs: the updated statistics.
                for o, buf in zip(outs[1:3], (mod.running_mean, mod.running_var)):
                    if o:
                        env[o] = buf
        for t in free:
            env.pop(t, None)


class GraphModule(nn.Module):
    """A trainable module built from a :class:`ComputeGraph`: ``head(blocks(stem(inputs)))``.

    ``forward(*inputs)`` returns the graph's outputs (a tensor when there is
    one). ``make_batch``, ``loss``, ``input_size``, ``num_classes`` and
    ``example_input_shape`` follow :class:`aiop.models.base.BlockNet`, so the
    profiler and the training code treat it like a zoo model.
    """

    feature_indices: tuple[int, ...] = ()

    def __init__(self, cg: ComputeGraph) -> None:
        super().__init__()
        self.graph_name = cg.name
        self.stem = nn.Module()
        self.blocks = nn.ModuleList()
        self.head = nn.Module()
        self._input_names = [s.name for s in cg.inputs]
        self._input_specs = [(tuple(s.shape), s.dtype) for s in cg.inputs]
        self._output_names = [o.name for o in cg.outputs]
        self._output_shapes = [tuple(o.shape) for o in cg.outputs]
        first = cg.inputs[0].shape if cg.inputs else ()
        self.runtime = Runtime(int(first[0]) if first else None)
        self._pre: list[tuple[str, str, list[str], list[str], list[str]]] = []
        self._post: list[tuple[str, str, list[str], list[str], list[str]]] = []
        self._pre_out = ""
        self._post_in = ""
        self._blocks_read_inputs = False
        self.input_size: tuple[int, ...] = tuple(int(d) for d in first[1:])
        self._vocab: dict[str, int] = {}
        self._loss_fn: Callable[..., torch.Tensor] | None = None
        out = self._output_shapes[0] if len(self._output_shapes) == 1 else ()
        self._classifier = len(out) == 2 and out[1] > 1
        self.num_classes = int(out[1]) if self._classifier else 0

    # -- running -----------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self._input_names):
            raise CGError(
                f"{self.graph_name or 'graph'} takes {len(self._input_names)} input(s), "
                f"got {len(inputs)}"
            )
        env: dict[str, Any] = dict(zip(self._input_names, inputs))
        rt = self.runtime
        rt.batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else rt.cg_batch
        rt.inputs = dict(env)
        _execute(self, self._pre, env, rt)
        if self._pre_out:
            x = env.pop(self._pre_out)
            env.clear()  # the stem's locals end with it
            for block in self.blocks:
                x = block(x)
            env = {self._post_in: x}
        _execute(self, self._post, env, rt)
        outs = tuple(env[o] if o in env else rt.inputs[o] for o in self._output_names)
        if not self._blocks_read_inputs:
            rt.inputs = {}
        return outs[0] if len(outs) == 1 else outs

    # -- what a training step needs (BlockNet's contract) -----------------------------
    def example_input_shape(
        self, batch_size: int, resolution: int | None = None
    ) -> tuple[int, ...]:
        shape = (batch_size, *self.input_size)
        if resolution is not None and len(shape) == 4:
            shape = (*shape[:2], resolution, resolution)
        return shape

    def make_batch(
        self,
        batch_size: int,
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Random inputs of the graph's shapes at ``batch_size`` and matching targets."""
        inputs = []
        for k, (name, (shape, dtype)) in enumerate(zip(self._input_names, self._input_specs)):
            full = (batch_size, *shape[1:]) if shape else ()
            if k == 0 and resolution is not None and len(full) == 4:
                full = (*full[:2], resolution, resolution)
            if dtype.startswith(_FLOAT):
                inputs.append(torch.randn(full, generator=generator, device=device))
            elif dtype == "bool":
                inputs.append(torch.randint(0, 2, full, generator=generator, device=device).bool())
            else:
                high = self._vocab.get(name, 2)
                t = torch.randint(0, high, full, generator=generator, device=device)
                inputs.append(t.to(getattr(torch, dtype, torch.int64)))
        if self._classifier:
            y = torch.randint(
                0, self.num_classes, (batch_size,), generator=generator, device=device
            )
        else:
            y = torch.zeros((), device=device)
        return tuple(inputs), y

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for a classifier output, else mean squared output (MSE to zeros)."""
        if self._loss_fn is not None:
            return self._loss_fn(outputs, targets)
        if self._classifier:
            return F.cross_entropy(outputs, targets)
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        floats = [o for o in outs if o.is_floating_point()]
        total = floats[0].pow(2).mean()
        for o in floats[1:]:
            total = total + o.pow(2).mean()
        return total


# -- building ---------------------------------------------------------------------------


def _fake_mode_active() -> bool:
    try:
        from torch._guards import active_fake_mode

        return active_fake_mode() is not None
    except ImportError:  # pragma: no cover - older torch
        return False


def to_torch(
    cg: ComputeGraph,
    weights: str = "auto",
    *,
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    lifetimes: str = "locals",
) -> GraphModule:
    """Build a trainable :class:`GraphModule` computing ``cg``.

    ``weights``: ``"auto"`` takes each constant's value from ``cg.weights`` when
    present and initialises the rest (and everything under ``FakeTensorMode``);
    ``"file"`` requires every weight; ``"init"`` initialises all (no data
    touched). ``loss`` replaces the default loss; ``lifetimes`` says when
    intermediate tensors are dropped (both: see the module docstring).
    Raises :class:`CGError` naming every op that cannot be built.
    """
    if weights not in ("auto", "file", "init"):
        raise CGError(f"weights must be 'auto', 'file' or 'init', not {weights!r}")
    if lifetimes not in ("locals", "last_use"):
        raise CGError(f"lifetimes must be 'locals' or 'last_use', not {lifetimes!r}")
    check_buildable(cg)
    cg = onnx_ops(cg)
    if not cg.inputs:
        raise CGError(f"graph {cg.name or '(unnamed)'} has no inputs to build a module from")
    if weights == "file":
        missing = [k for k, c in cg.constants.items() if c.value is None and k not in cg.weights]
        if missing:
            raise CGError(
                f"graph {cg.name or '(unnamed)'} lacks the values of {len(missing)} weight(s), "
                f"e.g. {missing[0]}: load them (ComputeGraph.load_weights) or use weights='init'"
            )
    use_weights = weights != "init" and not _fake_mode_active()
    steps = _resolve_missing(cg, _plan_steps(cg))
    if not steps:
        raise CGError(f"graph {cg.name or '(unnamed)'} has no operations to build")
    module = GraphModule(cg)
    module._loss_fn = loss
    rt = module.runtime
    shared: dict[str, nn.Parameter] = {}
    shapes = tensor_shapes(cg)
    opset = int(cg.meta.get("opset", 17) or 17)
    built: list[nn.Module] = []
    for step in steps:
        spec = OpSpec(step.node, cg, rt, use_weights, shared, shapes)
        mod = _build_step(spec, step, opset)
        built.append(mod)
        for pos, t in enumerate(step.node.inputs):  # vocabulary of integer inputs
            if t in module._input_names and op_name(step.node) == "Gather" and pos == 1:
                rows = spec.in_shape(0)
                if rows:
                    module._vocab[t] = int(rows[0])
    bounds, blocknet = _partition(cg, steps)
    _assemble(module, cg, steps, built, bounds, blocknet, lifetimes)
    n_params = sum(p.numel() for p in module.parameters())
    log.debug(
        "built %s: %d steps, %d blocks, %d parameters",
        cg.name, len(steps), len(module.blocks), n_params,
    )  # fmt: skip
    return module


def _build_step(spec: OpSpec, step: _Step, opset: int) -> nn.Module:
    op = step.op
    if op == "Linear":
        matmul = step.fused[0]
        add = step.fused[1]
        mspec = replace(spec, node=matmul)
        lin = build_matmul(mspec, bias_pos=("bias", 0))
        aspec = replace(spec, node=add)
        pos = add.inputs.index(step.consts[1])
        set_param(lin, "bias", aspec, pos, (lin.out_features,))
        return lin
    if op in ("Gelu", "SiLU"):
        return build_generic(spec)
    builder = BUILDERS.get(op)
    mod = builder(spec) if builder is not None else build_generic(spec)
    if isinstance(mod, FnOp):
        if op in ("Softmax", "LogSoftmax"):
            mod.attrs["_opset"] = opset
        elif op == "Reshape":
            shape = spec.in_shape(0)
            mod.attrs["_cg_in0"] = int(shape[0]) if shape else None
        elif op == "Split":
            mod.attrs["_n_out"] = len(step.outputs)
    elif step.inputs and len(step.inputs) != 1:
        raise CGError(f"{step.node.name}: {op} with {len(step.inputs)} computed inputs")
    return mod


def _assemble(
    module: GraphModule,
    cg: ComputeGraph,
    steps: list[_Step],
    built: list[nn.Module],
    bounds: list[int],
    blocknet: bool,
    lifetimes: str = "locals",
) -> None:
    n = len(steps)
    pre_end, post_start = bounds[1], bounds[-2]
    if len(bounds) == 2:  # a single range: all head
        pre_end, post_start = 0, 0
    last_use: dict[str, int] = {}
    for k, s in enumerate(steps):
        for t in s.inputs:
            last_use[t] = k
    keep = set(module._output_names)
    used_names: dict[int, set[str]] = {}

    release = _release_points(steps, last_use, lifetimes)

    def free_after(k: int, lo: int, hi: int) -> list[str]:
        s = steps[k]
        out = [t for t in s.inputs if release.get(t) == k and t not in keep]
        out += [o for o in s.outputs if o and o not in last_use and o not in keep]
        out += freed_at.get(k, [])
        return out

    freed_at: dict[int, list[str]] = {}
    for t, k in release.items():
        if k != last_use.get(t) and t not in keep:
            freed_at.setdefault(k, []).append(t)

    borrowed = _attribute_params(cg, steps, built)

    def name_for(k: int, holder: nn.Module, strip: str) -> str:
        s = steps[k]
        params = [p for p in _step_params(cg, s) if p not in borrowed.get(k, {})]
        base = ""
        if params:
            path = params[0].rsplit(".", 1)[0] if "." in params[0] else ""
            if strip and (path == strip or path.startswith(strip + ".")):
                path = path[len(strip) :].lstrip(".")
            base = _sanitize(path) if path else ""
        if not base:
            base = f"{s.op.lower()}_{k}"
        taken = used_names.setdefault(id(holder), set())
        name, i = base, 2
        while name in taken or (holder is module and name in _RESERVED):
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def container_for(k: int, default: str) -> tuple[nn.Module, str, str]:
        if blocknet:
            label = _step_label(cg, steps[k])
            if (
                label
                and not label.startswith("blocks.")
                and label.isidentifier()
                and (label in ("stem", "head") or label not in _RESERVED)
            ):
                holder = getattr(module, label, None)
                if holder is None:
                    holder = nn.Module()
                    module.add_module(label, holder)
                if isinstance(holder, nn.Module) and not isinstance(holder, nn.ModuleList):
                    return holder, label, label
        return getattr(module, default), default, default if blocknet else ""

    def region(
        lo: int, hi: int, default: str
    ) -> list[tuple[str, str, list[str], list[str], list[str]]]:
        plan = []
        for k in range(lo, hi):
            holder, cname, strip = container_for(k, default)
            first_use.setdefault(cname, k)
            attr = name_for(k, holder, strip)
            holder.add_module(attr, built[k])
            s = steps[k]
            plan.append((cname, attr, s.inputs, s.outputs, free_after(k, lo, hi)))
        return plan

    first_use: dict[str, int] = {}
    shapes = tensor_shapes(cg)
    module._pre = region(0, pre_end, "stem")
    graph_inputs = set(module._input_names)
    for b in range(1, len(bounds) - 2):
        lo, hi = bounds[b], bounds[b + 1]
        if lo >= hi:
            continue
        part = _Part()
        part._runtime = module.runtime
        idx = len(module.blocks)
        module.blocks.append(part)
        strip = f"blocks.{idx}" if blocknet else ""
        for k in range(lo, hi):
            params = _step_params(cg, steps[k])
            own = _label(params[0]) if params else ""
            attr = name_for(k, part, own if own.startswith("blocks.") else strip)
            part.add_module(attr, built[k])
            s = steps[k]
            if any(t in graph_inputs for t in s.inputs):
                module._blocks_read_inputs = True
            part._plan.append(("", attr, s.inputs, s.outputs, free_after(k, lo, hi)))
        part._in = _live_at(steps, lo, last_use, keep)
        part._out = _live_at(steps, hi, last_use, keep)
        if blocknet:
            part._lite = block_lite_spec(
                [n for s in steps[lo:hi] for n in (s.node, *s.fused)],
                shapes.get(part._in),
                shapes.get(part._out),
            )
    if pre_end > 0 or len(module.blocks):
        module._pre_out = _live_at(steps, max(pre_end, 1), last_use, keep) if pre_end else ""
        if not pre_end:
            raise CGError("internal: blocks without a stem")  # pragma: no cover
        module._post_in = _live_at(steps, post_start, last_use, keep)
    module._post = region(post_start, n, "head")
    first_use.setdefault("blocks", bounds[1])
    _register_holders(module, built, borrowed, blocknet, used_names, first_use)
    # Top-level modules in the order the graph first uses them: the registration order of
    # the original (aiop's __init__s define layers in forward order), which is where
    # never-called modules rank in forward_order.
    order = sorted(module._modules, key=lambda name: first_use.get(name, n))
    module._modules = {name: module._modules[name] for name in order}


def _attribute_params(
    cg: ComputeGraph, steps: list[_Step], built: list[nn.Module]
) -> dict[int, dict[str, str]]:
    """Parameters the original read as attributes of a module it never called.

    Step index → {parameter name → FnOp attribute}. The exporter's scope says
    which module's code ran a node: a parameter ``a.b.leaf`` used by a node whose
    scope is not ``a.b`` (or inside it), e.g. CLIP's ``stem.tokens.cls_token`` in
    ``stem``'s code, belongs to a module the original never called. Needs the
    module scopes and dotted parameter names of a PyTorch export; empty otherwise.
    """
    out: dict[int, dict[str, str]] = {}
    if not _scopes_name_modules(cg, steps):
        return out
    for k, (s, mod) in enumerate(zip(steps, built)):
        if not isinstance(mod, FnOp) or not mod.param_consts:
            continue
        scope = (s.fused[-1] if s.fused else s.node).scope.replace("/", ".")
        for attr, cname in mod.param_consts.items():
            const = cg.constants.get(cname)
            names = [cname] if _CLEAN.match(cname) else (const.param_names if const else [])
            if len(names) != 1 or not _CLEAN.match(names[0]):
                continue
            path = names[0].rsplit(".", 1)[0]
            if scope == path or scope.startswith(path + "."):
                continue
            out.setdefault(k, {})[names[0]] = attr
    return out


def _scopes_name_modules(cg: ComputeGraph, steps: list[_Step]) -> bool:
    """Whether node scopes follow parameter names (``a/b`` runs module ``a.b``): true of
    TorchScript-style exports, where most weighted nodes sit in their module's scope."""
    hits = total = 0
    for s in steps:
        params = [p for p in _step_params(cg, s) if _CLEAN.match(p)]
        if not params:
            continue
        total += 1
        scope = (s.fused[-1] if s.fused else s.node).scope.replace("/", ".")
        path = params[0].rsplit(".", 1)[0]
        hits += scope == path or scope.startswith(path + ".")
    return total > 0 and hits * 2 > total


def _register_holders(
    module: GraphModule,
    built: list[nn.Module],
    borrowed: dict[int, dict[str, str]],
    blocknet: bool,
    used_names: dict[int, set[str]],
    first_use: dict[str, int],
) -> None:
    """Give each borrowed parameter an owner named after the original module (never called)."""
    holders: dict[str, nn.Module] = {}
    for k in sorted(borrowed):
        mod = built[k]
        assert isinstance(mod, FnOp)
        for pname, attr in borrowed[k].items():
            path, leaf = pname.rsplit(".", 1)
            holder = holders.get(path)
            if holder is None:
                holder = holders[path] = _new_holder(module, path, blocknet, used_names)
                first_use.setdefault(path.split(".")[0], k)
            param = getattr(mod, attr)
            if leaf not in holder._parameters:
                holder.register_parameter(leaf, param)
            mod.borrow(attr, holder, leaf)


def _new_holder(
    module: GraphModule, path: str, blocknet: bool, used_names: dict[int, set[str]]
) -> nn.Module:
    parts = path.split(".")
    parent: nn.Module = module
    rest = parts
    if blocknet and len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        if int(parts[1]) < len(module.blocks):
            parent, rest = module.blocks[int(parts[1])], parts[2:]
    elif len(parts) > 1 and (parts[0] in ("stem", "head") or parts[0] not in _RESERVED):
        child = getattr(module, parts[0], None) if parts[0].isidentifier() else None
        if child is None and parts[0].isidentifier() and parts[0] not in _RESERVED:
            child = nn.Module()
            module.add_module(parts[0], child)
        if isinstance(child, nn.Module) and not isinstance(child, nn.ModuleList):
            parent, rest = child, parts[1:]
    base = _sanitize("_".join(rest)) if rest else "params"
    taken = used_names.setdefault(id(parent), set())
    name, i = base, 2
    while name in taken or hasattr(parent, name) or (parent is module and name in _RESERVED):
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    holder = nn.Module()
    parent.add_module(name, holder)
    return holder


def _release_points(steps: list[_Step], last_use: dict[str, int], lifetimes: str) -> dict[str, int]:
    """Step after which each activation is dropped.

    ``last_use``: right after its last consumer. ``locals`` (default) follows how
    Python held it in the original network, read from the exporter's module
    scopes: a tensor handed into a module call stays referenced by the caller
    until that call returns (``y = self.depthwise(y)`` keeps the old ``y`` while
    the depthwise block runs), and a tensor a module's own code receives from a
    child module and uses in its return expression (its last own op) is a local
    of that module until it returns (``out = self.conv3(...)``; ``identity =
    self.downsample(x)``; ``return self.act(out + identity)``). One used by an
    earlier own op is a temporary (``x = x + self.attn(self.norm1(x))``) and
    dies at its last use.
    """
    release = dict(last_use)
    if lifetimes == "last_use":
        return release
    scopes = [tuple(p for p in (s.fused[-1] if s.fused else s.node).scope.split("/") if p)
              for s in steps]  # fmt: skip
    end: dict[tuple[str, ...], int] = {}
    for k, sc in enumerate(scopes):
        for i in range(1, len(sc) + 1):
            end[sc[:i]] = k
    own_last = {sc: k for k, sc in enumerate(scopes)}  # c's last op in c's own code
    producer = {o: k for k, s in enumerate(steps) for o in s.outputs if o}
    for k, s in enumerate(steps):
        c = scopes[k]
        for t in s.inputs:
            j = producer.get(t)
            if j is None:
                continue
            p = scopes[j]
            i = 0
            while i < min(len(p), len(c)) and p[i] == c[i]:
                i += 1
            if i < len(c):  # an argument of the call to module c[:i+1]
                hold = end.get(c[: i + 1], k)
            elif len(p) > len(c) and own_last.get(c) == k:
                # A child's result used by c's return expression: a named local
                # (``out``, ``identity`` in ``return self.act(out + identity)``)
                # lives until c returns. Used earlier, it is a temporary
                # (``x = x + self.attn(...)``) or rebound, and dies at its last use.
                hold = end.get(c, k)
            else:
                continue
            release[t] = max(release.get(t, k), hold)
    return release


def _live_at(steps: list[_Step], p: int, last_use: dict[str, int], keep: set[str]) -> str:
    """The one activation live before step ``p`` (a cut point)."""
    produced = [o for s in steps[:p] for o in s.outputs if o]
    live = [t for t in produced if last_use.get(t, -1) >= p or t in keep]
    if len(live) != 1:
        raise CGError(f"internal: {len(live)} tensors live at cut {p}")  # pragma: no cover
    return live[0]


# -- files ---------------------------------------------------------------------------------


def _graph_from_file(path: str | Path, input_shape: Sequence[int] | None) -> ComputeGraph:
    path = Path(path)
    if not path.is_file():
        raise CGError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from aiop.cg.onnx_import import from_onnx

        return from_onnx(path, input_shape)
    if suffix == ".pb":
        from aiop.cg.tf_import import from_tf_pb

        cg = from_tf_pb(path, input_shape=input_shape)
        if not any(n.inputs for n in cg.nodes if n.op != "Input"):
            raise CGError(
                f"{path}: the graph has no operands to build from "
                "(the TF importer recorded no node inputs)"
            )
        return cg
    raise CGError(
        f"{path}: cannot build a module from a {suffix or 'suffix-less'} file (.onnx or .pb)"
    )


def module_from_file(
    path: str | Path, input_shape: Sequence[int] | None = None, weights: str = "auto"
) -> GraphModule:
    """Build the module of an ONNX (``from_onnx``) or TF ``.pb`` (``from_tf_pb``) file."""
    return to_torch(_graph_from_file(path, input_shape), weights)


def module_factory(
    model: str | Path | ComputeGraph, input_shape: Sequence[int] | None = None
) -> Callable[[], GraphModule]:
    """A factory for :func:`aiop.profiler.profile`: the graph is read (and checked) once;
    each call builds a fresh module (initialised, not loaded, under ``FakeTensorMode``)."""
    cg = model if isinstance(model, ComputeGraph) else _graph_from_file(model, input_shape)
    check_buildable(cg)

    def factory() -> GraphModule:
        return to_torch(cg)

    factory.__name__ = cg.name or "graph"
    factory.cg = cg  # type: ignore[attr-defined]  # the profiler counts FLOPs on the file's graph
    return factory
