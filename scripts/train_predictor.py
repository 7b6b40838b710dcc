#!/usr/bin/env python
"""Train the predictor aiop ships (or any other) on every family of a store.

    python scripts/train_predictor.py -store data/labels.db \
        -output aiop/data/default_predictor.safetensors

A deterministic 10 % of the graphs is held out: the predictor is fitted on the
rest and its error quantiles on the held-out graphs are saved with it (the
planner's safety margin). With latency labels (``-mode real -profiler latency``,
one-thread CPU steps) the latency model is fitted on the training graphs' labels
and stored in the file's JSON metadata: by default the kernel-level model (the
device's kernel regressors, ``-kernel_model``, fitted by ``python -m
aiop.predictor.kernels`` on ``python -m aiop.profiler.microbench`` timings, under a
few constants fitted here); ``-latency_kind terms`` the older 30-term model. A new
device needs its own microbenchmarks, labels and these commands. Evaluate
generalisation to unseen families with
``scripts/run_gpi_acc_predictor.py`` / ``benchmarks/predictor_accuracy.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from aiop.predictor.api import Predictor, PredictorError
from aiop.predictor.train import (
    ACC_MODE,
    acc_tags,
    format_acc_mode,
    load_samples,
    make_spec,
    parse_acc_mode,
)


def _held_out(fingerprint: str, share: float) -> bool:
    return int(hashlib.sha256(fingerprint.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-store", default="data/labels.db")
    parser.add_argument("-output", default="aiop/data/default_predictor.safetensors")
    parser.add_argument("-targets", nargs="+", default=["memory", "latency", "flops"])
    parser.add_argument("-gnn", default="default", help="default, aiop or a conv name")
    parser.add_argument("-epochs", type=int, default=60)
    parser.add_argument("-holdout", type=float, default=0.1)
    parser.add_argument("-seed", type=int, default=0)
    parser.add_argument(
        "-latency_kind",
        default="kernels",
        choices=["kernels", "terms"],
        help="latency model: kernel sums (default) or the 30-term analytic model",
    )
    parser.add_argument(
        "-kernel_model",
        default=None,
        help="kernel model JSON (default: package data aiop/data/kernel_model_cpu_1thread.json)",
    )
    parser.add_argument(
        "-acc_mode",
        nargs="+",
        default=None,
        metavar="MODE",
        help="task-label sets of acc targets: 'any', one TAG, or TASK=TAG pairs (default: "
        "each task's set under the current label recipe)",
    )
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # PyG's scatter ops crawl with 2 threads on a shared 2-core box
    try:
        acc_mode = ACC_MODE if args.acc_mode is None else parse_acc_mode(args.acc_mode)
        samples = load_samples(args.store, args.targets, acc_mode=acc_mode)
        if not samples:
            raise PredictorError(f"{args.store}: no labelled samples for {args.targets}")
        held = [s for s in samples if _held_out(s.cg.fingerprint, args.holdout)]
        train = [s for s in samples if not _held_out(s.cg.fingerprint, args.holdout)]
        predictor = Predictor(
            spec=make_spec(args.gnn), targets=args.targets, epochs=args.epochs,
            seed=args.seed, progress=not args.quiet,
            latency_kind=args.latency_kind, kernel_model=args.kernel_model,
        )  # fmt: skip
        predictor.fit(train)
        predictor.meta = {
            "store": str(args.store),
            "train_samples": len(train),
            "holdout_samples": len(held),
            "families": sorted({s.family for s in samples}),
            "command": " ".join(["scripts/train_predictor.py", *(argv or sys.argv[1:])]),
        }
        acc_tasks = sorted({t[4:] for s in samples for t in s.labels if t.startswith("acc:")})
        if acc_tasks:  # the label set each accuracy target learnt from
            predictor.meta["acc_mode"] = format_acc_mode(acc_mode)
            predictor.meta["acc_tags"] = acc_tags(acc_mode, acc_tasks)
        if predictor.latency_model is not None:
            lm = predictor.latency_model
            predictor.meta["latency_model"] = {
                "kind": "kernels" if hasattr(lm, "kernels") else "terms",
                "n_labels": lm.n_labels,
                "fit_median_ape": lm.fit_median_ape,
                "device": lm.device,
                **lm.describe(),
            }
        if held:
            predictor.calibrate(held)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        predictor.save(out)
    except (PredictorError, ValueError) as exc:
        print(f"train_predictor: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"saved": str(out), **predictor.meta, "errors": predictor.error_quantiles}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
