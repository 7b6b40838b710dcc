#!/usr/bin/env python
"""Train AIO-P's shared task head over a pool of sampled backbones of a family.

    python scripts/run_train_head_on_task.py -family ofa_mbv3 -task detection -tag sampled \
        -sample_n 8 --num_steps 400

writes ``data/shared_heads/ofa_mbv3_detection_sampled.safetensors`` (or
``-chkpt PATH``), which ``run_train_cgs_on_task.py -chkpt`` fine-tunes from. An
existing checkpoint is kept (the run is skipped) unless ``-overwrite``; the file
is written atomically, so an interrupted run leaves no partial checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from aiop.tasks.heads import DEFAULT_WIDTH, TASKS, HeadError
from aiop.tasks.labels import OneLineParser
from aiop.tasks.shared_head import DEFAULT_POOL_START, MODES, SharedHeadConfig
from aiop.tasks.train import INITS


def default_chkpt(family: str, task: str, tag: str) -> Path:
    return Path("data/shared_heads") / f"{family}_{task}_{tag}.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="run_train_head_on_task", description=__doc__.splitlines()[0])
    p.add_argument("-family", required=True, help="ofa_mbv3, ofa_pn or ofa_resnet")
    p.add_argument("-task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("-tag", default="sampled", help="names the checkpoint")
    p.add_argument("-chkpt", default=None, help="output checkpoint (.safetensors)")
    p.add_argument("-sample_n", type=int, default=8, help="backbones in the pool")
    p.add_argument("-pool_start", type=int, default=DEFAULT_POOL_START, help="first pool seed")
    p.add_argument("-mode", default="swap", choices=MODES, help="swap: train bodies too")
    p.add_argument("--num_steps", type=int, default=300, help="optimizer steps (one body each)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("-resolution", type=int, default=None, help="default: the task's own")
    p.add_argument("-n_train", type=int, default=1000)
    p.add_argument("-seed", type=int, default=0)
    p.add_argument(
        "-init",
        default="scratch",
        choices=INITS,
        help="pool backbones from scratch, or from the family's supernet (label recipe v4)",
    )
    p.add_argument("-width", type=int, default=DEFAULT_WIDTH, help="head width")
    p.add_argument("-overwrite", action="store_true", help="retrain an existing checkpoint")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.chkpt) if args.chkpt else default_chkpt(args.family, args.task, args.tag)
    try:
        from aiop.models import FAMILY_NAMES

        if args.family not in FAMILY_NAMES:
            raise HeadError(f"unknown family {args.family!r}; valid: {', '.join(FAMILY_NAMES)}")
        cfg = SharedHeadConfig(
            family=args.family,
            task=args.task,
            pool_size=args.sample_n,
            pool_start=args.pool_start,
            mode=args.mode,
            steps=args.num_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            resolution=args.resolution,
            n_train=args.n_train,
            seed=args.seed,
            width=args.width,
            init=args.init,
        )
        if out.exists() and not args.overwrite:
            print(f"{out} exists: kept (use -overwrite to retrain)")
            return 0
        from aiop.tasks.shared_head import save_head, train_shared_head

        head, meta = train_shared_head(cfg, progress=not args.quiet)
        save_head(head, meta, out)
    except KeyboardInterrupt:
        print("interrupted: no checkpoint written", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"run_train_head_on_task: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    summary = {"chkpt": str(out), "seconds": meta["seconds"], "final_loss": meta["final_loss"]}
    print(json.dumps(summary) if args.json else f"wrote {out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
