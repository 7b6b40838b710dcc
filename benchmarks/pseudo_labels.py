#!/usr/bin/env python
"""Do shared-head pseudo-labels rank architectures like individually trained ones?

    nice -n 5 .venv/bin/python benchmarks/pseudo_labels.py --families ofa_mbv3 \
        --tasks classification semantic --num_archs 10

For each family and task: label ``num_archs`` architectures individually
(trained from scratch, the ground truth), train AIO-P's shared head over a pool
of other architectures of the family, give each architecture a short
fine-tune from it (the pseudo-label), and compare the two rankings with
Spearman's ρ and Kendall's τ (scipy.stats). Labels go into the store
(``data/task_labels.db`` by default, tags ``individual`` and ``shared``) and
checkpoints under ``data/shared_heads/``, so a re-run reuses everything already
done and an interrupted run resumes. Results: ``benchmarks/results/pseudo_labels.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _extras(store_path: Path, task: str, tag: str) -> dict[str, dict[str, Any]]:
    from aiop.cache import Store

    with Store(store_path, readonly=True) as store:
        models = {i.fingerprint: i.meta.get("model") for i in store.graphs()}
        return {
            models[r.graph]: {"value": r.value, **r.extra}
            for r in store.labels(kind="acc", task=task, mode=tag)
            if models.get(r.graph)
        }


def _mean(d: dict[str, dict[str, Any]], specs: list[str], key: str) -> float:
    vals = [d[s].get(key) for s in specs if d[s].get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from scipy import stats

    from aiop.tasks.labels import arch_specs, label_archs
    from aiop.tasks.shared_head import SharedHeadConfig, load_head, save_head, train_shared_head
    from aiop.tasks.train import TrainConfig

    store = Path(args.store)
    rows = []
    for family in args.families:
        specs = arch_specs(family, args.start_idx, args.num_archs)
        for task in args.tasks:
            t0 = time.perf_counter()
            chkpt = Path(args.chkpt_dir) / f"{family}_{task}_bench.safetensors"
            head_cpu = None
            if args.report_only:  # what the store holds now (e.g. after an interrupted run)
                meta = load_head(chkpt)[1] if chkpt.exists() else {}
                head_cpu = meta.get("cpu_seconds")
            else:
                label_archs(
                    store, specs, [task], TrainConfig(), tag="individual", progress=args.progress
                )
            if not chkpt.exists() and not args.report_only:
                c0 = time.process_time()
                cfg = SharedHeadConfig(
                    family=family, task=task, pool_size=args.pool, steps=args.head_steps,
                    mode=args.mode,
                )  # fmt: skip
                head, meta = train_shared_head(cfg, progress=args.progress)
                head_cpu = time.process_time() - c0
                meta["cpu_seconds"] = round(head_cpu, 2)
                save_head(head, meta, chkpt)
            if not args.report_only:
                state, meta = load_head(chkpt)
                head_cpu = meta.get("cpu_seconds", head_cpu)
                label_archs(
                    store, specs, [task], TrainConfig(epochs=args.ft_epochs), tag="shared",
                    chkpts={task: (state, meta)}, progress=args.progress,
                )  # fmt: skip
            ind, sh = _extras(store, task, "individual"), _extras(store, task, "shared")
            base = _extras(store, task, args.baseline_tag) if args.baseline_tag else {}
            common = [s for s in specs if s in ind and s in sh]
            x = [ind[s]["value"] for s in common]
            y = [sh[s]["value"] for s in common]
            rho = stats.spearmanr(x, y).statistic if len(common) > 2 else float("nan")
            tau = stats.kendalltau(x, y).statistic if len(common) > 2 else float("nan")
            # the same short budget without the shared head: does the head earn its keep?
            bcommon = [s for s in common if s in base]
            base_rho = (
                float(stats.spearmanr([ind[s]["value"] for s in bcommon],
                                      [base[s]["value"] for s in bcommon]).statistic)
                if len(bcommon) > 2 else None
            )  # fmt: skip

            rows.append(
                {
                    "family": family,
                    "task": task,
                    "n_archs": len(common),
                    "srcc": round(float(rho), 3),
                    "kendall_tau": round(float(tau), 3),
                    "individual_mean": round(sum(x) / len(x), 4) if x else None,
                    "shared_mean": round(sum(y) / len(y), 4) if y else None,
                    "individual_cpu_s": round(_mean(ind, common, "cpu_seconds"), 1),
                    "shared_cpu_s": round(_mean(sh, common, "cpu_seconds"), 1),
                    "head_cpu_s": None if head_cpu is None else round(float(head_cpu), 1),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "baseline": None
                    if base_rho is None
                    else {"tag": args.baseline_tag, "n_archs": len(bcommon),
                          "srcc": round(base_rho, 3),
                          "cpu_s": round(_mean(base, bcommon, "cpu_seconds"), 1)},
                    "labels": {s: {"individual": ind[s]["value"], "shared": sh[s]["value"]}
                               for s in common},
                }
            )  # fmt: skip
            print(
                f"{family} {task}: n={len(common)} SRCC {rho:.3f} Kendall {tau:.3f}",
                file=sys.stderr,
            )
            write(_result(args, rows), args.out)  # after each task: a partial run still reports
    return _result(args, rows)


def _result(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": "python benchmarks/pseudo_labels.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core host",
        "settings": {
            "individual": "TrainConfig() (2 epochs of 1,000 samples, batch 16, Adam 3e-3 cosine)",
            "shared": f"{args.ft_epochs} epoch(s) fine-tune from the shared head",
            "head": f"pool {args.pool}, {args.head_steps} steps, mode {args.mode}",
            "target": "SRCC >= 0.7 on >= 30 architectures per task",
        },
        "results": rows,
    }


def write(result: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Shared-head pseudo-labels vs individually trained labels",
        "",
        f"Command: `{result['command']}`",
        "",
        "| family | task | archs | SRCC | Kendall τ | individual mean | pseudo mean "
        "| CPU s/label individual | CPU s/label pseudo | CPU s shared head |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['family']} | {r['task']} | {r['n_archs']} | {r['srcc']} | {r['kendall_tau']} "
            f"| {r['individual_mean']} | {r['shared_mean']} | {r['individual_cpu_s']} "
            f"| {r['shared_cpu_s']} | {r['head_cpu_s']} |"
        )
    for r in result["results"]:
        if r.get("baseline"):
            b = r["baseline"]
            lines.append(
                f"\nBaseline {r['family']} {r['task']}: labels tagged `{b['tag']}` (same short "
                f"budget, no shared head) vs individual: SRCC {b['srcc']} on {b['n_archs']} "
                f"architectures, {b['cpu_s']} CPU s/label."
            )
    lines += ["", "Settings: " + "; ".join(f"{k}: {v}" for k, v in result["settings"].items())]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["ofa_mbv3"])
    p.add_argument("--tasks", nargs="+", default=["classification", "semantic"])
    p.add_argument("--num_archs", type=int, default=10)
    p.add_argument("--start_idx", type=int, default=0)
    p.add_argument("--store", default=str(ROOT / "data" / "task_labels.db"))
    p.add_argument("--chkpt_dir", default=str(ROOT / "data" / "shared_heads"))
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--head_steps", type=int, default=200)
    p.add_argument("--ft_epochs", type=int, default=1)
    p.add_argument("--mode", default="swap", choices=["swap", "latent"])
    p.add_argument("--out", default="pseudo_labels", help="result file stem")
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--baseline_tag",
        default=None,
        help="also rank labels of this tag (e.g. a short run from scratch) against individual",
    )
    p.add_argument(
        "--report_only", action="store_true", help="no training: report the stored labels"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
