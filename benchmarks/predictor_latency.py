"""Training-step latency on held-out architectures: analytic model, GNN correction, AIO-P.

The store's latency labels (``latency_s`` of ``-mode real`` runs on this CPU, one
thread) are predicted by these predictors, each fitted on the training split only:

* ``kernels``: the kernel-level step cost of :mod:`aiop.predictor.latency` — the sum of
  the kernels the step runs, priced by the kernel regressors of
  :mod:`aiop.predictor.kernels` (fitted on generic microbenchmarks, no label), under its
  few constants fitted on the training labels;
* ``default``: the default GNN (GINE) learning ``log(measured / kernels)``;
* ``analytic``: the older 30-term analytic step cost with its device constants fitted
  (least squares on log latency) on the training labels; ``terms_gnn`` (with
  ``-settings``): the GNN on top of it (the previous default);
* ``aiop``: AIO-P's baseline (6 × GraphConv, 32 wide, tanh, mean pool) predicting
  latency itself (``log`` normaliser), no analytic input.

Splits: leave one family out over the OFA families (train on two, test on the
third), and a random architecture split inside the families (20 % of each
family's architectures held out, the same for every predictor). Reports MAPE,
median and p95 APE, SRCC and the share within ±10 % (target: MAPE ≤ 10 % on
held-out architectures), and the fitted constants. Writes
``benchmarks/results/predictor_latency.json``, ``.md`` and
``predictor_latency_scatter.png``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predictor_latency.py [-epochs 60] [-seeds 1] \
        [-settings kernels default analytic aiop] [-kernel_model FILE]
"""

from __future__ import annotations

import argparse
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

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("kernels", "default", "analytic", "terms_gnn", "aiop")
DEFAULT_SETTINGS = ("kernels", "default", "analytic", "aiop")
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


def _by_graph(samples: list[Any]) -> dict[str, list[Any]]:
    """Samples by graph fingerprint, in first-seen order (as ``collect_predictions`` walks)."""
    out: dict[str, list[Any]] = {}
    for s in samples:
        out.setdefault(s.cg.meta.get("fp") or s.cg.fingerprint, []).append(s)
    return out


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


_KERNELS: dict[str, Any] = {}


def _kernel_model(args: argparse.Namespace) -> Any:
    """The kernel model every split shares (it is fitted on microbenchmarks, not labels)."""
    from aiop.predictor.kernels import DEFAULT_KERNEL_MODEL, KernelModel

    path = args.kernel_model or str(DEFAULT_KERNEL_MODEL)
    if path not in _KERNELS:
        _KERNELS[path] = KernelModel.load(path)
    return _KERNELS[path]


class _LatencyAlone:
    """A predictor's latency model without its GNN, in ``collect_predictions``' shape."""

    def __init__(self, pred: Any) -> None:
        self.pred = pred

    def predict(self, cg: Any, configs: list[Any]) -> list[dict[str, float]]:
        return [{"latency_s": float(v)} for v in self.pred.analytic_latency(cg, configs)]


def _fit(setting: str, train: list[Any], args: argparse.Namespace, seed: int) -> Any:
    from aiop.predictor.api import Predictor
    from aiop.predictor.model import GNNSpec
    from aiop.predictor.train import AnalyticPredictor

    if setting == "analytic":
        pred = AnalyticPredictor()
        pred.fit_latency(train)
        return pred
    kernels = _kernel_model(args)
    if setting == "kernels":
        alone = Predictor(targets=["latency"], kernel_model=kernels)
        if alone.fit_latency_model(train) is None:
            raise SystemExit("too few latency labels to fit on")
        return _LatencyAlone(alone)
    spec = GNNSpec.aiop_baseline() if setting == "aiop" else GNNSpec()
    pred = Predictor(
        spec=spec,
        targets=["latency"],
        epochs=args.epochs,
        seed=seed,
        progress=not args.q,
        analytic=setting != "aiop",
        latency_kind="terms" if setting == "terms_gnn" else "kernels",
        kernel_model=kernels,
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
    tagged: dict[str, tuple[list[float], list[float], list[tuple[str, str]]]] = {}
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
        for setting in args.settings:
            seeds = [0] if setting in ("analytic", "kernels") else list(range(args.seeds))
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
                if kind == "lofo":
                    # (collect_predictions keeps the samples' order within each graph)
                    tags = [
                        (s.family, s.config.prec)
                        for group in _by_graph(test).values()
                        for s in group
                        if "latency" in s.labels
                    ]
                    if len(tags) != len(pairs.y_true):
                        raise SystemExit("internal: latency pairs and their tags differ")
                    ty, tp, tt = tagged.setdefault(setting, ([], [], []))
                    ty += pairs.y_true
                    tp += pairs.y_pred
                    tt += tags
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
    from aiop.predictor.api import Predictor
    from aiop.predictor.train import AnalyticPredictor

    everything = AnalyticPredictor()
    model = everything.fit_latency(samples)
    kernel_all = Predictor(targets=["latency"], kernel_model=_kernel_model(args))
    kmodel = kernel_all.fit_latency_model(samples)
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
        "kernel_constants_all_labels": {
            "readable": kmodel.describe() if kmodel is not None else {},
            "in_sample_median_ape": kmodel.fit_median_ape if kmodel is not None else None,
        },
        "breakdown": _breakdown({"lofo_tagged": tagged}),
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


def _breakdown(pooled: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Leave-one-family-out errors per predictor by precision and by held-out family."""
    from aiop.predictor.metrics import regression_metrics

    out: dict[str, dict[str, dict[str, float]]] = {}
    for setting, (ys, ps, tags) in pooled.get("lofo_tagged", {}).items():
        groups: dict[str, tuple[list[float], list[float]]] = {}
        for y, p, (fam, prec) in zip(ys, ps, tags):
            for g in (prec, fam):
                a, b = groups.setdefault(g, ([], []))
                a.append(y)
                b.append(p)
        out[setting] = {
            g: {k: v for k, v in regression_metrics(a, b).items() if k in METRICS}
            for g, (a, b) in sorted(groups.items())
        }
    return out


def _markdown(result: dict[str, Any]) -> str:
    names = {
        "kernels": "kernel sum (microbenchmarked kernels, few constants fitted)",
        "default": "default GNN (GINE) × kernel sum",
        "analytic": "30-term analytic step cost, calibrated (previous model)",
        "terms_gnn": "GNN (GINE) × 30-term analytic (previous default)",
        "aiop": "AIO-P baseline (6 × GraphConv 32, tanh, mean; log)",
    }
    settings = [s for s in SETTINGS if any(s in by for by in result["summary"].values())]
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
    lines.append("| split | " + " | ".join(names[s] for s in settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    for name, split in result["splits"].items():
        cells = []
        for s in settings:
            runs = split.get(s, [])
            mape = np.mean([r["mape"] for r in runs]) if runs else float("nan")
            med = np.mean([r["median_ape"] for r in runs]) if runs else float("nan")
            cells.append(f"{mape:.1f} % / {med:.1f} %")
        lines.append(f"| {name} ({split['test_samples']} labels) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Held-out error by precision and family (leave one family out, MAPE / median APE)**",
        "",
    ]
    bd = result.get("breakdown", {})
    if bd:
        cols = sorted({g for by in bd.values() for g in by})
        lines.append("| predictor | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for s, by in bd.items():
            cells = [
                f"{by[g]['mape']:.1f} % / {by[g]['median_ape']:.1f} % (n {by[g]['n']})"
                if g in by
                else "–"
                for g in cols
            ]
            lines.append(f"| {names[s]} | " + " | ".join(cells) + " |")
    kc = result.get("kernel_constants_all_labels", {})
    if kc.get("readable"):
        lines += ["", "**Kernel-sum constants fitted on every label**", ""]
        for k, v in kc["readable"].items():
            lines.append(f"- {k}: {v:.4g}")
    lines += ["", "**30-term device constants fitted on every label (one thread, this CPU)**", ""]
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
    parser.add_argument("-settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "-kernel_model", default=None, help="kernel model JSON (default: this CPU's)"
    )
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
    md = _markdown(result)
    write_results(out, args.name, result, md, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
