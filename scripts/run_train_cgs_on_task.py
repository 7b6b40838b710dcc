#!/usr/bin/env python
"""Train architectures on tasks and store their task CGs and accuracy labels (AIO-P's script).

    # ground truth: architectures trained individually, from scratch
    python scripts/run_train_cgs_on_task.py -family ofa_mbv3 -task detection -tag individual \
        -start_idx 0 -num_archs 10 -cache_file data/task_labels.db

    # pseudo-labels: a short fine-tune from a shared head (run_train_head_on_task.py)
    python scripts/run_train_cgs_on_task.py -family ofa_mbv3 -task detection -tag shared \
        -start_idx 0 -num_archs 10 --num_epochs 1 \
        -chkpt data/shared_heads/ofa_mbv3_detection_sampled.safetensors

Several families and tasks may be given; architectures are the outer loop. A
re-run skips (architecture, task) pairs already labelled under the tag, so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from aiop.tasks.heads import DEFAULT_WIDTH, TASKS, HeadError
from aiop.tasks.labels import DEFAULT_STORE, OneLineParser, arch_specs, label_archs
from aiop.tasks.train import TrainConfig


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="run_train_cgs_on_task", description=__doc__.splitlines()[0])
    p.add_argument("-family", nargs="+", required=True, help="ofa_mbv3, ofa_pn, ofa_resnet")
    p.add_argument("-task", nargs="+", required=True, help=f"one or more of {', '.join(TASKS)}")
    p.add_argument("-tag", default=None, help="label set name (default individual / shared)")
    p.add_argument("-start_idx", type=int, default=0, help="first architecture number")
    p.add_argument("-num_archs", type=int, default=10, help="architectures per family")
    p.add_argument("-chkpt", default=None, help="shared-head checkpoint to fine-tune from")
    p.add_argument("-cache_file", default=str(DEFAULT_STORE), help="SQLite store")
    p.add_argument("--num_epochs", type=int, default=None, help="default 2, or 1 with -chkpt")
    p.add_argument("--batch_size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("-resolution", type=int, default=None, help="default: the task's own")
    p.add_argument("-n_train", type=int, default=TrainConfig.n_train)
    p.add_argument("-n_val", type=int, default=TrainConfig.n_val)
    p.add_argument("-seed", type=int, default=0, help="weight-initialisation and shuffle seed")
    p.add_argument("-width", type=int, default=DEFAULT_WIDTH, help="head width")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
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
        epochs = args.num_epochs if args.num_epochs is not None else (1 if args.chkpt else 2)
        for name, value in (
            ("--num_epochs", epochs),
            ("--batch_size", args.batch_size),
            ("-resolution", 1 if args.resolution is None else args.resolution),
            ("-n_train", args.n_train),
            ("-n_val", args.n_val),
        ):
            if value < 1:
                raise HeadError(f"{name} must be >= 1, got {value}")
        if not Path(args.cache_file).parent.is_dir():
            raise HeadError(f"-cache_file: directory {Path(args.cache_file).parent} does not exist")
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            resolution=args.resolution,
            n_train=args.n_train,
            n_val=args.n_val,
            seed=args.seed,
        )
        tag = args.tag or ("shared" if args.chkpt else "individual")
        report = label_archs(
            args.cache_file,
            specs,
            tasks,
            cfg,
            tag=tag,
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
            f"labelled {len(report.labelled)}, skipped {len(report.skipped)} (already labelled), "
            f"failed {len(report.failed)}"
        )
        for spec, task, acc, sec in report.labelled:
            print(f"  {spec:24s} {task:15s} acc {acc:.4f}  {sec:.1f} s")
    for spec, task, reason in report.failed[:10]:
        print(f"  failed {spec} {task}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
