"""Training-step latency on held-out architectures: analytic model, GNN correction, AIO-P.

The store's latency labels (``latency_s`` of ``-mode real`` runs on this CPU, one
thread) are predicted by three predictors, each fitted on the training split only:

* ``analytic``: the analytic step cost of :mod:`aiop.predictor.latency` with its
  device constants fitted (least squares on log latency) on the training labels;
* ``default``: the default GNN (GINE) learning ``log(measured / analytic)``;
* ``aiop``: AIO-P's baseline (6 × GraphConv, 32 wide, tanh, mean pool) predicting
  latency itself (``log`` normaliser), no analytic input.

Splits: leave one family out over the OFA families (train on two, test on the
third), and a random architecture split inside the families (20 % of each
family's architectures held out, the same for every predictor). Reports MAPE,
median and p95 APE, SRCC and the share within ±10 % (target: MAPE ≤ 10 % on
held-out architectures), and the fitted constants. Writes
``benchmarks/results/predictor_latency.json``, ``.md`` and
``predictor_latency_scatter.png``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predictor_latency.py [-epochs 60] [-seeds 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("analytic", "default", "aiop")
METRICS = ("n", "mape", "median_ape", "p95_ape", "srcc", "within_10")


def _snapshot(store: Path, tmp: Path) -> Path:
    """A consistent copy of a store another process may still be writing (SQLite backup)."""
    import sqlite3

    from aiop.cache import Store

    dst = tmp / "snapshot.db"
    with Store(store, readonly=True) as src:
        conn = sqlite3.connect(dst)
        src._conn.backup(conn)
        conn.close()
    return dst


def _random_split(samples: list[Any], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``share`` of every family's architectures (all their configurations)."""
    held: set[str] = set()
    for family in sorted({s.family for s in samples}):
        graphs = sorted({s.cg.meta["fp"] for s in samples if s.family == family})
        rng = random.Random(f"aiop-latency-split:{seed}:{family}")
        held |= set(rng.sample(graphs, max(1, round(share * len(graphs)))))
    train = [s for s in samples if s.cg.meta["fp"] not in held]
    test = [s for s in samples if s.cg.meta["fp"] in held]
    return train, test


def _fit(setting: str, train: list[Any], args: argparse.Namespace, seed: int) -> Any:
    from aiop.predictor.api import Predictor
    from aiop.predictor.model import GNNSpec
    from aiop.predictor.train import AnalyticPredictor

    if setting == "analytic":
        pred = AnalyticPredictor()
        pred.fit_latency(train)
        return pred
    spec = GNNSpec() if setting == "default" else GNNSpec.aiop_baseline()
    pred = Predictor(
        spec=spec,
        targets=["latency"],
        epochs=args.epochs,
        seed=seed,
        progress=not args.q,
        analytic=setting == "default",
    )
    pred.fit(train)
    return pred


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiop.predictor.metrics import regression_metrics
    from aiop.predictor.train import collect_predictions, families_of, load_samples

    tmp = Path(tempfile.mkdtemp(prefix="aiop-latency-"))
    try:
        samples = load_samples(_snapshot(Path(args.store), tmp), ["latency"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    samples = [s for s in samples if "latency" in s.labels and s.family in args.families]
    if not samples:
        raise SystemExit(f"{args.store}: no latency labels of the families {args.families}")
    known = families_of(samples)
    splits: list[tuple[str, list[Any], list[Any]]] = [
        (f"lofo:{f}", [s for s in samples if s.family != f], [s for s in samples if s.family == f])
        for f in known
        if len(known) > 1
    ]
    train_r, test_r = _random_split(samples, args.holdout, seed=0)
    splits.append(("random", train_r, test_r))
    pooled: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    per_split: dict[str, dict[str, Any]] = {}
    fit_s: dict[str, float] = {}
    for name, train, test in splits:
        per_split[name] = {
            "train": {
                "samples": len(train),
                "architectures": len({s.cg.meta["fp"] for s in train}),
            },
            "test_samples": len(test),
            "test_architectures": len({s.cg.meta["fp"] for s in test}),
        }
        kind = "lofo" if name.startswith("lofo") else "random"
        for setting in SETTINGS:
            seeds = [0] if setting == "analytic" else list(range(args.seeds))
            for seed in seeds:
                t0 = time.perf_counter()
                pred = _fit(setting, train, args, seed)
                fit_s[setting] = fit_s.get(setting, 0.0) + time.perf_counter() - t0
                pairs = collect_predictions(pred, test, ["latency"])["latency"]
                metrics = regression_metrics(pairs.y_true, pairs.y_pred)
                per_split[name].setdefault(setting, []).append({k: metrics[k] for k in METRICS})
                ys, ps = pooled.setdefault(kind, {}).setdefault(setting, ([], []))
                ys += pairs.y_true
                ps += pairs.y_pred
                print(
                    f"{name:16s} {setting:9s} seed {seed}: MAPE {metrics['mape']:.1f} %, "
                    f"median {metrics['median_ape']:.1f} %, SRCC {metrics['srcc']:.3f}",
                    flush=True,
                )
    summary = {
        kind: {
            setting: {k: v for k, v in regression_metrics(ys, ps).items() if k in METRICS}
            for setting, (ys, ps) in by_setting.items()
        }
        for kind, by_setting in pooled.items()
    }
    from aiop.predictor.train import AnalyticPredictor

    everything = AnalyticPredictor()
    model = everything.fit_latency(samples)
    return {
        "store": str(args.store),
        "labels": len(samples),
        "architectures": known,
        "configs_by_prec": {
            p: sum(1 for s in samples if s.config.prec == p) for p in ("fp32", "bf16", "fp16")
        },
        "epochs": args.epochs,
        "seeds": args.seeds,
        "holdout": args.holdout,
        "summary": summary,
        "splits": per_split,
        "fit_seconds": fit_s,
        "constants_all_labels": {
            "raw": dict(zip(model.terms, model.constants)),
            "readable": model.describe(),
            "in_sample_median_ape": model.fit_median_ape,
        },
        "pooled": {
            kind: {s: {"y_true": ys, "y_pred": ps} for s, (ys, ps) in by.items()}
            for kind, by in pooled.items()
        },
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def _markdown(result: dict[str, Any]) -> str:
    names = {
        "analytic": "analytic step cost, calibrated (ablation)",
        "default": "default GNN (GINE) × analytic",
        "aiop": "AIO-P baseline (6 × GraphConv 32, tanh, mean; log)",
    }
    lines = [
        f"Latency labels: {result['labels']} one-thread CPU training steps on "
        f"{sum(result['architectures'].values())} architectures "
        f"({', '.join(f'{f} {n}' for f, n in result['architectures'].items())}); "
        f"GNN: {result['epochs']} epochs, {result['seeds']} seed(s).",
        "",
    ]
    titles = {
        "lofo": "Leave one family out (pooled over the held-out families)",
        "random": f"Random architecture split ({result['holdout']:.0%} of each family held out)",
    }
    for kind, by in result["summary"].items():
        lines += [
            f"**{titles[kind]}**",
            "",
            "| predictor | n | MAPE | median APE | p95 APE | SRCC | within ±10 % |",
            "|---|---|---|---|---|---|---|",
        ]
        for setting, m in by.items():
            lines.append(
                f"| {names[setting]} | {m['n']} | {m['mape']:.1f} % | {m['median_ape']:.1f} % | "
                f"{m['p95_ape']:.1f} % | {m['srcc']:.3f} | {m['within_10'] * 100:.0f} % |"
            )
        lines.append("")
    lines += ["**Per held-out family (MAPE / median APE, seed mean)**", ""]
    lines.append("| split | " + " | ".join(names[s] for s in SETTINGS) + " |")
    lines.append("|---|" + "---|" * len(SETTINGS))
    for name, split in result["splits"].items():
        cells = []
        for s in SETTINGS:
            runs = split.get(s, [])
            mape = np.mean([r["mape"] for r in runs]) if runs else float("nan")
            med = np.mean([r["median_ape"] for r in runs]) if runs else float("nan")
            cells.append(f"{mape:.1f} % / {med:.1f} %")
        lines.append(f"| {name} ({split['test_samples']} labels) | " + " | ".join(cells) + " |")
    lines += ["", "**Device constants fitted on every label (one thread, this CPU)**", ""]
    for k, v in result["constants_all_labels"]["readable"].items():
        lines.append(f"- {k}: {v:.4g}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-store", default="data/labels.db")
    parser.add_argument("-families", nargs="+", default=["ofa_mbv3", "ofa_pn", "ofa_resnet"])
    parser.add_argument("-epochs", type=int, default=60)
    parser.add_argument("-seeds", type=int, default=1)
    parser.add_argument("-holdout", type=float, default=0.2)
    parser.add_argument("-name", default="predictor_latency")
    parser.add_argument("-out", default=str(RESULTS), help="directory of the result files")
    parser.add_argument("-q", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # PyG's scatter ops crawl with 2 threads on a shared 2-core box
    result = run(args)
    from aiop.predictor.metrics import scatter_plot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pooled = result["pooled"]["lofo" if "lofo" in result["pooled"] else "random"]
    scatter_plot(
        {s: (d["y_true"], d["y_pred"]) for s, d in pooled.items()},
        out / f"{args.name}_scatter.png",
        title="step latency, held-out family (leave one family out)",
        unit="s",
        log_scale=True,
    )
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = _markdown(result)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
