"""Kernel microbenchmarks: the device's own cost of each kernel kind a training step runs.

nn-Meter's idea for training: a step's latency is the sum of the kernels it runs,
and each kernel's time is learned from isolated measurements of that kernel kind
over a generic design of shapes (not the layers of any network the predictor is
judged on). :func:`design` draws that design — a Latin hypercube over log channels,
log spatial size and log micro-batch within the ranges the zoo and the OFA families
use at their default resolutions (channels 3–2048, 1–112 px, micro-batch 1–64),
both precisions, plus more fp32 points for the convolution kinds and BatchNorm (half
of their channel counts multiples of 8) and 1×1 / 3×3 convolutions on 1–8 px, where
oneDNN switches algorithm with the micro-batch — and :func:`measure` times one point on
ONE thread
(``torch.set_num_threads(1)``): the forward call, the backward of the input gradient
and, for weighted kernels, the backward of the weight gradient, each separately
(``torch.autograd.grad`` on a retained graph), fp32 or under CPU bf16 autocast as
:func:`aiop.mconfig.train_step` runs it (inputs arrive in bf16, weights are cast by
autocast at every forward call). Each time is the median of a few repeats after a
warm-up call (calls slower than a quarter second: the faster of the warm-up and one more).

:func:`collect` appends one JSON line per point to a plain JSONL file and skips
points already there, so an interrupted run resumes; a partial last line (a crash
mid-write) is ignored on reading. The optimizer kinds time ``optimizer.step()``
(``foreach=False``, as :func:`aiop.mconfig.make_optimizer` builds it) over sets of
parameter tensors.

    OMP_NUM_THREADS=1 taskset -c 0 python -m aiop.profiler.microbench \\
        -out data/kernel_bench/cpu_1thread.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("fp32", "bf16")
CONV_KINDS = ("conv", "dwconv", "gconv")
UNARY_KINDS = ("relu", "relu6", "hswish", "hsigmoid", "sigmoid", "gelu", "silu")
POOL_KINDS = ("avgpool", "maxpool", "gap")
OPT_KINDS = ("opt_sgd", "opt_adam", "opt_adamw")
#: every kernel kind :func:`measure` knows, with the phases it times
KINDS: dict[str, tuple[str, ...]] = {
    **{k: ("fwd", "bin", "bw") for k in CONV_KINDS},
    "linear": ("fwd", "bin", "bw"),
    "bn": ("fwd", "bin"),  # BatchNorm's backward makes input and weight gradients in one
    **{k: ("fwd", "bin") for k in UNARY_KINDS},
    "add": ("fwd", "bin"),
    "mul": ("fwd", "bin"),  # (N,C,H,W) × (N,C,1,1): squeeze-and-excitation's scaling
    **{k: ("fwd", "bin") for k in POOL_KINDS},
    "view": ("fwd", "bin"),  # flatten/reshape: the per-call cost of a kernel that moves nothing
    **{k: ("step",) for k in OPT_KINDS},
}
# design points per kind and precision: the expensive, varied kinds get the most
_POINTS = {
    "conv": 500,
    "dwconv": 260,
    "gconv": 120,
    "linear": 120,
    "bn": 120,
    "add": 70,
    "mul": 70,
    "gap": 50,
    "avgpool": 50,
    "maxpool": 40,
    "view": 20,
    **{k: 45 for k in UNARY_KINDS},
}
_OPT_POINTS = 40
# the extra fp32 points of :func:`_extra_fp32`
_EXTRA_FP32 = {"conv": 900, "gconv": 300, "dwconv": 200, "bn": 200}
# caps keep one point's cost bounded (the bf16 convolutions run at ~1 GFLOP/s here)
_MAX_SAMPLE_ELEMS = 8e5  # per sample, any tensor (32 × 112 × 112 × 2)
_MAX_ELEMS = 2.5e7  # per tensor, whole micro-batch
_MAX_FLOPS = {"fp32": 6e9, "bf16": 1.5e9}
_SLOW_S = 0.25


class MicrobenchError(ValueError):
    """A microbenchmark file or design point is unusable."""


@dataclass(frozen=True)
class KernelPoint:
    """One kernel to time: its kind, precision and shape.

    Convolutions: ``cin``/``cout`` channels, ``k``×``k`` kernel, ``stride``, ``groups``,
    input ``h``×``w``. Elementwise, norm and pooling kinds: ``cin`` channels of
    ``h``×``w`` (pools: ``k``/``stride`` window). ``linear``: ``rows`` rows per sample
    (tokens) of ``cin`` features to ``cout``. Optimizers: ``tensors`` parameter
    tensors of ``elems`` elements in all. ``mb`` samples per call.
    """

    kind: str
    dtype: str
    mb: int = 1
    cin: int = 1
    cout: int = 1
    k: int = 1
    stride: int = 1
    groups: int = 1
    h: int = 1
    w: int = 1
    rows: int = 1
    tensors: int = 0
    elems: int = 0

    @property
    def key(self) -> str:
        """A stable identity of the point (what resuming skips on)."""
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind in CONV_KINDS:
            pad = self.k // 2
            return (
                (self.h + 2 * pad - self.k) // self.stride + 1,
                (self.w + 2 * pad - self.k) // self.stride + 1,
            )
        if self.kind == "avgpool":
            return math.ceil((self.h - self.k) / self.stride) + 1, math.ceil(
                (self.w - self.k) / self.stride
            ) + 1
        if self.kind == "maxpool":
            return (self.h + 2 - 3) // 2 + 1, (self.w + 2 - 3) // 2 + 1
        if self.kind == "gap":
            return 1, 1
        return self.h, self.w

    def flops(self) -> float:
        """Forward FLOPs (2 × MACs for convolutions and linear layers; elements otherwise)."""
        ho, wo = self.out_hw
        if self.kind in CONV_KINDS:
            return 2.0 * self.mb * self.cout * ho * wo * (self.cin // self.groups) * self.k**2
        if self.kind == "linear":
            return 2.0 * self.mb * self.rows * self.cin * self.cout
        return float(self.mb * self.cin * self.h * self.w)


@dataclass
class KernelRecord:
    """The measured seconds of one :class:`KernelPoint` per phase (None: not timed)."""

    point: KernelPoint
    times: dict[str, float]
    repeats: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"point": asdict(self.point), "times": self.times, "repeats": self.repeats}
        )

    @classmethod
    def from_json(cls, line: str) -> KernelRecord:
        d = json.loads(line)
        try:
            return cls(
                KernelPoint(**d["point"]),
                {k: float(v) for k, v in d["times"].items()},
                int(d.get("repeats", 0)),
            )
        except (KeyError, TypeError) as exc:
            raise MicrobenchError(f"malformed kernel record ({exc})") from None


def _lhs(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Latin-hypercube points in ``[0, 1)^dims``."""
    from scipy.stats import qmc

    return qmc.LatinHypercube(d=dims, seed=rng).random(n)


def _logu(u: float, lo: float, hi: float) -> int:
    return max(int(lo), round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))


def _ok(p: KernelPoint) -> bool:
    ho, wo = p.out_hw
    if ho < 1 or wo < 1:
        return False
    if p.kind == "bn" and p.mb * p.h * p.w < 2:  # training BatchNorm needs two values
        return False
    per_sample = max(p.cin * p.h * p.w, p.cout * ho * wo, p.rows * max(p.cin, p.cout))
    if per_sample > _MAX_SAMPLE_ELEMS or per_sample * p.mb > _MAX_ELEMS:
        return False
    return p.flops() <= _MAX_FLOPS[p.dtype]


def _draw(kind: str, dtype: str, u: np.ndarray, rng: np.random.Generator) -> KernelPoint:
    """One design point of ``kind`` from a unit-cube row ``u`` (6 dims)."""
    mb = _logu(u[0], 1, 64)
    h = _logu(u[1], 1, 112)
    if kind in CONV_KINDS:
        k = int(rng.choice([1, 3, 5, 7], p=[0.35, 0.35, 0.15, 0.15]))
        stride = 2 if u[4] < 0.25 else 1
        if kind == "conv":
            cin = _logu(u[2], 3, 2048)
            cout = _logu(u[3], 8, 2048)
            groups = 1
        elif kind == "dwconv":
            k = int(rng.choice([3, 5, 7]))
            cin = cout = groups = _logu(u[2], 8, 2048)
        else:
            groups = int(rng.choice([2, 4, 8]))
            cin = groups * _logu(u[2], 1, 256)
            cout = groups * _logu(u[3], 1, 256)
            k = int(rng.choice([1, 3, 5]))
        return KernelPoint(kind, dtype, mb, cin, cout, k, stride, groups, h, h)
    if kind == "linear":
        rows = 1 if u[4] < 0.6 else _logu(u[5], 1, 256)
        return KernelPoint(kind, dtype, mb, _logu(u[2], 8, 4096), _logu(u[3], 8, 4096), rows=rows)
    c = _logu(u[2], 3, 2048)
    if kind == "avgpool":
        k = int(rng.choice([2, 3, 7]))
        return KernelPoint(
            kind, dtype, mb, c, c, k, k if u[4] < 0.7 else 1, 1, max(h, k), max(h, k)
        )
    if kind == "maxpool":
        return KernelPoint(kind, dtype, mb, c, c, 3, 2, 1, max(h, 2), max(h, 2))
    return KernelPoint(kind, dtype, mb, c, c, h=h, w=h)


def _round8(c: int, u: float) -> int:
    """``c`` rounded to a multiple of 8 when ``u`` < 0.6: networks mostly use such channel
    counts, and oneDNN's fp32 kernels block channels by 8 (AVX2), so both regimes are sampled."""
    return max(8, 8 * round(c / 8)) if u < 0.6 else c


def _extra_fp32(seed: int, scale: float) -> list[KernelPoint]:
    """More fp32 points for the kinds whose fp32 times vary most with shape (oneDNN picks
    its algorithm by shape): dense and grouped convolutions, depthwise convolutions and
    BatchNorm. Their own random stream (``seed + 2``) and appended after the first design,
    so the points measured before stay the same and a resumed file only adds these."""
    rng = np.random.default_rng(seed + 2)
    points: list[KernelPoint] = []
    for kind, n in _EXTRA_FP32.items():
        m, got = max(2, round(n * scale)), []
        for _ in range(8):
            for u in _lhs(2 * m, 7, rng):
                p = _draw(kind, "fp32", u[:6], rng)
                if kind == "conv":
                    p = replace(
                        p,
                        cin=_round8(p.cin, u[6]) if p.cin > 8 else p.cin,
                        cout=_round8(p.cout, u[6]),
                    )
                elif kind == "dwconv":
                    c = _round8(p.cin, u[6])
                    p = replace(p, cin=c, cout=c, groups=c)
                elif kind == "gconv":
                    p = replace(
                        p,
                        cin=p.groups * _round8(p.cin // p.groups, u[6])
                        if p.cin // p.groups > 8
                        else p.cin,
                    )
                elif kind == "bn":
                    c = _round8(p.cin, u[6])
                    p = replace(p, cin=c, cout=c)
                if _ok(p) and len(got) < m:
                    got.append(p)
            if len(got) >= m:
                break
        points += got
    # late stages at low resolution: 1×1 and 3×3 convolutions on 1–8 px, where oneDNN
    # switches algorithm with the micro-batch (a 1×1 on 2×2 px runs 8× faster from 16
    # samples up); both precisions
    for dtype, n in (("fp32", 300), ("bf16", 150)):
        m, got = max(2, round(n * scale)), []
        for u in _lhs(3 * m, 5, rng):
            k = 1 if u[4] < 0.6 else 3
            h, mb = _logu(u[0], 1, 8), _logu(u[1], 1, 64)
            cin, cout = _round8(_logu(u[2], 16, 2048), 0), _round8(_logu(u[3], 16, 2048), 0)
            p = KernelPoint("conv", dtype, mb, cin, cout, k, 1, 1, h, h)
            if _ok(p) and len(got) < m and p not in got:
                got.append(p)
        points += got
    order = rng.permutation(len(points))
    return [points[i] for i in order]


def design(seed: int = 0, scale: float = 1.0) -> list[KernelPoint]:
    """The generic design: every kind × precision, Latin-hypercube over its shape ranges,
    points over the caps dropped, shuffled (so a partial run covers every kind)."""
    rng = np.random.default_rng(seed)
    points: list[KernelPoint] = []
    for dtype in DTYPES:
        for kind, n in _POINTS.items():
            m = max(2, round(n * scale))
            got: list[KernelPoint] = []
            for _ in range(8):  # redraw until enough points pass the caps
                for u in _lhs(2 * m, 6, rng):
                    p = _draw(kind, dtype, u, rng)
                    if _ok(p) and len(got) < m:
                        got.append(p)
                if len(got) >= m:
                    break
            points += got
    # lite residual branches put 5×5 convs of 2 groups on up to 2048 channels: wide grouped
    # convs get their own draw (its own stream, so the points above stay as they were)
    wide = np.random.default_rng(seed + 1)
    for dtype in DTYPES:
        n, got = max(2, round(60 * scale)), []
        for u in _lhs(4 * n, 6, wide):
            g = int(wide.choice([2, 4]))
            mb, h = _logu(u[0], 1, 64), _logu(u[1], 1, 32)
            cin, cout = g * _logu(u[2], 64, 1024), g * _logu(u[3], 8, 512)
            p = KernelPoint("gconv", dtype, mb, cin, cout, int(wide.choice([3, 5])), 1, g, h, h)
            if _ok(p) and len(got) < n:
                got.append(p)
        points += got
    for kind in OPT_KINDS:
        for u in _lhs(max(2, round(_OPT_POINTS * scale)), 2, rng):
            tensors = _logu(u[0], 1, 400)
            elems = max(tensors, _logu(u[1], 100, 3e7))
            points.append(KernelPoint(kind, "fp32", tensors=tensors, elems=elems))
    order = rng.permutation(len(points))
    return [points[i] for i in order] + _extra_fp32(seed, scale)


def _clock(fn: Callable[[], object]) -> tuple[float, int]:
    """Median seconds of ``fn`` after one warm-up call (the warm-up alone when slow)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > _SLOW_S:
        t0 = time.perf_counter()
        fn()
        return min(first, time.perf_counter() - t0), 2
    reps = 3 if first > 0.02 else 7
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), reps


def _module(p: KernelPoint) -> Callable[..., torch.Tensor]:
    if p.kind in CONV_KINDS:
        return nn.Conv2d(p.cin, p.cout, p.k, p.stride, p.k // 2, groups=p.groups, bias=False)
    if p.kind == "linear":
        return nn.Linear(p.cin, p.cout)
    if p.kind == "bn":
        return nn.BatchNorm2d(p.cin).train()
    simple: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "hswish": nn.Hardswish,
        "hsigmoid": nn.Hardsigmoid,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "gap": lambda: nn.AdaptiveAvgPool2d(1),
        "maxpool": lambda: nn.MaxPool2d(3, 2, 1),
        "view": nn.Flatten,
    }
    if p.kind in simple:
        return simple[p.kind]()
    if p.kind == "avgpool":
        return nn.AvgPool2d(p.k, p.stride, ceil_mode=True)
    if p.kind == "add":
        return torch.add
    if p.kind == "mul":
        return torch.mul
    raise MicrobenchError(f"unknown kernel kind {p.kind!r}")


def _optimizer_times(p: KernelPoint, gen: torch.Generator) -> dict[str, float]:
    sizes = np.random.default_rng(p.tensors * 7919 + p.elems).dirichlet(np.ones(p.tensors))
    numel = np.maximum(1, np.round(sizes * p.elems)).astype(int)
    params = [nn.Parameter(torch.randn(int(n), generator=gen)) for n in numel]
    for q in params:
        q.grad = torch.randn(q.shape, generator=gen)
    if p.kind == "opt_sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False)
    elif p.kind == "opt_adam":
        opt = torch.optim.Adam(params, lr=1e-3, foreach=False)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    opt.step()  # the first step makes the state
    t, reps = _clock(opt.step)
    return {"step": t, "repeats": reps}


def measure(p: KernelPoint, seed: int = 0) -> KernelRecord:
    """Time one design point on the current thread setting (see the module docstring)."""
    if p.kind not in KINDS or p.dtype not in DTYPES:
        raise MicrobenchError(f"unknown kernel kind/precision {p.kind!r}/{p.dtype!r}")
    gen = torch.Generator().manual_seed(seed)
    if p.kind in OPT_KINDS:
        times = _optimizer_times(p, gen)
        reps = int(times.pop("repeats"))
        return KernelRecord(p, times, reps)
    half = p.dtype == "bf16"
    dt = torch.bfloat16 if half else torch.float32

    def amp() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext()

    fn = _module(p)
    if p.kind == "linear":
        shape: tuple[int, ...] = (p.mb * p.rows, p.cin) if p.rows == 1 else (p.mb, p.rows, p.cin)
    else:
        shape = (p.mb, p.cin, p.h, p.w)
    x = torch.randn(shape, generator=gen).to(dt).requires_grad_(True)
    args: tuple[torch.Tensor, ...] = (x,)
    if p.kind == "add":
        args = (x, torch.randn(shape, generator=gen).to(dt).requires_grad_(True))
    elif p.kind == "mul":
        s = torch.randn((p.mb, p.cin, 1, 1), generator=gen).to(dt).requires_grad_(True)
        args = (x, s)

    def forward() -> torch.Tensor:
        with amp():
            return fn(*args)

    t_fwd, reps = _clock(forward)
    times = {"fwd": t_fwd}
    y = forward()
    gy = torch.randn(y.shape, generator=gen).to(y.dtype)
    inputs = list(args)
    if p.kind == "bn":
        inputs += [fn.weight, fn.bias]  # type: ignore[union-attr]
    times["bin"], _ = _clock(lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True))
    if "bw" in KINDS[p.kind]:
        weights = [fn.weight]  # type: ignore[union-attr]
        times["bw"], _ = _clock(lambda: torch.autograd.grad(y, weights, gy, retain_graph=True))
    return KernelRecord(p, times, reps)


def baseline_overheads(repeats: int = 200) -> dict[str, float]:
    """Seconds of the measuring harness itself: a ``torch.autograd.grad`` call through one
    trivial node (each backward time includes one; a step's single backward call does not)."""
    x = torch.ones(1, requires_grad=True)
    y = x.view(1)
    g = torch.ones(1)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.autograd.grad(y, x, g, retain_graph=True)
        samples.append(time.perf_counter() - t0)
    return {"grad_call_s": statistics.median(samples)}


def read_records(path: Path) -> tuple[dict[str, Any], list[KernelRecord]]:
    """The header and the records of a microbenchmark JSONL file (a torn last line skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MicrobenchError(f"{path}: no such microbenchmark file")
    header: dict[str, Any] = {}
    records: list[KernelRecord] = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line", path)
                continue
            raise MicrobenchError(f"{path}:{i + 1}: not JSON") from None
        if "header" in d:
            header = d["header"]
        else:
            records.append(KernelRecord.from_json(line))
    if header.get("format") != FORMAT_VERSION:
        raise MicrobenchError(
            f"{path}: not an aiop kernel microbenchmark file (format {FORMAT_VERSION})"
        )
    return header, records


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()


def collect(
    out: Path, seed: int = 0, scale: float = 1.0, limit: int | None = None, progress: bool = True
) -> Iterator[KernelRecord]:
    """Measure the design's points not yet in ``out`` (created with a header if new),
    appending each record as it is made; yields the new records."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if out.exists() and out.stat().st_size:
        header, done_records = read_records(out)
        if header.get("seed") != seed or header.get("scale") != scale:
            raise MicrobenchError(
                f"{out} was made with seed {header.get('seed')} scale {header.get('scale')}; "
                f"resume with the same or write another file"
            )
        # a torn last line: cut it so the next append starts a fresh line
        text = out.read_text()
        if not text.endswith("\n"):
            out.write_text(text[: text.rfind("\n") + 1])
        done = {r.point.key for r in done_records}
    else:
        header = {
            "format": FORMAT_VERSION,
            "seed": seed,
            "scale": scale,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            **baseline_overheads(),
        }
        out.write_text(json.dumps({"header": header}) + "\n")
        done = set()
    todo = [p for p in design(seed, scale) if p.key not in done]
    if limit is not None:
        todo = todo[:limit]
    for i, p in enumerate(tqdm(todo, desc="kernels", unit="pt", disable=not progress)):
        rec = measure(p, seed=seed + i)
        _append(out, rec.to_json())
        yield rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the kernel kinds of a training step.")
    parser.add_argument(
        "-out",
        default="data/kernel_bench/cpu_1thread.jsonl",
        help="JSON-lines file to append to; points already in it are skipped (resume)",
    )
    parser.add_argument("-seed", type=int, default=0, help="seed of the shape design")
    parser.add_argument("-scale", type=float, default=1.0, help="design size multiplier")
    parser.add_argument("-limit", type=int, default=None, help="measure at most this many")
    parser.add_argument("-q", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        n = sum(1 for _ in collect(Path(args.out), args.seed, args.scale, args.limit, not args.q))
    except MicrobenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} new kernel records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
