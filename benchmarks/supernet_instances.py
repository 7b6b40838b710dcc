#!/usr/bin/env python
"""How much of a subnet's label belongs to its supernet? One family's architectures labelled
on several trained instances of its supernet.

    OMP_NUM_THREADS=1 python benchmarks/supernet_instances.py --family ofa_mbv3 \\
        --task classification --epochs 3 --seeds 0 1 --num_archs 60 --name supernet_instances_e3

Every label since recipe v4 inherits its backbone from the family's supernet and trains
only the head, so a label ranks architectures *on one supernet*. For every supernet config
(``--epochs`` × ``--seeds``; the rest :class:`aiop.tasks.supernet.SupernetConfig`'s
defaults, as the recipes use them) this trains the instance into the cache once
(:func:`aiop.tasks.supernet.ensure_supernet`) and labels architectures
``0 … num_archs − 1`` of the family on it with ``--recipe`` (the head trained exactly as
``run_train_cgs_on_task.py`` trains it; nothing goes into a label store). It reports
Spearman's ρ between every two instances' labels of the same architectures: two seeds of
one config is what another machine's floating point does to the same config, and a
config whose instances agree gives labels that belong to the architecture.

Labels are appended to ``NAME_labels.jsonl`` in ``--out`` as they come, so an interrupted
run resumes; ``NAME.json`` and ``NAME.md`` are written at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="ofa_mbv3")
    p.add_argument("--task", default="classification")
    p.add_argument("--recipe", default=None, help="label recipe (default: the current one)")
    p.add_argument("--epochs", type=int, nargs="+", default=[3], help="supernet epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="supernet seeds")
    p.add_argument("--num_archs", type=int, default=60)
    p.add_argument(
        "--supernet_n_train", type=int, default=None, help="training digits (quick trials)"
    )
    p.add_argument(
        "--label_n_train",
        type=int,
        default=None,
        help="the label recipe's training and validation samples (quick trials)",
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="supernet_instances")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _instance(cfg: Any) -> str:
    return f"e{cfg.epochs}-s{cfg.seed}"


def label_on(cfg: Any, spec: str, task: str, tcfg: Any) -> tuple[float, float]:
    """(headline metric, seconds) of ``spec``'s ``task`` head trained over its backbone
    inherited from the supernet ``cfg``."""
    from aiop.tasks.supernet import inherit_spec
    from aiop.tasks.train import build_task_model, train_task_model

    t0 = time.perf_counter()
    model = build_task_model(spec, task, resolution=tcfg.resolution, seed=tcfg.seed)
    inherit_spec(model, cfg)
    result = train_task_model(model, tcfg)
    return result.primary, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from aiop.models.families import FAMILY_NAMES
    from aiop.tasks.recipes import DEFAULT_RECIPE, recipe_config
    from aiop.tasks.supernet import SupernetConfig, checkpoint_identity, ensure_supernet

    if args.family not in FAMILY_NAMES:
        print(f"supernet_instances: error: unknown family {args.family!r}", file=sys.stderr)
        return 2
    if args.num_archs < 3 or min(args.epochs) < 1:
        print("supernet_instances: error: --num_archs >= 3 and --epochs >= 1", file=sys.stderr)
        return 2
    recipe = args.recipe or DEFAULT_RECIPE
    try:
        tcfg = recipe_config(recipe, args.task)
    except ValueError as exc:
        print(f"supernet_instances: error: {exc}", file=sys.stderr)
        return 2
    if args.label_n_train:
        tcfg = replace(tcfg, n_train=args.label_n_train, n_val=args.label_n_train)
    if tcfg.init != "supernet":
        print(f"supernet_instances: error: recipe {recipe} does not inherit", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{args.name}_labels.jsonl"
    done: dict[tuple[str, int], float] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["instance"], row["arch"])] = row["value"]
    cfgs = [
        SupernetConfig(args.family, epochs=e, seed=s, n_train=args.supernet_n_train)
        for e, s in itertools.product(args.epochs, args.seeds)
    ]
    supernets: dict[str, Any] = {}
    for cfg in cfgs:
        name = _instance(cfg)
        path = ensure_supernet(cfg, progress=not args.quiet)
        supernets[name] = checkpoint_identity(path)
        todo = [i for i in range(args.num_archs) if (name, i) not in done]
        for i in tqdm(todo, desc=f"labels on {name}", disable=args.quiet):
            value, seconds = label_on(cfg, f"family:{args.family}:{i}", args.task, tcfg)
            done[(name, i)] = value
            with log_path.open("a") as fh:  # one line per label: a killed run resumes
                row = {"instance": name, "arch": i, "value": value, "seconds": round(seconds, 2)}
                fh.write(json.dumps(row) + "\n")
    names = [_instance(c) for c in cfgs]
    labels = {n: [done[(n, i)] for i in range(args.num_archs)] for n in names}
    pairs = []
    for a, b in itertools.combinations(names, 2):
        rho = float(spearmanr(labels[a], labels[b])[0])
        pairs.append({"a": a, "b": b, "spearman": rho})
    result = {
        "family": args.family,
        "task": args.task,
        "recipe": recipe,
        "num_archs": args.num_archs,
        "supernets": supernets,
        "label_mean": {n: float(np.mean(v)) for n, v in labels.items()},
        "label_sd": {n: float(np.std(v)) for n, v in labels.items()},
        "pairs": pairs,
        "labels": labels,
    }
    cmd = "python benchmarks/supernet_instances.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"# Labels on several supernet instances: {args.task}, {args.family}, recipe {recipe}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Architectures 0–{args.num_archs - 1} of the family labelled on each instance "
        "(`eE-sS`: E epochs, seed S).",
        "",
        "| instance | weights | top-1 largest / smallest | label mean | label sd |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        ident = supernets[n]
        lines.append(
            f"| {n} | {ident['weights_sha256']} | {ident['top1_largest']} / "
            f"{ident['top1_smallest']} | {result['label_mean'][n]:.4f} | "
            f"{result['label_sd'][n]:.4f} |"
        )
    lines += ["", "| instance | instance | Spearman ρ |", "|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['spearman']:.3f} |" for p in pairs]
    write_results(out, args.name, result, "\n".join(lines) + "\n")
    print("\n".join(lines[-len(pairs) - 2 :]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
