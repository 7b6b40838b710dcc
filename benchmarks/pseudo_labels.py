#!/usr/bin/env python
"""Do shared-head pseudo-labels rank architectures like individually trained ones?

    nice -n 5 .venv/bin/python benchmarks/pseudo_labels.py --families ofa_mbv3 \
        --tasks classification semantic --num_archs 10

For each family and task: label ``num_archs`` architectures individually
(trained from scratch with the label recipe, the ground truth), train AIO-P's
shared head over a pool of other architectures of the family, give each
architecture a short fine-tune from it (the pseudo-label), and compare the two
rankings with Spearman's ρ and Kendall's τ (scipy.stats). The baseline the
shared head must beat is the same short budget from scratch (``scratch`` tag;
``--no_scratch`` skips it). Labels go into the store (``data/task_labels.db``
by default, tags named by :func:`tags`, one recipe each) and checkpoints under
``data/shared_heads/``, so a re-run reuses everything already done and an
interrupted run resumes. Results: ``benchmarks/results/pseudo_labels.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import replace
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


def tags(args: argparse.Namespace, family: str, task: str) -> dict[str, str]:
    """The store tags of the three label sets compared (each bound to one recipe), named
    after the oldest recipe that trains ``task`` as ``--recipe`` does
    (:func:`aiop.tasks.recipes.label_tag`), so a task a newer recipe leaves unchanged reuses
    the sets already made."""
    from aiop.tasks.recipes import label_tag, task_recipe

    name = task_recipe(args.recipe, task)
    head = f"p{args.pool}s{args.head_steps}{args.mode}"
    truth = {"repeats": args.truth_repeats} if args.truth_repeats > 1 else None
    return {
        "individual": label_tag(args.recipe, task, overrides=truth),
        "shared": f"shared-{name}-ft{args.ft_epochs}-s{args.seed}-{head}",
        "scratch": f"scratch-{name}-ft{args.ft_epochs}-s{args.seed}",
    }


def _srcc(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], specs: list[str]):
    from scipy import stats

    common = [s for s in specs if s in a and s in b]
    if len(common) < 3:
        return common, float("nan"), float("nan")
    x = [a[s]["value"] for s in common]
    y = [b[s]["value"] for s in common]
    return (
        common,
        float(stats.spearmanr(x, y).statistic),
        float(stats.kendalltau(x, y).statistic),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiop.tasks.labels import arch_specs, label_archs
    from aiop.tasks.recipes import recipe_config, task_recipe
    from aiop.tasks.shared_head import SharedHeadConfig, load_head, save_head, train_shared_head

    store = Path(args.store)
    rows = []
    for family in args.families:
        specs = arch_specs(family, args.start_idx, args.num_archs)
        for task in args.tasks:
            t0 = time.perf_counter()
            tg = tags(args, family, task)
            full = recipe_config(args.recipe, task)
            truth = replace(full, repeats=args.truth_repeats) if args.truth_repeats > 1 else full
            # one short training under a seed the ground truth does not use (it averages seeds
            # 0..repeats-1): sharing a seed would share its noise and flatter the comparison
            short = replace(full, epochs=args.ft_epochs, repeats=1, seed=args.seed)
            head_tag = tg["shared"].rsplit("-", 1)[-1]
            name = task_recipe(args.recipe, task)  # the checkpoint, like the tags, by task
            chkpt = Path(args.chkpt_dir) / f"{family}_{task}_{name}_{head_tag}.safetensors"
            if not args.report_only:
                if not chkpt.exists():
                    c0 = time.process_time()
                    cfg = SharedHeadConfig(
                        family=family, task=task, pool_size=args.pool, steps=args.head_steps,
                        mode=args.mode, resolution=full.resolution, n_train=full.n_train,
                        init=full.init,  # v4: the pool's backbones come from the supernet
                    )  # fmt: skip
                    head, meta = train_shared_head(cfg, progress=args.progress)
                    meta["cpu_seconds"] = round(time.process_time() - c0, 2)
                    save_head(head, meta, chkpt)
                state, meta = load_head(chkpt)
                label_archs(
                    store, specs, [task], short, tag=tg["shared"],
                    chkpts={task: (state, meta)}, progress=args.progress,
                )  # fmt: skip
                if args.scratch:
                    label_archs(
                        store, specs, [task], short, tag=tg["scratch"], progress=args.progress
                    )
                # the ground truth last: the store command may be labelling the same
                # architectures with the same recipe meanwhile, and those are then reused
                if args.individual:
                    label_archs(
                        store, specs, [task], truth, tag=tg["individual"], progress=args.progress
                    )
            head_cpu = load_head(chkpt)[1].get("cpu_seconds") if chkpt.exists() else None
            ind = _extras(store, task, tg["individual"])
            sh = _extras(store, task, tg["shared"])
            sc = _extras(store, task, tg["scratch"])
            common, rho, tau = _srcc(ind, sh, specs)
            bcommon, base_rho, _ = _srcc(ind, sc, specs)
            x = [ind[s]["value"] for s in common]
            y = [sh[s]["value"] for s in common]
            n_sh = len(common)
            rows.append(
                {
                    "family": family,
                    "task": task,
                    "tags": tg,
                    "n_archs": n_sh,
                    "srcc": round(rho, 3),
                    "kendall_tau": round(tau, 3),
                    "individual_mean": round(sum(x) / n_sh, 4) if x else None,
                    "shared_mean": round(sum(y) / n_sh, 4) if y else None,
                    "individual_cpu_s": round(_mean(ind, common, "cpu_seconds"), 1),
                    "shared_cpu_s": round(_mean(sh, common, "cpu_seconds"), 1),
                    "head_cpu_s": None if head_cpu is None else round(float(head_cpu), 1),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "baseline": None
                    if not bcommon
                    else {"tag": tg["scratch"], "n_archs": len(bcommon),
                          "srcc": round(base_rho, 3),
                          "cpu_s": round(_mean(sc, bcommon, "cpu_seconds"), 1)},
                    "labels": {s: {"individual": ind[s]["value"], "shared": sh[s]["value"],
                                   "scratch": sc.get(s, {}).get("value")}
                               for s in common},
                }
            )  # fmt: skip
            print(
                f"{family} {task}: n={n_sh} SRCC {rho:.3f} Kendall {tau:.3f}; "
                f"scratch n={len(bcommon)} SRCC {base_rho:.3f}",
                file=sys.stderr,
            )
            write(_result(args, rows), args.out)  # after each task: a partial run still reports
    return _result(args, rows)


def _result(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from aiop.tasks.recipes import recipe_config

    inits = {recipe_config(args.recipe, t).init for t in args.tasks}
    backbone = (
        "backbones inherited from the family supernet"
        if inits == {"supernet"}
        else "backbones from scratch"
    )
    return {
        "command": "python benchmarks/pseudo_labels.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core host",
        "settings": {
            "individual": f"label recipe {args.recipe} (aiop.tasks.recipes), {backbone}"
            + (f", mean of {args.truth_repeats} seeds" if args.truth_repeats > 1 else ""),
            "shared": f"{args.ft_epochs} epoch(s) of recipe {args.recipe} from the shared head",
            "scratch": f"{args.ft_epochs} epoch(s) of recipe {args.recipe}, a fresh head",
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
                f"\nBaseline {r['family']} {r['task']}: labels tagged `{b['tag']}` (the same "
                f"short budget with a fresh head, no shared head) vs individual: SRCC {b['srcc']} "
                f"on {b['n_archs']} architectures, {b['cpu_s']} CPU s/label."
            )
    lines += ["", "Settings: " + "; ".join(f"{k}: {v}" for k, v in result["settings"].items())]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["ofa_mbv3"])
    p.add_argument("--recipe", default=None, help="label recipe (default: the project's)")
    p.add_argument("--tasks", nargs="+", default=["classification", "semantic"])
    p.add_argument("--num_archs", type=int, default=10)
    p.add_argument("--start_idx", type=int, default=0)
    p.add_argument("--store", default=str(ROOT / "data" / "task_labels.db"))
    p.add_argument("--chkpt_dir", default=str(ROOT / "data" / "shared_heads"))
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--head_steps", type=int, default=200)
    p.add_argument("--ft_epochs", type=int, default=1)
    p.add_argument(
        "--seed", type=int, default=7, help="seed of the short trainings (not one of the truth's)"
    )
    p.add_argument("--mode", default="swap", choices=["swap", "latent"])
    p.add_argument(
        "--truth_repeats",
        type=int,
        default=1,
        help="seeds the ground truth averages (> 1: a set of its own, less seed noise)",
    )
    p.add_argument("--out", default="pseudo_labels", help="result file stem")
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--no_individual",
        dest="individual",
        action="store_false",
        help="train no ground truth: compare with the individual labels the store holds",
    )
    p.add_argument(
        "--no_scratch",
        dest="scratch",
        action="store_false",
        help="skip the baseline: the same short budget with a fresh head, without the shared head",
    )
    p.add_argument(
        "--report_only", action="store_true", help="no training: report the stored labels"
    )
    args = p.parse_args(argv)
    if args.truth_repeats < 1:
        p.error("--truth_repeats must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    if args.recipe is None:
        from aiop.tasks.recipes import DEFAULT_RECIPE

        args.recipe = DEFAULT_RECIPE
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
