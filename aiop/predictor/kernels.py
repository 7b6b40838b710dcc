"""Kernel-level step latency: the kernels a step runs, and regressors of their device times.

nn-Meter's idea applied to training steps. :func:`node_kernels` maps every op of a CG to
the kernel kind of :mod:`aiop.profiler.microbench` that PyTorch runs for it (dense /
depthwise / grouped convolution, linear, BatchNorm, each activation, residual add,
broadcast multiply, pooling, views) with its per-sample shape descriptors (channels,
kernel, stride, groups, spatial size, rows). :class:`KernelModel` holds one
:class:`KernelRegressor` per kind — an ensemble of 3 small MLPs of log seconds on
standardised log shape features (log FLOPs or elements first), a bf16 flag and the
phase, fitted on the device's microbenchmark records (``python -m aiop.predictor.kernels``
writes it as JSON into the package data, ``aiop/data/kernel_model_cpu_1thread.json``) —
and gives, for a graph, a micro-batch size and a precision, every node's forward,
input-gradient and weight-gradient seconds (:meth:`KernelModel.node_times`).
Outside the measured box the network is evaluated at the nearest point of the box and
the time scaled with the excess work (time ∝ FLOPs or elements: the large-size regime),
so it never bends away where it has no data. Held-out error per kernel:
``benchmarks/kernel_latency.py``.

Everything serialises to plain JSON (lists of floats); nothing is pickled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiop.cg.graph import ComputeGraph
from aiop.cg.vocab import VIEW_OPS
from aiop.profiler.microbench import (
    CONV_KINDS,
    KINDS,
    OPT_KINDS,
    KernelPoint,
    KernelRecord,
    read_records,
)

log = logging.getLogger(__name__)

#: kernel kinds a node can map to (index = code in :class:`NodeKernels`; -1: no kernel)
KIND_LIST: tuple[str, ...] = tuple(k for k in KINDS if k not in OPT_KINDS)
_CODE = {k: i for i, k in enumerate(KIND_LIST)}
_WEIGHTED = frozenset(_CODE[k] for k in (*CONV_KINDS, "linear"))
PHASES = ("fwd", "bin", "bw")
#: the repository's microbenchmark file of this CPU (one thread)
DEFAULT_KERNEL_BENCH = (
    Path(__file__).resolve().parents[2] / "data" / "kernel_bench" / "cpu_1thread.jsonl"
)
#: the kernel model fitted on it (what predictors fit their latency on); package data, so
#: fitting a predictor works from an installed wheel too
DEFAULT_KERNEL_MODEL = (
    Path(__file__).resolve().parents[1] / "data" / "kernel_model_cpu_1thread.json"
)
_HIDDEN = 32
#: wider networks for the kinds whose time varies most with shape
_HIDDEN_BY_KIND = {"conv": 64, "gconv": 64}
#: networks per regressor (seeds 0..n-1, trained at once), averaged in log seconds
_MEMBERS = 3
#: what :func:`features` computes; a saved model of another version is refused
FEATURES_VERSION = 3
_TOKENS = itertools.count()
_STEPS = 2000

_UNARY = {
    "Relu": "relu",
    "LeakyRelu": "relu",
    "PRelu": "relu",
    "Clip": "relu6",
    "HardSwish": "hswish",
    "HardSigmoid": "hsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "sigmoid",
    "Softmax": "sigmoid",
    "LogSoftmax": "sigmoid",
    "Elu": "sigmoid",
    "Selu": "sigmoid",
    "Softplus": "sigmoid",
    "Erf": "sigmoid",
    "Exp": "sigmoid",
    "Log": "sigmoid",
    "Gelu": "gelu",
    "SiLU": "silu",
    "Mish": "silu",
    "Sqrt": "relu",
    "Neg": "relu",
    "Abs": "relu",
    "Reciprocal": "relu",
    "Dropout": "relu",
}
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"})
_NORMS = frozenset(
    {"BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization"}
)
_CHEAP = frozenset({"Identity", "Shape", "Constant", "Gather", "Transpose", "Cast", "Slice"})


class KernelModelError(ValueError):
    """The kernel model cannot be fitted or read (no records, malformed JSON)."""


@dataclass
class NodeKernels:
    """Per-node kernel kind codes and per-sample shape descriptors of one graph (arrays of
    the graph's length; ``kind`` -1 where the node runs no kernel)."""

    kind: np.ndarray
    cin: np.ndarray
    cout: np.ndarray
    k: np.ndarray
    stride: np.ndarray
    groups: np.ndarray
    h: np.ndarray
    w: np.ndarray
    ho: np.ndarray
    wo: np.ndarray
    rows: np.ndarray
    has_weight_grad: np.ndarray  # the kind has a weight-gradient kernel (conv, linear)
    # node times memoised per (micro-batch, precision): configs share them
    memo: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )
    matrices: dict[tuple[int, int, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return [KIND_LIST[c] if c >= 0 else "" for c in self.kind.tolist()]


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    """(channels, h, w) per sample of an NCHW-like shape (tokens: (features, tokens, 1))."""
    s = [int(d) for d in shape]
    if len(s) >= 4:
        return s[1], s[2], math.prod(s[3:])
    if len(s) == 3:
        return s[2], s[1], 1
    if len(s) == 2:
        return s[1], 1, 1
    return max(1, math.prod(s)), 1, 1


def node_kernels(cg: ComputeGraph, is_op: Sequence[bool], eff_op: Sequence[str]) -> NodeKernels:
    """The kernel each op of ``cg`` runs (see the module docstring); ``is_op`` / ``eff_op``
    as :class:`~aiop.predictor.analytic.GraphInfo` derives them (fused patterns at their last
    node)."""
    n = cg.num_nodes
    cols = {
        c: np.ones(n, dtype=np.float64)
        for c in ("cin", "cout", "k", "stride", "groups", "h", "w", "ho", "wo", "rows")
    }
    kind = np.full(n, -1, dtype=np.int64)
    params_of = [node.params for node in cg.nodes]
    for i, node in enumerate(cg.nodes):
        if not is_op[i] or node.op == "Input":
            continue
        op = eff_op[i]
        ins = [s for s in node.input_shapes if len(s) > 0] or [()]
        out = node.output_shapes[0] if node.output_shapes else ()
        cin, h, w = _spatial(ins[0])
        cout, ho, wo = _spatial(out)
        name: str
        if op in ("Conv", "ConvTranspose"):
            g = max(1, int(node.attrs.get("group", 1)))
            ks = node.attrs.get("kernel_shape")
            if ks:
                k = float(np.sqrt(np.prod([max(1, int(v)) for v in ks])))
            else:  # (lite branches' convs carry no attributes): from the weight's size
                per_tap = cout * max(cin // g, 1)
                k = float(np.sqrt(max(params_of[i], per_tap) / per_tap)) if per_tap else 1.0
            st = node.attrs.get("strides")
            stride = max(int(v) for v in st) if st else max(1, round(h / max(ho, 1)))
            cols["k"][i] = round(k)
            cols["stride"][i] = float(stride)
            cols["groups"][i] = g
            name = "conv" if g == 1 else ("dwconv" if g == cin else "gconv")
        elif op in ("Gemm", "MatMul"):
            name = "linear"
            cout = int(out[-1]) if len(out) else 1
            batch = int(out[0]) if len(out) > 1 else 1
            cin = int(ins[0][-1]) if len(ins[0]) else 1
            if op == "Gemm" and params_of[i] > cout:
                cin = max(1, (params_of[i] - cout) // max(cout, 1))
            cols["rows"][i] = max(1.0, math.prod(int(d) for d in out) / max(batch * cout, 1))
            h = w = ho = wo = 1
        elif op in _NORMS:
            name = "bn"
        elif op in _UNARY:
            name = _UNARY[op]
        elif op in _BINARY:
            sizes = [math.prod(int(d) for d in s) for s in ins]
            name = "add" if len(sizes) < 2 or min(sizes) == max(sizes) else "mul"
        elif op in ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool", "ReduceMax"):
            name = "gap"
        elif op == "AveragePool":
            name = "avgpool"
            ks = node.attrs.get("kernel_shape") or [2]
            st = node.attrs.get("strides") or ks
            cols["k"][i] = float(max(int(v) for v in ks))
            cols["stride"][i] = float(max(int(v) for v in st))
        elif op == "MaxPool":
            name = "maxpool"
        elif op in VIEW_OPS or op in _CHEAP:
            name = "view"
        else:
            # copies and the rest (Concat, Pad, Resize, ...): an elementwise pass over the output
            name = "add"
            cin, h, w = cout, ho, wo
        kind[i] = _CODE[name]
        cols["cin"][i], cols["cout"][i] = cin, cout
        cols["h"][i], cols["w"][i], cols["ho"][i], cols["wo"][i] = h, w, ho, wo
    has_wg = np.isin(kind, [_CODE[k] for k in (*CONV_KINDS, "linear")])
    return NodeKernels(kind=kind, has_weight_grad=has_wg, **cols)


def _log(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, dtype=np.float64), 1.0))


def features(kind: str, mb: np.ndarray | float, c: dict[str, np.ndarray]) -> np.ndarray:
    """``[n, F]`` log shape features of ``kind`` kernels at micro-batch ``mb`` (column 0:
    the work, log FLOPs or log elements). ``c``: the :class:`NodeKernels` columns.
    Convolutions add the im2col GEMM's sizes, the stride, a 1×1 flag, the channel
    padding of 8-blocks and a micro-batch ≥ 16 flag (columns stored as logs: flags and
    fractions as ``exp``)."""
    mb = np.broadcast_to(np.asarray(mb, dtype=np.float64), c["cin"].shape)
    cin, cout, g = c["cin"], c["cout"], c["groups"]
    if kind in CONV_KINDS:
        cg, k2, hw_out = cin / g, c["k"] ** 2, c["ho"] * c["wo"]
        flops = 2.0 * mb * cout * hw_out * cg * k2
        # oneDNN picks its algorithm and blocking by shape: the im2col GEMM's sizes
        # (M = mb·Ho·Wo, K = Cin/g·k², N = Cout/g), 1×1 or not, the stride, and how much of
        # the last 8-channel block (AVX2 fp32) is padding
        pad_in = np.ceil(cg / 8.0) * 8.0 / cg
        pad_out = np.ceil(cout / g / 8.0) * 8.0 / (cout / g)
        cols = [flops, mb, cg, cout, c["k"], hw_out, c["h"] * c["w"], g]
        cols += [cg * k2, mb * hw_out, c["stride"], np.where(c["k"] == 1, math.e, 1.0)]
        cols += [np.exp(pad_in), np.exp(pad_out)]
        # oneDNN blocks the micro-batch by 16: below it, small-spatial 1×1 convolutions
        # take a slower algorithm
        cols += [np.where(mb >= 16, math.e, 1.0)]
    elif kind == "linear":
        flops = 2.0 * mb * c["rows"] * cin * cout
        cols = [flops, mb * c["rows"], cin, cout]
    else:
        elems = mb * cin * c["h"] * c["w"]
        cols = [elems, mb, cin, c["h"] * c["w"]]
        if kind == "avgpool":
            cols.append(c["k"])
    return np.stack([_log(v) for v in cols], axis=1)


def _sig(v: float) -> float:
    """``v`` to 7 significant digits: float32's precision, half the JSON of a double."""
    return float(f"{v:.7g}")


@dataclass
class KernelRegressor:
    """An ensemble of small MLPs (2 × ``hidden`` SiLU each) of log seconds for one kernel kind.

    Inputs: the kind's standardised log shape features (:func:`features`), a bf16 flag and
    the phase (one-hot over :data:`PHASES`); one network per kind shares what the shape
    does to every phase and precision. The members (different seeds) are averaged in log
    seconds. Outside the measured box the inputs are clipped to it and the excess log work
    added (time ∝ work)."""

    mean: list[float]
    std: list[float]
    lo: list[float]
    hi: list[float]
    weights: list[list[list[list[float]]]]  # per member: [W1, W2, W3] as [out][in] lists
    biases: list[list[list[float]]]  # per member: [b1, b2, b3]
    y_mean: float = 0.0
    n: int = 0

    @staticmethod
    def inputs(x: np.ndarray, half: bool, phase: str) -> np.ndarray:
        """Rows of the network's raw inputs: shape features, bf16 flag, phase one-hot."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        extra = np.zeros((x.shape[0], 1 + len(PHASES)))
        extra[:, 0] = float(half)
        extra[:, 1 + PHASES.index(phase)] = 1.0
        return np.concatenate([x, extra], axis=1)

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        seconds: np.ndarray,
        hidden: int = _HIDDEN,
        steps: int = _STEPS,
        seed: int = 0,
        members: int = 1,
    ) -> KernelRegressor:
        """Fit ``members`` networks (seeds ``seed``, ``seed + 1``, ...) on rows of
        :meth:`inputs`: full-batch Adam on squared log error, cosine schedule. The members
        are trained side by side as one batched network; their losses are summed and Adam
        is elementwise, so each trains exactly as it would alone. Deterministic for a seed
        on one thread."""
        import torch

        x = np.asarray(x, dtype=np.float64)
        y = np.log(np.maximum(np.asarray(seconds, dtype=np.float64), 1e-7))
        if x.ndim != 2 or x.shape[0] != y.size or y.size < 3:
            raise KernelModelError(f"need at least 3 measured kernels to fit, got {y.size}")
        if members < 1 or hidden < 1:
            raise KernelModelError("a kernel regressor needs at least one network and unit")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-9] = 1.0
        z = (x - mean) / std
        y_mean = float(y.mean())
        dims = [x.shape[1], hidden, hidden, 1]
        ws: list[list[torch.Tensor]] = [[] for _ in range(3)]
        for m in range(members):
            gen = torch.Generator().manual_seed(seed + m)
            for i in range(3):
                ws[i].append(torch.randn(dims[i + 1], dims[i], generator=gen) / math.sqrt(dims[i]))
        params = []
        for i in range(3):
            params += [
                torch.stack(ws[i]).requires_grad_(),  # [members, out, in]
                torch.zeros(members, dims[i + 1], requires_grad=True),
            ]
        zt = torch.tensor(z, dtype=torch.float32)
        yt = torch.tensor(y - y_mean, dtype=torch.float32)
        opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

        def net(h: torch.Tensor) -> torch.Tensor:
            h = h.unsqueeze(0).expand(members, -1, -1)
            for i in range(3):
                h = torch.baddbmm(params[2 * i + 1].unsqueeze(1), h, params[2 * i].transpose(1, 2))
                if i < 2:
                    h = torch.nn.functional.silu(h)
            return h.squeeze(2)  # [members, rows]

        for _ in range(steps):
            opt.zero_grad()
            loss = torch.mean((net(zt) - yt) ** 2, dim=1).sum()
            loss.backward()
            opt.step()
            sched.step()

        def listed(t: torch.Tensor, m: int) -> Any:
            return np.vectorize(_sig)(t[m].detach().double().numpy()).tolist()

        return cls(
            mean.tolist(),
            std.tolist(),
            z.min(0).tolist(),
            z.max(0).tolist(),
            [[listed(params[2 * i], m) for i in range(3)] for m in range(members)],
            [[listed(params[2 * i + 1], m) for i in range(3)] for m in range(members)],
            y_mean,
            int(y.size),
        )

    def __post_init__(self) -> None:
        # the members side by side: first layers as one wide matrix, the second and third
        # stacked per member (one batched product, no block-diagonal zeros to multiply)
        w = [[np.asarray(w, dtype=np.float64) for w in m] for m in self.weights]
        b = [[np.asarray(b, dtype=np.float64) for b in m] for m in self.biases]
        self._members = [(mw, mb) for mw, mb in zip(w, b)]
        self._w: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        try:
            self._w = [
                np.concatenate([m[0] for m in w]).T.copy(),  # [in, members·hidden]
                np.stack([m[1].T for m in w]),  # [members, hidden, hidden]
                np.stack([m[2][0] for m in w]) / len(w),  # [members, hidden]: the mean
            ]
            self._b = [
                np.concatenate([m[0] for m in b]),
                np.stack([m[1] for m in b])[:, None, :],
                np.full(1, float(np.mean([m[2] for m in b]))),
            ]
        except (ValueError, IndexError):  # inconsistent sizes: from_dict says which
            self._w, self._b = [], []

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        """Log seconds of rows of :meth:`inputs` (the members' mean)."""
        z = (np.asarray(x, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        zc = np.clip(z, self.lo, self.hi)
        excess = (z[:, 0] - zc[:, 0]) * self.std[0]  # log work beyond the measured box
        m, hidden = self._w[1].shape[:2]
        h = zc @ self._w[0] + self._b[0]
        h = h / (1.0 + np.exp(-h))  # SiLU
        h = np.matmul(h.reshape(-1, m, hidden).transpose(1, 0, 2), self._w[1]) + self._b[1]
        h = h / (1.0 + np.exp(-h))  # [members, rows, hidden]
        out = np.einsum("mnh,mh->n", h, self._w[2])
        return out + self._b[2][0] + self.y_mean + excess

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.predict_log(x))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "lo": self.lo,
            "hi": self.hi,
            "weights": self.weights,
            "biases": self.biases,
            "y_mean": self.y_mean,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelRegressor:
        try:
            r = cls(
                *(list(map(float, d[k])) for k in ("mean", "std", "lo", "hi")),
                weights=[[[list(map(float, row)) for row in w] for w in m] for m in d["weights"]],
                biases=[[list(map(float, b)) for b in m] for m in d["biases"]],
                y_mean=float(d.get("y_mean", 0.0)),
                n=int(d.get("n", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KernelModelError(f"malformed kernel regressor ({exc})") from None
        f = len(r.mean)

        def member_ok(ws: list[np.ndarray], bs: list[np.ndarray]) -> bool:
            return (
                len(ws) == 3
                and len(bs) == 3
                and all(w.ndim == 2 for w in ws)
                and ws[0].shape[1] == f
                and ws[1].shape == (ws[0].shape[0], ws[0].shape[0])
                and ws[2].shape == (1, ws[0].shape[0])
                and all(b.shape == (w.shape[0],) for w, b in zip(ws, bs))
            )

        ok = bool(r._members) and all(member_ok(*m) for m in r._members) and bool(r._w)
        if not (len(r.std) == len(r.lo) == len(r.hi) == f and ok):
            raise KernelModelError("malformed kernel regressor (inconsistent sizes)")
        return r


def _point_columns(points: Sequence[KernelPoint]) -> dict[str, np.ndarray]:
    cols: dict[str, list[float]] = {
        c: [] for c in ("cin", "cout", "k", "stride", "groups", "h", "w", "ho", "wo", "rows")
    }
    for p in points:
        ho, wo = p.out_hw
        for c, v in (
            ("cin", p.cin),
            ("cout", p.cout),
            ("k", p.k),
            ("stride", p.stride),
            ("groups", p.groups),
            ("h", p.h),
            ("w", p.w),
            ("ho", ho),
            ("wo", wo),
            ("rows", p.rows),
        ):
            cols[c].append(float(v))
    return {c: np.asarray(v) for c, v in cols.items()}


def _record_times(rec: KernelRecord, phase: str, harness_s: float) -> float | None:
    t = rec.times.get(phase)
    if t is None or not math.isfinite(t) or t <= 0:
        return None
    if phase != "fwd":
        # each backward was timed as its own autograd.grad call; a step makes one
        t = max(t - harness_s, 0.1 * t, 1e-6)
    return t


@dataclass
class KernelModel:
    """Kernel regressors per ``kind/precision/phase`` and the optimizer's cost per trainable
    tensor and per element (``opt``: seconds per tensor, per element for each optimizer)."""

    regressors: dict[str, KernelRegressor]
    opt: dict[str, list[float]]
    device: str = "cpu, 1 thread"
    harness_s: float = 0.0
    n_records: int = 0
    # what memos of node times are keyed on: a graph's times from another model never leak
    token: int = field(default_factory=lambda: next(_TOKENS), init=False, repr=False, compare=False)

    @classmethod
    def fit(
        cls,
        records: Iterable[KernelRecord],
        harness_s: float = 0.0,
        device: str = "cpu, 1 thread",
        progress: bool = False,
        steps: int = _STEPS,
        members: int = _MEMBERS,
    ) -> KernelModel:
        """One :class:`KernelRegressor` per kind on the records (backward times less the
        harness's ``autograd.grad`` call; ``members`` networks each, wider for the kinds
        of :data:`_HIDDEN_BY_KIND`), and the optimizers' per-tensor and per-element
        costs (non-negative least squares on relative error)."""
        from scipy.optimize import nnls
        from tqdm import tqdm

        recs = list(records)
        regs: dict[str, KernelRegressor] = {}
        by: dict[tuple[str, str], list[KernelRecord]] = {}
        for r in recs:
            by.setdefault((r.point.kind, r.point.dtype), []).append(r)
        opt: dict[str, list[float]] = {}
        by_kind: dict[str, tuple[list[np.ndarray], list[float]]] = {}
        for (kind, dtype), rs in sorted(by.items()):
            if kind in OPT_KINDS:
                a = np.asarray([[r.point.tensors, r.point.elems] for r in rs], dtype=np.float64)
                y = np.asarray([r.times["step"] for r in rs])
                # relative errors: small and large parameter sets weigh alike
                coef, _ = nnls(a / y[:, None], np.ones(y.size))
                opt[kind.removeprefix("opt_")] = coef.tolist()
                continue
            cols = _point_columns([r.point for r in rs])
            mb = np.asarray([r.point.mb for r in rs], dtype=np.float64)
            x = features(kind, mb, cols)
            xs, ys = by_kind.setdefault(kind, ([], []))
            for phase in KINDS[kind]:
                t = [_record_times(r, phase, harness_s) for r in rs]
                ok = np.asarray([v is not None for v in t])
                if ok.any():
                    xs.append(KernelRegressor.inputs(x[ok], dtype == "bf16", phase))
                    ys += [v for v in t if v is not None]
        items = sorted(by_kind.items())
        for kind, (xs, ys) in tqdm(items, desc="kernel regressors", disable=not progress):
            if len(ys) >= 3:
                regs[kind] = KernelRegressor.fit(
                    np.concatenate(xs),
                    np.asarray(ys),
                    hidden=_HIDDEN_BY_KIND.get(kind, _HIDDEN),
                    steps=steps,
                    members=members,
                )
        if not regs:
            raise KernelModelError("no kernel records to fit the kernel regressors on")
        return cls(regs, opt, device, harness_s, len(recs))

    @classmethod
    def from_bench(
        cls, path: str | Path = DEFAULT_KERNEL_BENCH, progress: bool = False
    ) -> KernelModel:
        """Fit on a :mod:`aiop.profiler.microbench` JSONL file."""
        header, records = read_records(Path(path))
        return cls.fit(
            records,
            float(header.get("grad_call_s", 0.0)),
            device=f"cpu, {header.get('threads', 1)} thread(s), {header.get('machine', '')}",
            progress=progress,
        )

    @classmethod
    def load(cls, path: str | Path = DEFAULT_KERNEL_MODEL) -> KernelModel:
        """A fitted model saved by :meth:`save` (JSON)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise KernelModelError(
                f"{path}: no kernel model; fit one with python -m aiop.predictor.kernels"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KernelModelError(f"{path}: unreadable kernel model ({exc})") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (atomically: a temporary file renamed over ``path``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path

    def predict(self, kind: str, prec: str, phase: str, x: np.ndarray) -> np.ndarray | None:
        """Seconds of ``kind`` kernels (rows of :func:`features`) in ``phase`` under ``prec``
        (None when the kind has no regressor or no such phase)."""
        reg = self.regressors.get(kind)
        if reg is None or phase not in KINDS.get(kind, ()):
            return None
        return reg.predict(KernelRegressor.inputs(x, prec in ("bf16", "fp16"), phase))

    def node_times(
        self, nk: NodeKernels, mb: int, prec: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Seconds per micro-batch of every node: forward, input-gradient backward (the
        whole backward for kinds without a weight kernel), weight-gradient backward, and a
        bias-only backward (a pass over the output gradient). Memoised on ``nk``."""
        dtype = "bf16" if prec in ("bf16", "fp16") else "fp32"
        key = (self.token, int(mb), dtype)
        got = nk.memo.get(key)
        if got is None:
            self.prefetch(nk, [int(mb)], prec)
            got = nk.memo[key]
        return got

    def prefetch(self, nk: NodeKernels, mbs: Iterable[int], prec: str) -> None:
        """Memoise :meth:`node_times` of ``nk`` for every micro-batch size of ``mbs`` at
        once: one evaluation of each kind's network over all sizes and phases (a graph's
        cold predictions cost a few network calls, not a few per micro-batch size)."""
        dtype = "bf16" if prec in ("bf16", "fp16") else "fp32"
        todo = sorted({int(m) for m in mbs if (self.token, int(m), dtype) not in nk.memo})
        if not todo:
            return
        n, m = nk.kind.size, len(todo)
        out = np.zeros((4, m, n))
        mb_col = np.asarray(todo, dtype=np.float64)
        cols = {
            c: getattr(nk, c)
            for c in ("cin", "cout", "k", "stride", "groups", "h", "w", "ho", "wo", "rows")
        }
        for code in np.unique(nk.kind[nk.kind >= 0]).tolist():
            kind = KIND_LIST[code]
            idx = np.flatnonzero(nk.kind == code)
            # rows ordered (micro-batch size, node): every size's copy of the kind's nodes
            sub = {c: np.tile(v[idx], m) for c, v in cols.items()}
            mbr = np.repeat(mb_col, idx.size)
            reg = self.regressors.get(kind)
            if reg is not None:
                x = features(kind, mbr, sub)
                # every phase of the kind in one evaluation of its network
                phases = [j for j, ph in enumerate(PHASES) if ph in KINDS[kind]]
                rows = np.concatenate(
                    [KernelRegressor.inputs(x, dtype == "bf16", PHASES[j]) for j in phases]
                )
                t = reg.predict(rows).reshape(len(phases), m, idx.size)
                for r, j in enumerate(phases):
                    out[j][:, idx] = t[r]
            if code in _WEIGHTED and "add" in self.regressors:
                oc = {**sub, "cin": sub["cout"], "h": sub["ho"], "w": sub["wo"]}
                t = self.predict("add", dtype, "fwd", features("add", mbr, oc))
                if t is not None:
                    out[3][:, idx] = t.reshape(m, idx.size)
        for i, mb in enumerate(todo):
            nk.memo[(self.token, mb, dtype)] = (out[0, i], out[1, i], out[2, i], out[3, i])

    def node_times_matrix(self, nk: NodeKernels, mb: int, prec: str) -> np.ndarray:
        """:meth:`node_times` stacked as a ``[4, nodes]`` array (memoised on ``nk``)."""
        key = (self.token, int(mb), "bf16" if prec in ("bf16", "fp16") else "fp32")
        got = nk.matrices.get(key)
        if got is None:
            got = nk.matrices[key] = np.stack(self.node_times(nk, mb, prec))
        return got

    def optimizer_s(self, opt: str, tensors: int, elems: int) -> float:
        """Seconds of one ``optimizer.step()`` over ``tensors`` tensors of ``elems`` elements."""
        c = self.opt.get(opt) or self.opt.get("adam") or [0.0, 0.0]
        return float(c[0] * tensors + c[1] * elems) if tensors else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "regressors": {k: r.to_dict() for k, r in self.regressors.items()},
            "opt": self.opt,
            "device": self.device,
            "harness_s": self.harness_s,
            "n_records": self.n_records,
            "features_version": FEATURES_VERSION,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelModel:
        version = d.get("features_version", 1) if isinstance(d, dict) else None
        if version != FEATURES_VERSION:
            raise KernelModelError(
                f"kernel model of features version {version}, this aiop needs "
                f"{FEATURES_VERSION}: refit it with python -m aiop.predictor.kernels"
            )
        try:
            regs = {str(k): KernelRegressor.from_dict(v) for k, v in d["regressors"].items()}
            opt = {str(k): [float(x) for x in v] for k, v in d["opt"].items()}
            return cls(
                regs,
                opt,
                str(d.get("device", "")),
                float(d.get("harness_s", 0.0)),
                int(d.get("n_records", 0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise KernelModelError(f"malformed kernel model ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    """Fit the kernel model on a microbenchmark file and save it as JSON."""
    parser = argparse.ArgumentParser(description="Fit the kernel regressors on microbenchmarks.")
    parser.add_argument(
        "-bench",
        default=str(DEFAULT_KERNEL_BENCH),
        help="microbenchmark file (python -m aiop.profiler.microbench)",
    )
    parser.add_argument(
        "-out", default=str(DEFAULT_KERNEL_MODEL), help="kernel model JSON to write"
    )
    parser.add_argument("-q", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # deterministic fits
    try:
        model = KernelModel.from_bench(args.bench, progress=not args.q)
    except (KernelModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.save(args.out)
    print(f"{args.out}: {len(model.regressors)} kernel regressors on {model.n_records} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
