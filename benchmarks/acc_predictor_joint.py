#!/usr/bin/env python
"""How many labelled architectures of a family the accuracy predictor needs to rank the rest.

For each family T, a fixed test set is held out (every architecture of T outside the
``#n_max`` pool that ``run_gpi_acc_predictor.py -family_test T#n_max`` would pick with the
same split seed). The GNN then trains, per ``n`` in ``--ns`` and per seed, on

* ``joint``: every other family plus the first ``n`` architectures of T's pool (``n = 0``
  is zero-shot: only the other families), as ``run_gpi_acc_predictor.py -fine_tune_joint``;
* ``family``: the first ``n`` architectures of T's pool alone (``--no_family_only`` skips it),
* ``forest`` (a reference, not a graph predictor; ``--no_forest`` skips it): scikit-learn's
  random forest on the same ``n`` architectures, described by their family's own architecture
  encoding (every slot of the stored ``arch``: kernel sizes, expand ratios, depths, widths —
  which block of which stage exists) plus log FLOPs and parameters. It shows how far the
  labels can be ranked from ``n`` architectures when the slot identity is explicit,

and is scored on the same test set (SRCC, Kendall τ, MAPE). ``--acc_head forest`` (``ridge``,
``auto``) runs ``joint`` and ``family`` with the predictor's accuracy readout head on the
graph's block readout (``Predictor(acc_head=...)``) instead of the network's heads; the
network's training does not change the head's answer, so ``--epochs 0`` skips it. The
pool's order is fixed, so the ``n`` sets are nested and the curves differ only by how much
of T the network saw.

    python benchmarks/acc_predictor_joint.py --store data/task_labels.db \
        --task classification --families ofa_mbv3 ofa_pn --n_max 150 --ns 0 20 50 100 150
    python benchmarks/acc_predictor_joint.py --store data/task_labels.db --acc_head forest \
        --epochs 0 --task classification --families ofa_mbv3 ofa_pn --ns 20 50 100 150 \
        --out benchmarks/results/acc_predictor_v5_forest

Every run is appended to ``NAME_runs.jsonl`` as it finishes; a rerun with the same settings
skips the runs already there (an interrupted study resumes). Writes ``NAME.json``,
``NAME.md`` and ``NAME.png`` (SRCC against ``n``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results

from aiop.predictor.acc_heads import ACC_HEADS
from aiop.predictor.forest import DEFAULT_FOREST_KIND, FOREST_KINDS

TARGET_SRCC = 0.8  # issue #5: SRCC within a family on held-out architectures
# how tables and plots name a variant (the runs file keeps the short key)
SHOWN = {"forest": "arch-encoding forest (reference)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="data/task_labels.db")
    p.add_argument("--task", default="classification")
    p.add_argument("--acc_mode", default=None, help="label set (default: the default recipe's)")
    p.add_argument("--families", nargs="+", required=True, help="families to hold out in turn")
    p.add_argument("--n_max", type=int, default=150, help="size of the labelled pool of T")
    p.add_argument("--ns", type=int, nargs="+", default=[0, 20, 50, 100, 150])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gnn", default="default")
    p.add_argument("--pos_enc", type=int, default=0, help="GNNSpec.pos_enc (node positions)")
    p.add_argument("--acc_norm", default="global", choices=["global", "family"])
    p.add_argument("--acc_head", default="gnn", choices=list(ACC_HEADS))
    p.add_argument("--forest_kind", default=DEFAULT_FOREST_KIND, choices=FOREST_KINDS)
    p.add_argument("--forest_trees", type=int, default=200)
    p.add_argument(
        "--acc_share",
        default="0",
        help="--acc_head forest/ridge/auto: cross-task label sharing weight, or 'cv' "
        "(aiop.predictor.share)",
    )
    p.add_argument(
        "--share_tasks",
        nargs="*",
        default=[],
        help="tasks whose labels of the training architectures are shared into --task's",
    )
    p.add_argument("--no_family_only", action="store_true", help="skip the T-only curve")
    p.add_argument("--no_forest", action="store_true", help="skip the random-forest reference")
    p.add_argument("--out", default="benchmarks/results/acc_predictor_v4_joint")
    p.add_argument("--name", default=None, help="result stem (default: acc_joint_TASK)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("store", "task", "acc_mode", "n_max", "split_seed", "epochs", "batch_size", "lr")
    keys += ("gnn", "pos_enc", "acc_norm")
    if args.acc_head != "gnn":  # older result files have no such keys: they still resume
        keys += ("acc_head", "forest_kind", "forest_trees")
    if _shares(args):  # likewise
        keys += ("acc_share", "share_tasks")
    return {k: getattr(args, k) for k in keys}


def _shares(args: argparse.Namespace) -> bool:
    """Whether --acc_share asks for any cross-task sharing."""
    return args.acc_share not in ("0", 0, 0.0)


def _run_key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (run["family"], run["variant"], run["n"], run["seed"])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from aiop.predictor.metrics import mean_std

    groups: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for r in runs:
        groups.setdefault((r["family"], r["variant"], r["n"]), []).append(r["metrics"])
    return {
        f"{f}|{v}|{n}": {"family": f, "variant": v, "n": n, "metrics": mean_std(ms)}
        for (f, v, n), ms in sorted(groups.items())
    }


def _markdown(args: argparse.Namespace, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    head = "the network's head"
    if args.acc_head != "gnn":
        head = {
            "forest": f"the predictor's forest on the block readout ({args.forest_kind}, "
            f"{args.forest_trees} trees)",
            "ridge": "the predictor's standardised ridge on the block readout",
            "auto": f"the predictor's forest ({args.forest_kind}, {args.forest_trees} trees) "
            "or ridge on the block readout, whichever cross-validates better (each run in "
            "the runs file records which)",
        }[args.acc_head]
        if _shares(args):
            head += (
                f", its training labels shared with the same architectures' "
                f"{', '.join(args.share_tasks)} labels at weight {args.acc_share}"
            )
    lines = [
        f"# Accuracy predictor: labelled architectures of a family vs SRCC ({args.task})",
        "",
        f"Command: `python benchmarks/acc_predictor_joint.py {' '.join(sys.argv[1:])}`",
        "",
        "Fixed test set per family (the architectures outside its `#n_max` pool); "
        "`joint` trains on the other families plus `n` of the pool, `family` on the `n` "
        f"alone; {args.seeds} seed(s), mean ± std. Target: SRCC ≥ {TARGET_SRCC}. "
        f"Accuracy answered by: {head}.",
        "",
    ]
    for fam, info in meta.items():
        lines.append(
            f"* {fam}: pool {info['pool']}, test {info['test']} architectures, other families "
            f"{info['other_archs']} architectures"
        )
    lines += [
        "",
        "| family | variant | n | SRCC | Kendall τ | MAPE % |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary.values():

        def cell(key: str, scale: float = 1.0, digits: int = 3, row: dict = row) -> str:
            s = row["metrics"].get(key, {})
            if "mean" not in s:
                return "–"
            return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"

        lines.append(
            f"| {row['family']} | {SHOWN.get(row['variant'], row['variant'])} | {row['n']} | "
            f"{cell('srcc')} | "
            f"{cell('kendall')} | {cell('mape', 1, 2)} |"
        )
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for row in summary.values():
        s = row["metrics"].get("srcc", {})
        if "mean" in s:
            curves.setdefault((row["family"], row["variant"]), []).append(
                (row["n"], s["mean"], s["std"])
            )
    families = sorted({fam for fam, _ in curves})
    styles = {"joint": ("-", "o"), "family": ("--", "s"), "forest": (":", "^")}
    for (fam, var), pts in sorted(curves.items()):
        pts.sort()
        line, marker = styles.get(var, ("-.", "x"))
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            color=f"C{families.index(fam)}",  # colour: family; line style: variant
            marker=marker,
            linestyle=line,
            capsize=3,
            label=f"{fam} ({SHOWN.get(var, var)})",
        )
    ax.axhline(TARGET_SRCC, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("labelled architectures of the family in training (n)")
    ax.set_ylabel("SRCC on the family's held-out architectures")
    ax.set_title(f"accuracy predictor, {task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from aiop.predictor.api import Predictor
    from aiop.predictor.metrics import regression_metrics
    from aiop.predictor.train import (
        ACC_MODE,
        _fp,
        collect_predictions,
        fit_predictor,
        load_samples,
        make_spec,
        parse_acc_mode,
        split_by_family,
    )

    torch.set_num_threads(1)
    target = f"acc:{args.task}"
    acc_mode = ACC_MODE if args.acc_mode is None else parse_acc_mode(args.acc_mode)
    samples = load_samples(args.store, [target], acc_mode=acc_mode)
    if not samples:
        raise ValueError(f"{args.store}: no {target} labels")
    # other tasks' labels, shared into the target's for the architectures it trains on
    share_targets = [f"acc:{t}" for t in args.share_tasks if t != args.task]
    shared_by_model: dict[str, list[Any]] = {}
    if share_targets:
        for s in load_samples(args.store, share_targets, acc_mode=acc_mode):
            if s.cg.meta.get("model"):
                shared_by_model.setdefault(s.cg.meta["model"], []).append(s)
    name = args.name or f"acc_joint_{args.task}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / f"{name}_runs.jsonl"
    settings = _settings(args)
    runs: list[dict[str, Any]] = []
    if runs_path.exists():  # resume: keep the runs made with the same settings
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("settings") == settings:
                runs.append(r)
    done = {_run_key(r) for r in runs}
    plan: list[tuple[str, str, int, int]] = []
    meta: dict[str, Any] = {}
    splits: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}
    for fam in args.families:
        split = split_by_family(samples, f"{fam}#{args.n_max}", args.split_seed)
        pool = list(split.finetune_graphs[fam])
        random.Random(f"aiop-joint:{args.split_seed}:{fam}").shuffle(pool)
        rank = {fp: i for i, fp in enumerate(pool)}
        pool_samples = sorted(split.finetune[fam], key=lambda s: rank[_fp(s.cg)])
        splits[fam] = (split.train, pool_samples, split.test[fam])
        meta[fam] = {
            "pool": len(pool),
            "test": len({_fp(s.cg) for s in split.test[fam]}),
            "other_archs": len({_fp(s.cg) for s in split.train}),
        }
        for n in args.ns:
            if n > args.n_max:
                raise ValueError(f"--ns {n} is larger than --n_max {args.n_max}")
            variants = ["joint"] + (["family"] if n >= 2 and not args.no_family_only else [])
            variants += ["forest"] if n >= 2 and not args.no_forest else []
            for var in variants:
                for seed in range(args.seeds):
                    if (fam, var, n, seed) not in done:
                        plan.append((fam, var, n, seed))
    t0 = time.perf_counter()
    for fam, var, n, seed in tqdm(plan, desc=name, disable=args.quiet):
        others, pool_samples, test = splits[fam]
        first = _first_archs([_fp(s.cg) for s in pool_samples], n)
        chosen = [s for s in pool_samples if _fp(s.cg) in first]
        t1 = time.process_time()
        if var == "forest":
            y_true, y_pred = _forest(args.store, chosen, test, target, seed)
        else:
            pred = Predictor(
                spec=replace(make_spec(args.gnn), pos_enc=args.pos_enc),
                targets=[target, *share_targets],
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                progress=False,
                acc_head=args.acc_head,
                forest_kind=args.forest_kind,
                forest_trees=args.forest_trees,
                acc_share=args.acc_share,
            )
            train = chosen if var == "family" else [*others, *chosen]
            models = sorted({s.cg.meta.get("model") for s in train} - {None})
            train = [*train, *(s for m in models for s in shared_by_model.get(m, []))]
            fit_predictor(pred, train, args.acc_norm)
            pr = collect_predictions(pred, test, [target])[target]
            y_true, y_pred = pr.y_true, pr.y_pred
        run = {
            "settings": settings,
            "family": fam,
            "variant": var,
            "n": n,
            "seed": seed,
            "metrics": regression_metrics(y_true, y_pred),
            "cpu_seconds": round(time.process_time() - t1, 1),
        }
        if var != "forest" and pred.acc_share_chosen:
            run["acc_share_chosen"] = pred.acc_share_chosen.get(target)
        if var != "forest" and args.acc_head == "auto":
            run["acc_head"] = pred.acc_head_summary().get(target)
        runs.append(run)
        with runs_path.open("a") as fh:  # one line per finished run: a killed study resumes
            fh.write(json.dumps(run) + "\n")
    summary = _summary(runs)
    result = {
        "settings": settings,
        "families": meta,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),  # this invocation's (a resume: less)
        "cpu_seconds_all_runs": round(sum(r["cpu_seconds"] for r in runs), 1),
        "runs": len(runs),
    }
    write_results(out, name, result, _markdown(args, summary, meta))
    png = out / f"{name}.png"
    _plot(summary, png, args.task)
    result["plot"] = str(png)
    return result


def _flatten(value: Any, prefix: str, out: dict[str, float]) -> None:
    """Every number of a stored ``arch`` under a slot name (``ks.2.1``), list lengths too."""
    if isinstance(value, int | float):  # bool is an int
        out[prefix] = float(value)
    elif isinstance(value, list):
        out[f"{prefix}.len"] = float(len(value))
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
    elif isinstance(value, dict):
        for k in sorted(value):
            if k not in ("family", "seed"):  # names, not architecture
                _flatten(value[k], f"{prefix}.{k}" if prefix else k, out)


def _forest(
    store: str, train: list[Any], test: list[Any], target: str, seed: int, min_leaf: int = 3
) -> tuple[list[float], list[float]]:
    """Random forest on architecture encodings: fit on ``train``, predict ``test``."""
    import math

    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    from aiop.cache import Store
    from aiop.predictor.train import _fp

    fps = sorted({_fp(s.cg) for s in [*train, *test]})
    with Store(store, readonly=True) as st:
        infos = {i.fingerprint: i for i in st.graphs(fingerprints=fps)}
    rows: dict[str, dict[str, float]] = {}
    for fp in fps:
        info = infos.get(fp)
        if info is None or "arch" not in info.meta:
            raise ValueError(f"{store}: graph {fp[:12]} has no stored architecture encoding")
        row: dict[str, float] = {}
        _flatten(info.meta["arch"], "", row)
        row["log_flops"], row["log_params"] = math.log1p(info.flops), math.log1p(info.params)
        rows[fp] = row
    keys = sorted({k for r in rows.values() for k in r})  # a missing slot is 0: absent

    def matrix(ss: list[Any]) -> np.ndarray:
        return np.array([[rows[_fp(s.cg)].get(k, 0.0) for k in keys] for s in ss])

    forest = RandomForestRegressor(n_estimators=300, min_samples_leaf=min_leaf, random_state=seed)
    forest.fit(matrix(train), [s.labels[target] for s in train])
    return [s.labels[target] for s in test], [float(v) for v in forest.predict(matrix(test))]


def _first_archs(fps: list[str], n: int) -> set[str]:
    """The first ``n`` distinct fingerprints of ``fps``, in order."""
    return set(list(dict.fromkeys(fps))[:n])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 0 or args.forest_trees < 1 or args.seeds < 1:
        print(
            "acc_predictor_joint: error: --epochs ≥ 0, --forest_trees and --seeds ≥ 1",
            file=sys.stderr,
        )
        return 2
    if not Path(args.store).is_file():
        print(f"acc_predictor_joint: error: no store at {args.store}", file=sys.stderr)
        return 2
    from aiop.predictor.share import check_acc_share

    try:
        args.acc_share = check_acc_share(args.acc_share)
    except ValueError as exc:
        print(f"acc_predictor_joint: error: {exc}", file=sys.stderr)
        return 2
    if args.acc_share != 0 and args.acc_head != "forest":
        print("acc_predictor_joint: error: --acc_share needs --acc_head forest", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ValueError as exc:  # a bad split, an unknown family or task: one line
        print(f"acc_predictor_joint: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for row in result["summary"].values():
        s = row["metrics"].get("srcc", {})
        print(
            f"{row['family']:<12} {row['variant']:<7} n={row['n']:<4} "
            f"SRCC {s.get('mean', float('nan')):.3f} ± {s.get('std', float('nan')):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
