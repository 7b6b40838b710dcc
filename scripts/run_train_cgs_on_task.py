#!/usr/bin/env python
"""Train architectures on tasks and store their task CGs and accuracy labels (AIO-P's script).

    # ground truth: architectures trained individually, from scratch, with the default
    # label recipe (aiop.tasks.recipes); each task's labels go to its own tag,
    # label_tag(recipe, task): with v3, detection to individual-v2, pose to individual-v3
    python scripts/run_train_cgs_on_task.py -family ofa_mbv3 -task detection pose \
        -start_idx 0 -num_archs 10 -cache_file data/task_labels.db

    # pseudo-labels: a short fine-tune from a shared head (run_train_head_on_task.py)
    python scripts/run_train_cgs_on_task.py -family ofa_mbv3 -task detection -tag shared \
        -start_idx 0 -num_archs 10 --num_epochs 1 \
        -chkpt data/shared_heads/ofa_mbv3_detection_sampled.safetensors

Several families and tasks may be given; architectures are the outer loop. A
re-run skips (architecture, task) pairs already labelled under their tag, so a
killed run resumes where it stopped. ``-recipe`` picks a named label recipe
(:data:`aiop.tasks.recipes.LABEL_RECIPES`; default
:data:`aiop.tasks.recipes.DEFAULT_RECIPE`); the training flags override single
settings of it. Each task's default tag is
:func:`aiop.tasks.recipes.label_tag`: ``individual-<name>`` of the oldest named
recipe that trains the task as ``-recipe`` does (``shared-<name>`` with
``-chkpt``), plus a hash of the overrides when there are any, so labels of
different recipes never share a tag and a task the new recipe leaves unchanged
keeps its old set. An explicit ``-tag`` names one set for every task; a run
whose recipe differs from the labels the set already holds is refused, and so is
one whose family supernet (an inheriting recipe's backbones) is another trained
instance than the one the set's labels of that family came from: the cache's
supernets are part of the data (``-list`` shows each set's instances).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiop.tasks.heads import DEFAULT_WIDTH, TASKS, HeadError
from aiop.tasks.labels import DEFAULT_STORE, OneLineParser, arch_specs, label_archs
from aiop.tasks.recipes import DEFAULT_RECIPE, LABEL_RECIPES, label_tag, recipe_config

# flag -> TrainConfig field: each overrides one setting of the recipe when given
OVERRIDES = {
    "num_epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "resolution": "resolution",
    "n_train": "n_train",
    "n_val": "n_val",
    "repeats": "repeats",
}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="run_train_cgs_on_task", description=__doc__.splitlines()[0])
    p.add_argument("-family", nargs="+", help="ofa_mbv3, ofa_pn, ofa_resnet (required)")
    p.add_argument("-task", nargs="+", help=f"one or more of {', '.join(TASKS)} (required)")
    p.add_argument(
        "-list", action="store_true", help="print the store's label sets (tag, task, family, count)"
    )
    p.add_argument(
        "-tag",
        default=None,
        help="one label set for every task (default: per task, label_tag(recipe, task), "
        "individual-<name> / shared-<name>)",
    )
    p.add_argument(
        "-recipe",
        default=DEFAULT_RECIPE,
        choices=list(LABEL_RECIPES),
        help=f"label recipe (default {DEFAULT_RECIPE})",
    )
    p.add_argument("-start_idx", type=int, default=0, help="first architecture number")
    p.add_argument("-num_archs", type=int, default=10, help="architectures per family")
    p.add_argument("-chkpt", default=None, help="shared-head checkpoint to fine-tune from")
    p.add_argument("-cache_file", default=str(DEFAULT_STORE), help="SQLite store")
    p.add_argument(
        "--num_epochs", type=int, default=None, help="default: the recipe's, 1 with -chkpt"
    )
    p.add_argument("--batch_size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("-resolution", type=int, default=None, help="default: the recipe's for the task")
    p.add_argument("-n_train", type=int, default=None, help="default: the recipe's")
    p.add_argument("-n_val", type=int, default=None, help="default: the recipe's")
    p.add_argument(
        "-repeats", type=int, default=None, help="seeds averaged per label (default: the recipe's)"
    )
    p.add_argument("-seed", type=int, default=0, help="weight-initialisation and shuffle seed")
    p.add_argument("-width", type=int, default=DEFAULT_WIDTH, help="head width")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def default_tag(recipe: str, task: str, overrides: dict[str, object], *, shared: bool) -> str:
    """``label_tag(recipe, task)`` (``individual-<name>`` / ``shared-<name>``), plus a hash of
    any overridden settings."""
    return label_tag(recipe, task, "shared" if shared else "individual", overrides)


def describe_tags(tags: dict[str, str]) -> str:
    """``tag T`` when every task shares one, else ``tags T1 (task, task), T2 (task)``."""
    by_tag: dict[str, list[str]] = {}
    for task, tag in tags.items():
        by_tag.setdefault(tag, []).append(task)
    if len(by_tag) == 1:
        return f"tag {next(iter(by_tag))}"
    return "tags " + ", ".join(f"{t} ({', '.join(ts)})" for t, ts in by_tag.items())


def list_labels(args: Any) -> int:
    """``-list``: the store's label sets, a line each (or JSON)."""
    from aiop.tasks.labels import inventory

    if not Path(args.cache_file).is_file():
        print(f"run_train_cgs_on_task: error: no store at {args.cache_file}", file=sys.stderr)
        return 2
    sets = inventory(args.cache_file)
    if args.json:
        print(json.dumps([s.to_dict() for s in sets]))
        return 0
    print(
        f"{'tag':40s} {'task':15s} {'family':11s} {'count':>5s}  recipe    mean (min-max)"
        "        supernet"
    )
    for s in sets:
        print(
            f"{s.tag:40s} {s.task:15s} {s.family:11s} {s.count:5d}  {','.join(s.recipes):8s}  "
            f"{s.mean:.3f} ({s.min:.3f}-{s.max:.3f})  {','.join(s.supernets) or '-'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.list:
        return list_labels(args)
    for flag in ("family", "task"):
        if not getattr(args, flag):
            parser.error(f"the following arguments are required: -{flag}")
    try:
        from aiop.tasks.heads import check_task

        tasks = [check_task(t) for t in args.task]
        specs = [s for f in args.family for s in arch_specs(f, args.start_idx, args.num_archs)]
        # architectures outermost: interleave families so a partial run covers each evenly
        specs = sorted(specs, key=lambda s: (int(s.rsplit(":", 1)[1]), s))
        chkpts = {}
        if args.chkpt:
            from aiop.tasks.shared_head import load_head

            state, meta = load_head(args.chkpt)
            if meta.get("task") not in tasks or len(tasks) != 1:
                raise HeadError(
                    f"-chkpt {args.chkpt} is a {meta.get('task')} head; give exactly that -task"
                )
            if len(args.family) != 1 or meta.get("family") != args.family[0]:
                raise HeadError(
                    f"-chkpt {args.chkpt} was trained on {meta.get('family')}; "
                    "give exactly that -family"
                )
            chkpts[tasks[0]] = (state, meta)
            if args.resolution is None:  # fine-tune at the resolution the head was trained at
                args.resolution = meta.get("config", {}).get("resolution")
        if args.chkpt and args.num_epochs is None:  # a pseudo-label is a short fine-tune
            args.num_epochs = 1
        given = {a: getattr(args, a) for a in OVERRIDES if getattr(args, a) is not None}
        for flag, value in given.items():
            if (value <= 0) if flag == "lr" else (value < 1):
                dash = "--" if flag in ("num_epochs", "batch_size", "lr") else "-"
                raise HeadError(
                    f"{dash}{flag} must be {'> 0' if flag == 'lr' else '>= 1'}, got {value}"
                )
        overrides = {OVERRIDES[a]: v for a, v in given.items()}
        if not Path(args.cache_file).parent.is_dir():
            raise HeadError(f"-cache_file: directory {Path(args.cache_file).parent} does not exist")
        cfgs = {
            t: replace(recipe_config(args.recipe, t), seed=args.seed, **overrides) for t in tasks
        }
        tags = {
            t: args.tag or default_tag(args.recipe, t, overrides, shared=bool(args.chkpt))
            for t in tasks
        }
        report = label_archs(
            args.cache_file,
            specs,
            tasks,
            cfgs,
            tag=tags,
            chkpts=chkpts,
            width=args.width,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("interrupted: finished labels are kept; run again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:  # every aiop error class derives from ValueError
        print(f"run_train_cgs_on_task: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(
            f"{describe_tags(tags)}: labelled {len(report.labelled)}, "
            f"skipped {len(report.skipped)} (already labelled), failed {len(report.failed)}"
        )
        for spec, task, acc, sec in report.labelled:
            print(f"  {spec:24s} {task:15s} {tags[task]:20s} acc {acc:.4f}  {sec:.1f} s")
    for spec, task, reason in report.failed[:10]:
        print(f"  failed {spec} {task}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
