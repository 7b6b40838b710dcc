#!/usr/bin/env python
"""Seconds per architecture label, per task, on this machine (target: <= 60 s).

    taskset -c 1 .venv/bin/python benchmarks/task_labels.py --models family:ofa_mbv3:0 --recipe v2

Labels each (model, task) with a label recipe (:mod:`aiop.tasks.recipes`, default
the project's) into the store through :func:`aiop.tasks.labels.label_archs`
under the recipe's tag for the task (:func:`aiop.tasks.recipes.label_tag`:
``individual-<recipe>``, or the older recipe's tag where the recipe trains the task as an
older one does) and reports the wall seconds and CPU seconds (this process's CPU
time: one core's work, which is what the target is about when other jobs share the
cores) each label took, as recorded with the label. A (model, task) already in
the store is not trained again: its recorded timings are reported, marked
``reused``. Results: ``benchmarks/results/<out>.{json,md}``.

With ``--noise`` it measures instead how much of a label is the architecture
and how much the seed, for candidate recipes (:data:`CANDIDATES`)::

    taskset -c 1 .venv/bin/python benchmarks/task_labels.py --noise --tasks classification \
        --families ofa_mbv3 --archs 5 --seeds 3 --candidates e1 e2 e4 d2

Each (task, family, candidate, architecture, seed) is trained once (no store:
these runs are replicates, not labels) and appended to
``benchmarks/results/task_label_noise_runs.jsonl`` (``--noise_out NAME``:
``NAME_runs.jsonl``), so an interrupted study resumes; the summary
(:func:`aiop.tasks.recipes.reliability`: ICC(1), between-architecture vs seed SD,
CPU seconds, Spearman between seed replicates) goes to
``benchmarks/results/task_label_noise.{json,md}`` (``NAME.{json,md}``).

A candidate is either TrainConfig overrides (from scratch) or ``{"recipe": NAME, ...}``: a
named recipe as it trains the task, with any further keys as overrides (``v4e3``: v4 for 3
epochs). ``mask_threshold`` (a :class:`TrainConfig` field) moves where an instance model's
evaluation cuts its foreground (training untouched), e.g. ``v4m``, the instance study of
``task_label_noise_v5_instance`` that chose recipe ``v5``::

    taskset -c 1 .venv/bin/python benchmarks/task_labels.py --noise --tasks instance \
        --families ofa_mbv3 --archs 10 --seeds 2 --candidates v4 v4m \
        --noise_out task_label_noise_v5_instance
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("detection", "instance", "panoptic", "classification", "semantic", "pose")
# Candidate recipes of the noise study: TrainConfig overrides (the task's resolution, batch 16,
# Adam 3e-3 with cosine decay unless named). n_val 500 = the whole validation split of the
# 5,000 MNIST digits; scene and pose sets generate as many items as asked.
CANDIDATES: dict[str, dict[str, Any]] = {
    "v1": {"epochs": 2, "n_train": 1000, "n_val": 300},  # the first recipe, as stored
    "e1": {"epochs": 1, "n_train": 1000, "n_val": 500},
    "e2": {"epochs": 2, "n_train": 1000, "n_val": 500},
    "e3": {"epochs": 3, "n_train": 1000, "n_val": 500},
    "e4": {"epochs": 4, "n_train": 1000, "n_val": 500},
    "d2": {"epochs": 2, "n_train": 2000, "n_val": 500},
    "e2lr": {"epochs": 2, "n_train": 1000, "n_val": 500, "lr": 1e-2},
    "e3lr": {"epochs": 3, "n_train": 1000, "n_val": 500, "lr": 1e-2},
    # pose: recipe v2's 600 figures and v3's 500 (at the task's 64 px)
    "p600": {"epochs": 2, "n_train": 600, "n_val": 300},
    "p500": {"epochs": 2, "n_train": 500, "n_val": 300},
    # a named label recipe, as it trains the task (v4: backbones inherited from the family's
    # supernet and frozen, aiop.tasks.supernet)
    "v4": {"recipe": "v4"},
    # v4 with instance masks cut where the *unweighted* foreground posterior passes 0.5: the
    # mask loss weighs background pixels BACKGROUND_WEIGHT (0.1), so the trained sigmoid is
    # p_w = p / (p + 0.1 (1 - p)) and v4's cut p_w > 0.5 keeps pixels with p > 0.09 (fat
    # masks whose IoU sits on AP's 0.5 cliff); p_w > 1 / 1.1 is p > 0.5. Training unchanged.
    "v4m": {"recipe": "v4", "mask_threshold": 1 / 1.1},
    "v4m2k": {"recipe": "v4", "mask_threshold": 1 / 1.1, "n_val": 2000},
    # v4 with semantic maps (semantic, panoptic) from the unweighted posterior: the semantic
    # loss weighs background 0.1 too, so the logits' argmax grows a halo round the strokes.
    # Measured (task_label_noise_v4s.md, 12 ofa_mbv3 x 2 seeds): worse, ICC 0.76 -> 0.40
    "v4s": {"recipe": "v4", "unweight_semantic": True},
    # v4 classification measured on corrupted held-out digits (CIFAR-10-C's fifteen in turn):
    # ofa_resnet's clean top-1 saturates at 0.977 +- 0.002
    "v4c2": {"recipe": "v4", "eval_corruption": 2},
    "v4c4": {"recipe": "v4", "eval_corruption": 4},
    # v4 trained longer (the head, trained from its seed's init, is further from converged
    # after 2 epochs than the seed-to-seed spread allows) or with a larger step
    "v4e3": {"recipe": "v4", "epochs": 3},
    "v4lr": {"recipe": "v4", "lr": 6e-3},
}
NOISE_OUT = "task_label_noise"  # the study's files: <out>_runs.jsonl, <out>.json, <out>.md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["family:ofa_mbv3:0"])
    p.add_argument("--tasks", nargs="+", default=list(ORDER))
    p.add_argument("--store", default=str(ROOT / "data" / "task_labels.db"))
    p.add_argument("--out", default="task_labels")
    p.add_argument("--recipe", default=None, help="label recipe (default: the project's)")
    p.add_argument("--noise", action="store_true", help="seed-noise study (see the docstring)")
    p.add_argument("--families", nargs="+", default=["ofa_mbv3"])
    p.add_argument("--archs", type=int, default=5, help="architectures per family")
    p.add_argument("--arch_start", type=int, default=0, help="first architecture number")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--candidates", nargs="+", default=["e1", "e2", "e4", "d2"])
    p.add_argument("--report_only", action="store_true", help="noise: summarise, train nothing")
    p.add_argument(
        "--noise_out", default=NOISE_OUT, help="noise: name of the study's files under results/"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.noise:
        return noise_study(args)

    from aiop.cache import Store
    from aiop.tasks.labels import label_archs
    from aiop.tasks.recipes import DEFAULT_RECIPE, label_tag, recipe_config
    from aiop.tasks.train import PRIMARY_METRIC

    recipe = args.recipe or DEFAULT_RECIPE
    rows: list[dict[str, Any]] = []
    for spec in args.models:
        for task in args.tasks:
            cfg = recipe_config(recipe, task)
            tag = label_tag(recipe, task)
            report = label_archs(args.store, [spec], [task], cfg, tag=tag, progress=False)
            with Store(args.store, readonly=True) as store:
                models = {i.fingerprint: i.meta.get("model") for i in store.graphs()}
                rec = next(
                    r
                    for r in store.labels(kind="acc", task=task, mode=tag)
                    if models.get(r.graph) == spec
                )
            rows.append(
                {
                    "model": spec,
                    "task": task,
                    "recipe": recipe,
                    "tag": tag,
                    "resolution": cfg.resolution,
                    "metric": PRIMARY_METRIC[task],
                    "value": round(rec.value, 4),
                    "wall_s": rec.extra.get("seconds"),
                    "cpu_s": rec.extra.get("cpu_seconds"),
                    "steps": rec.extra.get("steps"),
                    "reused": not report.labelled,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "command": "python benchmarks/task_labels.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "target_s": 60,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Seconds per architecture label",
        "",
        f"Command: `{result['command']}` ({result['machine']}; "
        f"OMP_NUM_THREADS={result['omp_num_threads']})",
        "",
        "| model | task | recipe | tag | px | metric | value | wall s | CPU s | steps "
        "| ≤ 60 s CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["cpu_s"] is not None and r["cpu_s"] <= 60 else "no"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['recipe']} | {r['tag']} | {r['resolution']} "
            f"| {r['metric']} | {r['value']} | {r['wall_s']} | {r['cpu_s']} | {r['steps']} | {ok} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


def _noise_runs(args: argparse.Namespace, suffix: str = "_runs.jsonl") -> Path:
    """The study's runs file (one JSON line per training), or its summary with ``suffix``."""
    name = Path(args.noise_out).name  # a name under results/, never a path elsewhere
    return RESULTS / f"{name}{suffix}"


def _noise_key(r: dict[str, Any]) -> tuple:
    return (r["task"], r["family"], r["candidate"], r["arch"], r["seed"])


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
            continue
    return runs


def noise_study(args: argparse.Namespace) -> int:
    """Train every (task, family, candidate, arch, seed) not yet in the runs file; summarise."""
    from tqdm import tqdm

    from aiop.tasks.recipes import recipe_config
    from aiop.tasks.train import TrainConfig, build_task_model, train_task_model

    for c in args.candidates:
        if c not in CANDIDATES:
            print(f"unknown candidate {c!r}; valid: {', '.join(CANDIDATES)}", file=sys.stderr)
            return 2
    runs_file = _noise_runs(args)
    done = {_noise_key(r) for r in _read_runs(runs_file)}
    # cheap candidates first and seeds innermost, so a partial study is already summarisable
    work = [
        {"task": t, "family": f, "candidate": c, "arch": a, "seed": s}
        for t in args.tasks
        for f in args.families
        for c in args.candidates
        for a in range(args.arch_start, args.arch_start + args.archs)
        for s in range(args.seeds)
    ]
    todo = [] if args.report_only else [w for w in work if _noise_key(w) not in done]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for w in tqdm(todo, desc="noise study"):
        cand = dict(CANDIDATES[w["candidate"]])
        if "recipe" in cand:  # a named recipe, with any other keys as TrainConfig overrides
            base = recipe_config(cand.pop("recipe"), w["task"])
            cfg = replace(base, **cand, seed=w["seed"], repeats=1)
        else:
            cfg = TrainConfig(seed=w["seed"], **cand).for_task(w["task"])
        spec = f"family:{w['family']}:{w['arch']}"
        model = build_task_model(
            spec, w["task"], resolution=cfg.resolution, seed=w["seed"], init=cfg.init
        )
        res = train_task_model(model, cfg)
        row = {
            **w,
            "value": res.primary,
            "cpu_s": round(res.cpu_seconds, 2),
            "wall_s": round(res.seconds, 2),
            "steps": res.steps,
            "config": cfg.to_dict(),  # mask_threshold included
        }
        with runs_file.open("a") as fh:  # one line per run: a kill loses at most this run
            fh.write(json.dumps(row) + "\n")
        summarise_noise(args)
    summarise_noise(args)
    return 0


def summarise_noise(args: argparse.Namespace) -> dict[str, Any]:
    """Per (task, family, candidate): reliability, CPU seconds, Spearman between seed replicates."""
    import itertools
    import statistics

    from scipy import stats

    from aiop.tasks.recipes import reliability

    runs_file = _noise_runs(args)
    runs = _read_runs(runs_file)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["family"], r["candidate"]), []).append(r)
    rows = []
    for (task, family, cand), rs in sorted(groups.items()):
        by_arch: dict[int, dict[int, float]] = {}
        for r in rs:
            by_arch.setdefault(r["arch"], {})[r["seed"]] = r["value"]
        usable = {a: list(v.values()) for a, v in by_arch.items()}
        if len(usable) < 2 or all(len(v) < 2 for v in usable.values()):
            continue
        rel = reliability({str(a): v for a, v in usable.items()})
        seeds = sorted({s for v in by_arch.values() for s in v})
        pair_rho = []
        for s1, s2 in itertools.combinations(seeds, 2):
            common = [a for a in by_arch if s1 in by_arch[a] and s2 in by_arch[a]]
            if len(common) >= 3:
                x = [by_arch[a][s1] for a in common]
                y = [by_arch[a][s2] for a in common]
                pair_rho.append(float(stats.spearmanr(x, y).statistic))
        cpu = [r["cpu_s"] for r in rs]
        rows.append(
            {
                "task": task,
                "family": family,
                "candidate": cand,
                "recipe": CANDIDATES.get(cand),
                "runs": len(rs),
                **rel.to_dict(),
                "reliability_mean_of_2": round(rel.spearman_brown(2), 4),
                "seed_pair_srcc": round(statistics.fmean(pair_rho), 3) if pair_rho else None,
                "cpu_s_mean": round(statistics.fmean(cpu), 1),
                "cpu_s_max": round(max(cpu), 1),
                "arch_means": {
                    str(a): round(statistics.fmean(v), 4) for a, v in sorted(usable.items())
                },
            }
        )
    # do two recipes rank the architectures alike? Spearman of their per-architecture means
    agreement = []
    for a, b in itertools.combinations(rows, 2):
        if (a["task"], a["family"]) != (b["task"], b["family"]):
            continue
        common = sorted(set(a["arch_means"]) & set(b["arch_means"]), key=int)
        if len(common) >= 4:
            rho = stats.spearmanr(
                [a["arch_means"][k] for k in common], [b["arch_means"][k] for k in common]
            ).statistic
            agreement.append(
                {
                    "task": a["task"],
                    "family": a["family"],
                    "recipes": [a["candidate"], b["candidate"]],
                    "archs": len(common),
                    "srcc_of_means": round(float(rho), 3),
                }
            )
    result = {
        "command": "python benchmarks/task_labels.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "runs_file": str(runs_file.relative_to(ROOT)),
        "results": rows,
        "agreement": agreement,
    }
    _noise_runs(args, ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Seed noise vs between-architecture spread of task labels",
        "",
        f"Command: `{result['command']}` ({result['machine']}; "
        f"OMP_NUM_THREADS={result['omp_num_threads']}). Every architecture trained under "
        "several seeds (weight init + shuffle); ICC(1) = share of one label's variance that is "
        "the architecture's; `rel×2` = Spearman–Brown reliability of a mean of 2 seeds; "
        "`seed ρ` = mean Spearman between two seeds' rankings.",
        "",
        "| task | family | recipe | runs | mean | between SD | seed SD | SNR | ICC | rel×2 "
        "| seed ρ | CPU s mean | CPU s max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rc = r["recipe"] or {}
        if "recipe" in rc:  # a named label recipe, trained as it trains this task
            from aiop.tasks.recipes import recipe_config

            named = recipe_config(rc["recipe"], r["task"]).to_dict()
            rc = {**named, **rc, "name": rc["recipe"]}
        desc = f"{r['candidate']} ({rc.get('epochs')} ep × {rc.get('n_train')}"
        desc += f", val {rc.get('n_val') or rc.get('val_split')}"
        # the lr of a from-scratch candidate, or a named recipe's lr override
        lr_set = "name" not in rc or "lr" in (r["recipe"] or {})
        desc += f", lr {rc['lr']}" if "lr" in rc and lr_set else ""
        desc += f", {rc['init']} init" if rc.get("init", "scratch") != "scratch" else ""
        desc += ", head only" if rc.get("train_backbone") is False else ""
        if rc.get("mask_threshold") is not None:
            desc += f", mask cut p > {rc['mask_threshold']:.3g}"
        desc += ")"
        lines.append(
            f"| {r['task']} | {r['family']} | {desc} | {r['runs']} | {r['grand_mean']} "
            f"| {r['between_sd']} | {r['within_sd']} | {r['snr']} | {r['icc']} "
            f"| {r['reliability_mean_of_2']} | {r['seed_pair_srcc']} | {r['cpu_s_mean']} "
            f"| {r['cpu_s_max']} |"
        )
    if agreement:
        lines += [
            "",
            "Do two recipes rank the architectures alike (Spearman of per-architecture means)?",
            "",
            "| task | family | recipes | archs | SRCC |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['task']} | {g['family']} | {' vs '.join(g['recipes'])} | {g['archs']} "
            f"| {g['srcc_of_means']} |"
            for g in agreement
        ]
    _noise_runs(args, ".md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
