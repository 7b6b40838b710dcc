"""The m-hyperparameters of one training run and their ``SPEC`` string form.

A :class:`MConfig` fixes how a model trains under a memory budget:

* ``batch_size`` (``bs``) and ``micro_batch`` (``mb``): gradients of ``bs``
  samples are accumulated over ``bs / mb`` micro-batches of ``mb`` samples;
* ``freeze``: the fraction of parameterised layers (modules that own parameters,
  in forward order) whose parameters are frozen, counted from the input side;
* ``ckpt``: gradient-checkpoint segments, 0 for none; the trainable part of
  ``model.blocks`` is cut into ``ckpt`` contiguous segments, each run under
  non-reentrant :func:`torch.utils.checkpoint.checkpoint`;
* ``method``: the TinyTL train method (``full``, ``last``, ``bias``, ``lite``,
  ``lite+bias``, ``norm+last``);
* ``prec``: ``fp32``, or ``bf16`` / ``fp16`` autocast;
* ``opt``: ``sgd`` (momentum 0.9), ``adam`` or ``adamw``.

``SPEC`` strings are comma-separated ``key=value`` pairs, e.g.
``bs=32,mb=8,freeze=0.5,ckpt=2,method=lite+bias,prec=bf16,opt=adam``. Missing
keys take the defaults of :class:`MConfig`; ``accum=N`` may replace ``mb``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

METHODS: tuple[str, ...] = ("full", "last", "bias", "lite", "lite+bias", "norm+last")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")

# Keys of a SPEC string, in the order format() writes them.
SPEC_KEYS: tuple[str, ...] = ("bs", "mb", "freeze", "ckpt", "method", "prec", "opt")
_ALIASES = {
    "batch": "bs",
    "batch_size": "bs",
    "micro_batch": "mb",
    "micro": "mb",
    "accum": "accum",
    "accumulation": "accum",
    "freeze_rate": "freeze",
    "segments": "ckpt",
    "checkpoint": "ckpt",
    "precision": "prec",
    "optimizer": "opt",
    "train_method": "method",
}

# Names of the entries of MConfig.as_vector(), in order.
VECTOR_NAMES: tuple[str, ...] = (
    "log2_batch",
    "log2_micro_batch",
    "log2_accum_steps",
    "freeze",
    "segments",
    *(f"method={m}" for m in METHODS),
    *(f"prec={p}" for p in PRECISIONS),
    *(f"opt={o}" for o in OPTIMIZERS),
)

_NORM_OPS = frozenset(
    {"BatchNormalization", "GroupNormalization", "LayerNormalization", "InstanceNormalization"}
)
# ``model.blocks.N`` only: anchored so that a sub-model's ``text.blocks.N`` (CLIP's
# text tower) is not taken for the checkpointed image blocks.
_BLOCK_RE = re.compile(r"^/?blocks[./](\d+)(?:[./]|$)")


class MConfigError(ValueError):
    """An m-configuration is malformed or impossible for a model; the message says why."""


class _NodeLike(Protocol):
    name: str
    op: str
    params: int
    param_names: list[str]
    scope: str


class _GraphLike(Protocol):
    nodes: Sequence[_NodeLike]


@dataclass(frozen=True)
class MConfig:
    """One point of the m-hyperparameter space (see the module docstring)."""

    batch_size: int = 8
    micro_batch: int | None = None  # None: equal to batch_size (no accumulation)
    freeze: float = 0.0
    ckpt: int = 0
    method: str = "full"
    prec: str = "fp32"
    opt: str = "sgd"

    def __post_init__(self) -> None:
        if self.micro_batch is None:
            object.__setattr__(self, "micro_batch", self.batch_size)
        self.validate()

    # -- derived values ------------------------------------------------------
    @property
    def mb(self) -> int:
        """Micro-batch size (never None after construction)."""
        assert self.micro_batch is not None
        return self.micro_batch

    @property
    def accum_steps(self) -> int:
        """Gradient accumulation steps: batch size / micro-batch size."""
        return self.batch_size // self.mb

    # -- validation -------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`MConfigError` with a one-line reason when a field is out of range."""
        for key, value in (("bs", self.batch_size), ("mb", self.micro_batch), ("ckpt", self.ckpt)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise MConfigError(f"{key} must be an integer, got {value!r}")
        if self.batch_size < 1:
            raise MConfigError(f"bs must be at least 1, got {self.batch_size}")
        if self.mb < 1:
            raise MConfigError(f"mb must be at least 1, got {self.mb}")
        if self.mb > self.batch_size or self.batch_size % self.mb:
            raise MConfigError(
                f"mb={self.mb} must divide bs={self.batch_size} (micro-batches add up to a batch)"
            )
        if isinstance(self.freeze, bool) or not isinstance(self.freeze, int | float):
            raise MConfigError(f"freeze must be a number in [0, 1], got {self.freeze!r}")
        if not (0.0 <= self.freeze <= 1.0) or math.isnan(self.freeze):
            raise MConfigError(f"freeze must be in [0, 1], got {self.freeze}")
        if self.ckpt < 0:
            raise MConfigError(
                f"ckpt must be 0 (none) or a positive segment count, got {self.ckpt}"
            )
        if self.method not in METHODS:
            raise MConfigError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.prec not in PRECISIONS:
            raise MConfigError(f"unknown prec {self.prec!r}; choose one of {', '.join(PRECISIONS)}")
        if self.opt not in OPTIMIZERS:
            raise MConfigError(f"unknown opt {self.opt!r}; choose one of {', '.join(OPTIMIZERS)}")

    def validate_for(self, model: Any, name: str = "the model") -> None:
        """Check the config against a model (or a block count): no more segments than blocks."""
        n_blocks = model if isinstance(model, int) else len(getattr(model, "blocks", ()))
        if self.ckpt > n_blocks:
            raise MConfigError(
                f"ckpt={self.ckpt} asks for more checkpoint segments than the {n_blocks} "
                f"blocks of {name}"
            )

    # -- SPEC strings -----------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | MConfig) -> MConfig:
        """Parse a ``SPEC`` string such as ``bs=32,mb=8,freeze=0.5,ckpt=2``."""
        if isinstance(spec, MConfig):
            return spec
        if not isinstance(spec, str):
            raise MConfigError(f"a config SPEC must be a string, got {type(spec).__name__}")
        values: dict[str, str] = {}
        for raw in spec.replace(" ", "").split(","):
            if not raw:
                continue
            if "=" not in raw:
                raise MConfigError(f"config entry {raw!r} is not key=value (SPEC: {spec!r})")
            key, value = raw.split("=", 1)
            key = _ALIASES.get(key.lower(), key.lower())
            if key not in SPEC_KEYS and key != "accum":
                raise MConfigError(
                    f"unknown config key {key!r}; valid keys: {', '.join(SPEC_KEYS)}, accum"
                )
            if key in values:
                raise MConfigError(f"config key {key!r} given twice in {spec!r}")
            if not value:
                raise MConfigError(f"config key {key!r} has no value")
            values[key] = value
        if "mb" in values and "accum" in values:
            raise MConfigError("give either mb (micro-batch) or accum (steps), not both")
        kwargs: dict[str, Any] = {}
        if "bs" in values:
            kwargs["batch_size"] = _int(values["bs"], "bs")
        if "mb" in values:
            kwargs["micro_batch"] = _int(values["mb"], "mb")
        if "accum" in values:
            steps = _int(values["accum"], "accum")
            bs = kwargs.get("batch_size", cls.batch_size)
            if steps < 1 or bs % steps:
                raise MConfigError(f"accum={steps} must be a positive divisor of bs={bs}")
            kwargs["micro_batch"] = bs // steps
        if "freeze" in values:
            kwargs["freeze"] = _float(values["freeze"], "freeze")
        if "ckpt" in values:
            kwargs["ckpt"] = _int(values["ckpt"], "ckpt")
        for key in ("method", "prec", "opt"):
            if key in values:
                kwargs[key] = values[key].lower()
        return cls(**kwargs)

    def format(self) -> str:
        """The canonical SPEC string (every key, fixed order); ``parse(format())`` is identity."""
        return (
            f"bs={self.batch_size},mb={self.mb},freeze={self.freeze:g},ckpt={self.ckpt},"
            f"method={self.method},prec={self.prec},opt={self.opt}"
        )

    def __str__(self) -> str:
        return self.format()

    def replace(self, **changes: Any) -> MConfig:
        """A copy with some fields changed (validated)."""
        if "batch_size" in changes and "micro_batch" not in changes and self.mb == self.batch_size:
            changes["micro_batch"] = changes["batch_size"]
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bs": self.batch_size,
            "mb": self.mb,
            "accum": self.accum_steps,
            "freeze": self.freeze,
            "ckpt": self.ckpt,
            "method": self.method,
            "prec": self.prec,
            "opt": self.opt,
        }

    # -- features for the predictor -----------------------------------------
    def as_vector(self) -> list[float]:
        """A fixed-length numeric encoding; entry names are :data:`VECTOR_NAMES`.

        ``[log2 bs, log2 mb, log2 accum steps, freeze rate, segments,
        one-hot method (METHODS order), one-hot prec (PRECISIONS order),
        one-hot opt (OPTIMIZERS order)]`` — 17 floats.
        """
        return [
            math.log2(self.batch_size),
            math.log2(self.mb),
            math.log2(self.accum_steps),
            float(self.freeze),
            float(self.ckpt),
            *(1.0 if m == self.method else 0.0 for m in METHODS),
            *(1.0 if p == self.prec else 0.0 for p in PRECISIONS),
            *(1.0 if o == self.opt else 0.0 for o in OPTIMIZERS),
        ]

    def n_frozen_units(self, n_units: int) -> int:
        """How many of ``n_units`` parameterised layers ``freeze`` freezes (round half up)."""
        # The epsilon keeps 0.3 * 10 = 3.0000000000000004 from flipping on float noise.
        return min(n_units, math.floor(self.freeze * n_units + 0.5 + 1e-9))

    def node_flags(
        self, cg: _GraphLike, plan: Any = None, blocks: list[int | None] | None = None
    ) -> dict[str, list[bool]]:
        """Per-node ``trainable`` and ``recomputed`` flags of a CG under this config.

        With a :class:`~aiop.mconfig.apply.Plan` (what :func:`~aiop.mconfig.apply.prepare`
        returned for the model the CG was exported from) the flags follow its
        trainable parameter names and checkpoint segments exactly. Without one they
        are derived from the CG alone with the same rules (see :func:`cg_plan`; for
        many configs of one graph, :meth:`CGPlanner.node_flags` memoises them).
        ``blocks`` may pass :func:`node_blocks` of ``cg`` when the caller has it already.
        """
        if plan is None:
            return CGPlanner(cg, blocks).node_flags(self)
        nodes = list(cg.nodes)
        if blocks is None:
            blocks = node_blocks(cg)
        trainable_names = set(plan.trainable_params)
        node_trainable = [
            bool(n.params > 0 and _node_param_names(n, i) & trainable_names)
            for i, n in enumerate(nodes)
        ]
        # Parameter names missing from the plan (e.g. an ONNX export that renamed
        # initialisers) would freeze everything: fall back to the CG rules then.
        if any(n.params > 0 for n in nodes) and not any(node_trainable) and trainable_names:
            return CGPlanner(cg, blocks).node_flags(self)
        segments = [tuple(s) for s in plan.segments]
        weighted = [n.params > 0 for n in nodes]
        return _flags(weighted, node_trainable, segments, blocks)


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MConfigError(f"{key} must be an integer, got {text!r}") from None


def _float(text: str, key: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise MConfigError(f"{key} must be a number, got {text!r}") from None
    return value


# -- rules shared by the CG side and the PyTorch side -----------------------------


def unit_of(param_name: str) -> str:
    """The parameterised layer (module path) a parameter name belongs to."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def method_trains(method: str, param_name: str, in_head: bool, is_norm: bool) -> bool:
    """Whether TinyTL's ``method`` leaves a parameter trainable (before freezing).

    Mirrors :func:`aiop.models.tinytl.set_train_method`: the head always trains
    (except under freezing), ``bias`` adds every bias, ``lite`` the lite
    residual branches (parameter names containing ``lite``), ``norm+last`` the
    normalisation layers' affine parameters.
    """
    if method == "full" or in_head:
        return True
    leaf = param_name.rsplit(".", 1)[-1]
    is_lite = "lite" in param_name.lower()
    if method == "last":
        return False
    if method == "bias":
        return leaf == "bias"
    if method == "lite":
        return is_lite
    if method == "lite+bias":
        return is_lite or leaf == "bias"
    if method == "norm+last":
        return is_norm
    raise MConfigError(f"unknown method {method!r}")


def _node_param_names(node: _NodeLike, index: int) -> set[str]:
    return set(node.param_names) if node.param_names else {f"#node{index}"}


def node_blocks(cg: _GraphLike) -> list[int | None]:
    """The ``model.blocks`` index each CG node belongs to (None for stem/head/unknown).

    Read from the node's scope, parameter names or name (``blocks.3`` /
    ``/blocks.3/``); a node with none of these inherits the block of the node
    before it when the next known node is in the same block.
    """
    nodes = list(cg.nodes)
    known: list[int | None] = []
    for n in nodes:
        found = None
        for text in (n.scope, *n.param_names, n.name):
            m = _BLOCK_RE.search(text or "")
            if m:
                found = int(m.group(1))
                break
        known.append(found)
    has_info = [bool(n.scope or n.param_names) or known[i] is not None for i, n in enumerate(nodes)]
    out = list(known)
    prev: int | None = None
    for i in range(len(nodes)):
        if known[i] is not None:
            prev = known[i]
            continue
        if has_info[i]:
            prev = None  # a stem/head node: outside blocks
            continue
        nxt = next((known[j] for j in range(i + 1, len(nodes)) if has_info[j]), None)
        if prev is not None and nxt == prev:
            out[i] = prev
    return out


def _flags(
    weighted: Sequence[bool],
    node_trainable: Sequence[bool],
    segments: Sequence[tuple[int, int]],
    blocks: Sequence[int | None],
) -> dict[str, list[bool]]:
    """Per-node flags from the plan of the weighted nodes and the segments."""
    recomputed_blocks = {b for start, stop in segments for b in range(start, stop)}
    trainable: list[bool] = []
    seen = False
    for has_params, own in zip(weighted, node_trainable):
        if has_params:
            trainable.append(own)
            seen = seen or own
        else:
            # Autograd keeps a parameterless node's activations only when a
            # trainable parameter lies at or before it in forward order.
            trainable.append(seen)
    recomputed = [b is not None and b in recomputed_blocks for b in blocks]
    return {"trainable": trainable, "recomputed": recomputed}


class CGPlanner:
    """The node plan of one CG (:func:`cg_plan`) for many configurations.

    Each weighted node's layer, head membership and TinyTL method rules are read
    once per graph; a configuration then only picks the frozen prefix of layers and
    the checkpoint segments. Plans, flags and their signatures are memoised by
    :meth:`key`, the part of a config they depend on, so a planner kept per graph
    (the predictor's ``PlanCache`` keeps one) answers repeated configs from memory.
    The graph must not change while a planner of it is in use.

    Layers are the distinct module paths of the weighted nodes' parameter names
    (one layer per node when names are missing), in forward order; TinyTL's
    method rules come first, then the first ``freeze`` fraction of layers is
    frozen. Segments cut the blocks from the first one holding or following a
    trainable parameter, as :func:`aiop.mconfig.apply.prepare` does.
    """

    def __init__(self, cg: _GraphLike, blocks: list[int | None] | None = None) -> None:
        nodes = list(cg.nodes)
        self.num_nodes = len(nodes)
        self.blocks = node_blocks(cg) if blocks is None else list(blocks)
        known = [b for b in self.blocks if b is not None]
        self.n_blocks = max(known) + 1 if known else 0
        self.weighted = [i for i, n in enumerate(nodes) if n.params > 0]
        self._is_weighted = [n.params > 0 for n in nodes]
        units: dict[str, int] = {}  # layer -> its position in forward order
        unit_of_node: dict[int, str] = {}
        for i in self.weighted:
            names = nodes[i].param_names
            unit = unit_of(names[0]) if names else f"#node{i}"
            unit_of_node[i] = unit
            units.setdefault(unit, len(units))
        self.n_units = len(units)
        self._unit_pos = {i: units[u] for i, u in unit_of_node.items()}
        last_unit = next(reversed(units)) if units else None
        # The head is what BlockNet calls ``head``; without module names, the last layer.
        named_head = any(u.startswith("head.") or u == "head" for u in units)
        # per weighted node: (parameter name, in head, is norm), the method rules' inputs
        self._rules = {
            i: [
                (
                    name,
                    name.startswith("head.") if named_head else unit_of_node[i] == last_unit,
                    nodes[i].op in _NORM_OPS,
                )
                for name in (nodes[i].param_names or [f"{unit_of_node[i]}.weight"])
            ]
            for i in self.weighted
        }
        self._by_method: dict[str, list[bool]] = {}
        self._plans: dict[tuple[int, int, str], tuple[list[bool], list[tuple[int, int]]]] = {}
        self._flags: dict[tuple[int, int, str], dict[str, list[bool]]] = {}
        self._signatures: dict[tuple[int, int, str], tuple[tuple[bool, ...], ...]] = {}

    def key(self, config: MConfig) -> tuple[int, int, str]:
        """What the plan of ``config`` depends on: frozen layers, segments asked, method."""
        return (config.n_frozen_units(self.n_units), config.ckpt, config.method)

    def _method_trains(self, method: str) -> list[bool]:
        """Per node: whether ``method`` trains it before any freezing (memoised)."""
        out = self._by_method.get(method)
        if out is None:
            out = [False] * self.num_nodes
            for i, rules in self._rules.items():
                out[i] = any(method_trains(method, *rule) for rule in rules)
            self._by_method[method] = out
        return out

    def _plan(self, config: MConfig) -> tuple[list[bool], list[tuple[int, int]]]:
        key = self.key(config)
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        from aiop.models.base import split_segments

        n_frozen, ckpt, method = key
        trains = self._method_trains(method)
        pos = self._unit_pos
        trainable = [False] * self.num_nodes
        for i in self.weighted:
            trainable[i] = trains[i] and pos[i] >= n_frozen
        segments: list[tuple[int, int]] = []
        if ckpt and self.n_blocks and any(trainable):
            first = trainable.index(True)
            # The first block at or after the first trainable node (0 when it is in the
            # stem, None when it is in the head).
            start = next((b for b in self.blocks[first:] if b is not None), None)
            if start is not None and start < self.n_blocks:
                k = min(ckpt, self.n_blocks - start)
                segments = [
                    (start + r.start, start + r.stop)
                    for r in split_segments(self.n_blocks - start, k)
                ]
        self._plans[key] = (trainable, segments)
        return trainable, segments

    def plan(self, config: MConfig) -> tuple[list[bool], list[tuple[int, int]]]:
        """Per-node trainability of weighted nodes and the checkpoint segments (copies of
        the memoised plan, so callers may change them)."""
        trainable, segments = self._plan(config)
        return list(trainable), list(segments)

    def node_flags(self, config: MConfig) -> dict[str, list[bool]]:
        """``config.node_flags(cg)`` (a copy of the memoised flags)."""
        key = self.key(config)
        flags = self._flags.get(key)
        if flags is None:
            node_trainable, segments = self._plan(config)
            flags = self._flags[key] = _flags(
                self._is_weighted, node_trainable, segments, self.blocks
            )
        return {k: list(v) for k, v in flags.items()}

    def flags_signature(self, config: MConfig) -> tuple[tuple[bool, ...], ...]:
        """A hashable form of :meth:`node_flags`: configs with equal signatures flag the
        same nodes trainable and recomputed."""
        key = self.key(config)
        sig = self._signatures.get(key)
        if sig is None:
            flags = self.node_flags(config)
            sig = self._signatures[key] = (tuple(flags["trainable"]), tuple(flags["recomputed"]))
        return sig


def cg_plan(
    config: MConfig, cg: _GraphLike, blocks: list[int | None] | None = None
) -> tuple[list[bool], list[tuple[int, int]]]:
    """Per-node trainability of weighted nodes and the checkpoint segments, from a CG alone.

    ``blocks`` may pass :func:`node_blocks` of ``cg`` when the caller has it already.
    The rules are :class:`CGPlanner`'s; keep a planner per graph to plan many configs.
    """
    return CGPlanner(cg, blocks).plan(config)
