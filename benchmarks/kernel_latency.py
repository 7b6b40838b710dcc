"""Held-out error of the kernel regressors of :mod:`aiop.predictor.kernels`.

The microbenchmark records (``python -m aiop.profiler.microbench``) are split at random
into a training part and ``-holdout`` held-out kernels (by design point, every phase of a
point on the same side); the regressors are fitted on the first and judged on the second,
per kernel kind, precision and phase: MAPE, median and p95 APE, share within ±10 %.
Optimizer kinds are judged the same way on their ``step`` time. Writes
``benchmarks/results/kernel_latency.json`` and ``.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernel_latency.py \\
        [-bench data/kernel_bench/cpu_1thread.jsonl] [-holdout 0.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    ape = np.abs(p / y - 1.0) * 100.0
    return {
        "n": int(y.size),
        "mape": float(ape.mean()),
        "median_ape": float(np.median(ape)),
        "p95_ape": float(np.quantile(ape, 0.95)),
        "within_10": float(np.mean(ape <= 10.0)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiop.predictor.kernels import KernelModel, _point_columns, _record_times, features
    from aiop.profiler.microbench import KINDS, OPT_KINDS, read_records

    header, records = read_records(Path(args.bench))
    harness = float(header.get("grad_call_s", 0.0))
    rng = np.random.default_rng(args.seed)
    held = rng.random(len(records)) < args.holdout
    train = [r for r, h in zip(records, held) if not h]
    test = [r for r, h in zip(records, held) if h]
    model = KernelModel.fit(train, harness, progress=True)
    rows: dict[str, dict[str, float]] = {}
    pooled_y: list[float] = []
    pooled_p: list[float] = []
    by: dict[tuple[str, str], list[Any]] = {}
    for r in test:
        by.setdefault((r.point.kind, r.point.dtype), []).append(r)
    for (kind, dtype), rs in sorted(by.items()):
        if kind in OPT_KINDS:
            y = np.asarray([r.times["step"] for r in rs])
            p = np.asarray(
                [model.optimizer_s(kind[4:], r.point.tensors, r.point.elems) for r in rs]
            )
            rows[f"{kind}/{dtype}/step"] = _metrics(y, p)
            continue
        x = features(
            kind, np.asarray([r.point.mb for r in rs], float), _point_columns([r.point for r in rs])
        )
        for phase in KINDS[kind]:
            t = [_record_times(r, phase, harness) for r in rs]
            ok = np.asarray([v is not None for v in t])
            pred = model.predict(kind, dtype, phase, x)
            if pred is None or not ok.any():
                continue
            y = np.asarray([v for v in t if v is not None])
            p = pred[ok]
            rows[f"{kind}/{dtype}/{phase}"] = _metrics(y, p)
            pooled_y += y.tolist()
            pooled_p += p.tolist()
    return {
        "bench": str(args.bench),
        "records": len(records),
        "train_records": len(train),
        "test_records": len(test),
        "holdout": args.holdout,
        "harness_s": harness,
        "pooled": _metrics(np.asarray(pooled_y), np.asarray(pooled_p)),
        "by_kernel": rows,
    }


def _markdown(result: dict[str, Any]) -> str:
    p = result["pooled"]
    lines = [
        f"Kernel regressors: {result['train_records']} microbenchmark records to fit, "
        f"{result['test_records']} held out ({result['bench']}); one thread, this CPU.",
        "",
        f"Pooled over every held-out kernel and phase: n {p['n']}, MAPE {p['mape']:.1f} %, "
        f"median APE {p['median_ape']:.1f} %, p95 {p['p95_ape']:.1f} %, "
        f"within ±10 % {p['within_10'] * 100:.0f} %.",
        "",
        "| kernel / precision / phase | n | MAPE | median APE | p95 APE | within ±10 % |",
        "|---|---|---|---|---|---|",
    ]
    for k, m in result["by_kernel"].items():
        lines.append(
            f"| {k} | {m['n']} | {m['mape']:.1f} % | {m['median_ape']:.1f} % | "
            f"{m['p95_ape']:.1f} % | {m['within_10'] * 100:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-bench", default="data/kernel_bench/cpu_1thread.jsonl")
    parser.add_argument("-holdout", type=float, default=0.2)
    parser.add_argument("-seed", type=int, default=0)
    parser.add_argument("-name", default="kernel_latency")
    parser.add_argument("-out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = run(args)
    md = _markdown(result)
    write_results(args.out, args.name, result, md, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
