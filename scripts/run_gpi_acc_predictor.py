#!/usr/bin/env python
"""Train and evaluate the cross-family GNN predictor the AIO-P way (run_gpi_acc_predictor.py).

    python scripts/run_gpi_acc_predictor.py -cache_file data/labels.db \
        -family_test ofa_pn#5 -targets memory -epochs 60 -num_seeds 2 \
        -fine_tune_epochs 20 -k_adapt 3 -family_k ofa_mbv3 -output_dir runs/gpi
    python scripts/run_gpi_acc_predictor.py -cache_file data/labels.db \
        -family_test ofa_resnet -targets latency -epochs 40 -num_seeds 1

Accuracy within a family (the held-out family's level and spread differ from the training
families'; only the ranking transfers): ``-fine_tune_relevel`` maps the outputs onto the
``#N`` architectures' mean and spread before fine-tuning, ``-fine_tune_params heads|last``
fine-tunes the heads only, ``-fine_tune_rank_weight`` / ``-acc_rank_weight`` add a pairwise
ranking loss (fine-tune / training), ``-fine_tune_select_folds K`` picks the fine-tune epochs
(0 allowed) by out-of-fold SRCC on the ``#N`` architectures, ``-acc_norm family`` trains on
within-family z-scores; without them the fine-tune is AIO-P's (benchmarks/results/
acc_predictor_v4/README.md compares them; its selected protocol re-levels only).
``-fine_tune_joint`` instead trains the network on the ``#N`` architectures together with the
training families from the start (variant ``joint``); measured on v4 classification it did not
beat the zero-shot ranking (benchmarks/results/acc_predictor_v4_joint/README.md).
``-acc_head forest`` answers the accuracy targets with a tree ensemble on each graph's block
readout (stages and blocks found in the CG; ``aiop.predictor.blocks``) instead of the
network's heads; with ``-fine_tune_joint`` (or any fine-tune) the ``#N`` architectures join
its training rows; ``-acc_head ridge`` uses a standardised ridge instead, ``-acc_head auto``
whichever of the two cross-validates better per target (``aiop.predictor.acc_heads``).
Measured: benchmarks/results/acc_predictor_v5_forest/README.md::

    python scripts/run_gpi_acc_predictor.py -cache_file data/task_labels.db \
        -family_test 'ofa_mbv3#150' -targets acc:classification -acc_head forest \
        -fine_tune_joint -num_seeds 2

    python scripts/run_gpi_acc_predictor.py -cache_file data/task_labels.db \
        -family_test 'ofa_mbv3#20' -targets acc:classification -acc_mode individual-v4 \
        -fine_tune_epochs 0 -fine_tune_relevel -num_seeds 3

Latency labels are one-thread CPU steps (``-mode real -profiler latency``); the
latency model's device constants are fitted on the training families only.

Trains on ``-family_train`` (default: every family not held out), holds out
the families of ``-family_test`` (``A#N``: N architectures of A fine-tune, the
rest of A is the test set; the same for every seed), and reports per held-out
family and variant (``noft``, ``ft``, ``kadapt_noft``, ``kadapt_ft``, ``joint``) MAE,
MAPE, median/p95 APE, SRCC, Kendall τ and the shares within ±5 %/±10 %, as mean
± std over ``-num_seeds`` seeds. Writes ``<model_name>.json`` and one
predicted-vs-measured PNG per target and held-out family into ``-output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiop.predictor.acc_heads import ACC_HEADS
from aiop.predictor.forest import DEFAULT_FOREST_KIND, FOREST_KINDS
from aiop.predictor.share import check_acc_share
from aiop.predictor.train import (
    ACC_MODE,
    ACC_NORMS,
    FT_PARAMS,
    RELEVEL_MODES,
    format_acc_mode,
)

LOG = logging.getLogger("run_gpi_acc_predictor")
VARIANTS = ("noft", "ft", "kadapt_noft", "kadapt_ft", "joint")
UNITS = {"memory": "bytes", "latency": "s", "flops": "FLOPs"}


class UsageError(ValueError):
    """Bad input: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags on one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"run_gpi_acc_predictor: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("-cache_file", "-store", default="data/labels.db", help="aiop SQLite store")
    p.add_argument("-model_name", default="gpi", help="run name: prefix of the output files")
    p.add_argument(
        "-gnn", default="default", help="GNN setting: default, aiop (AIO-P baseline), or a conv"
    )
    p.add_argument(
        "-pos_enc",
        type=int,
        default=0,
        help="node positions in the GNN (GNNSpec.pos_enc): 0 off, K frequencies (0-16)",
    )
    p.add_argument("-family_train", nargs="*", default=None, help="families to train on")
    p.add_argument("-family_test", required=True, help="held-out families, e.g. ofa_pn#5+zoo#2")
    p.add_argument("-targets", nargs="+", default=["memory"], help="memory latency flops acc")
    p.add_argument("-tar_norm", default="stand", choices=["stand", "stand_flops"])
    p.add_argument(
        "-no_analytic",
        action="store_true",
        help="AIO-P's setting: the heads predict memory/latency themselves (log normaliser), "
        "no analytic estimate to correct",
    )
    p.add_argument("-latency_device", default="cpu", help="device of the latency labels")
    p.add_argument("-latency_mode", default="real", help="mode of the latency labels")
    p.add_argument(
        "-latency_kind",
        default="kernels",
        choices=["kernels", "terms"],
        help="latency model the GNN corrects: kernel sums (default) or the 30-term model",
    )
    p.add_argument("-kernel_model", default=None, help="kernel model JSON (default: this CPU's)")
    p.add_argument(
        "-acc_mode",
        nargs="+",
        default=None,
        metavar="MODE",
        help="task-label sets of the accuracy targets: 'any', one TAG for every task, or "
        "TASK=TAG pairs replacing those tasks' defaults (default: each task's set under the "
        f"current label recipe, {format_acc_mode(ACC_MODE)})",
    )
    p.add_argument("-epochs", type=int, default=60)
    p.add_argument("-batch_size", type=int, default=64)
    p.add_argument("-lr", type=float, default=1e-3)
    p.add_argument("-fine_tune_epochs", type=int, default=0, help="0: no fine-tuning")
    p.add_argument("-fine_tune_batch_size", type=int, default=8)
    p.add_argument(
        "-fine_tune_lr", type=float, default=None, help="fine-tune learning rate (default: -lr/10)"
    )
    p.add_argument(
        "-fine_tune_params",
        default="all",
        choices=list(FT_PARAMS),
        help="what fine-tuning updates: all parameters (AIO-P), the target heads, or their "
        "last layer",
    )
    p.add_argument(
        "-fine_tune_relevel",
        nargs="?",
        const="moments",
        default=None,
        choices=list(RELEVEL_MODES),
        help="re-level the accuracy outputs to the fine-tune family first: to its mean and "
        "spread (moments, the default), or by least squares on the #N architectures (fit)",
    )
    p.add_argument(
        "-fine_tune_joint",
        action="store_true",
        help="train on the #N architectures of each held-out family together with the "
        "training families from the start (variant 'joint'), instead of fine-tuning afterwards",
    )
    p.add_argument(
        "-fine_tune_rank_weight",
        type=float,
        default=0.0,
        help="weight of a pairwise ranking loss on accuracy targets during fine-tuning",
    )
    p.add_argument(
        "-fine_tune_select_folds",
        type=int,
        default=0,
        help=">=2: choose the fine-tune epochs (0 .. -fine_tune_epochs) by the out-of-fold "
        "SRCC on that many folds of the #N architectures (early stopping without the test set)",
    )
    p.add_argument(
        "-acc_rank_weight",
        type=float,
        default=0.0,
        help="weight of a pairwise ranking loss (pairs within a family) on accuracy targets "
        "during training",
    )
    p.add_argument(
        "-acc_norm",
        default="global",
        choices=list(ACC_NORMS),
        help="accuracy target normaliser: over all training samples (AIO-P) or per family "
        "(within-family z-scores)",
    )
    p.add_argument(
        "-acc_head",
        default="gnn",
        choices=list(ACC_HEADS),
        help="what answers accuracy targets: the network's heads (AIO-P), or a tree ensemble "
        "(forest) or standardised ridge (ridge) on the graph's block readout, or whichever of "
        "the two cross-validates better per target (auto); a readout head ranks a family from "
        "labelled architectures of that family (-fine_tune_joint), zero-shot it does not "
        "transfer",
    )
    p.add_argument("-forest_kind", default=DEFAULT_FOREST_KIND, choices=FOREST_KINDS)
    p.add_argument(
        "-forest_trees", type=int, default=200, help="trees of -acc_head forest (or auto)"
    )
    p.add_argument(
        "-acc_share",
        default="0",
        help="-acc_head forest/ridge/auto: blend each task's training labels with the same "
        "architectures' labels on the other -targets tasks at this weight (0: none), or 'cv' "
        "to pick the weight per task by 5-fold cross-validation, or TASK=WEIGHT pairs "
        "('semantic=0.5,detection=0.25': other tasks unshared; aiop.predictor.share)",
    )
    p.add_argument("-num_seeds", type=int, default=2)
    p.add_argument("-seed", type=int, default=0, help="first training seed")
    p.add_argument("-split_seed", type=int, default=0, help="seed of the #N selection")
    p.add_argument(
        "-k_adapt", type=int, default=None, choices=[0, 1, 2, 3], help="K-adapter fine-tune mode"
    )
    p.add_argument("-k_epochs", type=int, default=30, help="epochs per adapter")
    p.add_argument("-family_k", nargs="*", default=None, help="one adapter per family")
    p.add_argument("-device", default="meta", help="device of the memory labels")
    p.add_argument("-mode", default="meta", help="mode of the memory labels")
    p.add_argument("-output_dir", default="runs/gpi")
    p.add_argument("-save_predictor", action="store_true", help="save the seed-0 predictor")
    p.add_argument(
        "-threads", type=int, default=1, help="torch intra-op threads (1: fastest for small graphs)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in (
        "epochs",
        "num_seeds",
        "batch_size",
        "fine_tune_batch_size",
        "threads",
        "forest_trees",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"-{name} must be at least 1")
    try:
        args.acc_share = check_acc_share(args.acc_share)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name in ("fine_tune_epochs", "k_epochs"):
        if getattr(args, name) < 0:
            raise UsageError(f"-{name} must not be negative")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError("-lr must be a positive number")
    if args.fine_tune_lr is not None and not (
        args.fine_tune_lr > 0 and math.isfinite(args.fine_tune_lr)
    ):
        raise UsageError("-fine_tune_lr must be a positive number")
    for name in ("fine_tune_rank_weight", "acc_rank_weight"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"-{name} must be a non-negative number")
    if args.fine_tune_select_folds < 0 or args.fine_tune_select_folds == 1:
        raise UsageError("-fine_tune_select_folds must be 0 (off) or at least 2")
    if args.acc_norm == "family" and args.tar_norm != "stand":
        raise UsageError("-acc_norm family needs -tar_norm stand")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", args.model_name):
        raise UsageError(f"-model_name {args.model_name!r}: use letters, digits, _ . - only")
    if args.fine_tune_joint and (
        args.fine_tune_epochs or args.fine_tune_relevel or args.k_adapt is not None
    ):
        # the joint network has seen the #N architectures: a fine-tune on them adds nothing
        # that could be scored apart from it
        raise UsageError(
            "-fine_tune_joint trains on the #N architectures itself; it does not combine with "
            "-fine_tune_epochs, -fine_tune_relevel or -k_adapt"
        )
    if args.acc_head != "gnn" and args.k_adapt is not None:
        raise UsageError(f"-acc_head {args.acc_head} has no K-adapters: drop -k_adapt")
    if args.acc_head == "gnn" and args.acc_share != 0:
        raise UsageError(
            "-acc_share shares a readout head's labels: add -acc_head forest, ridge or auto"
        )
    if args.k_adapt is not None and not args.family_k:
        raise UsageError("-k_adapt needs -family_k FAMILY [FAMILY ...] to train adapters on")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from aiop.cache import CacheError
    from aiop.predictor.adapters import KAdapterPredictor
    from aiop.predictor.api import Predictor
    from aiop.predictor.metrics import mean_std, regression_metrics, scatter_plot
    from aiop.predictor.train import (
        SplitError,
        acc_tags,
        collect_predictions,
        families_of,
        finetune,
        fit_predictor,
        load_samples,
        make_spec,
        parse_acc_mode,
        relevel_acc,
        split_by_family,
        targets_present,
    )

    # small graphs: more intra-op threads only add contention (scatter_add_ slows down ~1000×
    # on a busy 2-core machine)
    torch.set_num_threads(args.threads)
    try:
        # a bad -gnn or -pos_enc: one line before anything trains
        replace(make_spec(args.gnn), pos_enc=args.pos_enc).validate()
        acc_mode = ACC_MODE if args.acc_mode is None else parse_acc_mode(args.acc_mode)
        args.acc_mode = format_acc_mode(acc_mode)  # canonical text in the result's args
        if not Path(args.cache_file).is_file():
            raise UsageError(f"no such store: {args.cache_file}")
        samples = load_samples(
            args.cache_file,
            args.targets,
            args.device,
            args.mode,
            latency_device=args.latency_device,
            latency_mode=args.latency_mode,
            acc_mode=acc_mode,
        )
        targets = targets_present(samples)
        for t in args.targets:
            if t != "acc" and t not in targets:
                LOG.warning("no %s labels in %s: target skipped", t, args.cache_file)
        if not samples or not targets:
            raise UsageError(f"{args.cache_file}: no labels for targets {' '.join(args.targets)}")
        split = split_by_family(
            samples, args.family_test, args.split_seed, train_families=args.family_train
        )
    except (CacheError, SplitError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    except ValueError as exc:  # unknown target or GNN setting
        raise UsageError(str(exc).splitlines()[0]) from None
    known = families_of(samples)
    k_samples = []
    if args.k_adapt is not None:
        for f in args.family_k:
            if f not in known:
                raise UsageError(
                    f"unknown family {f!r} in -family_k; the data has {', '.join(known)}"
                )
            if f in split.test:
                raise UsageError(
                    f"-family_k {f!r} is held out: adapters must not see test families"
                )
        k_samples = [s for s in samples if s.family in args.family_k]
    held = list(split.test)
    train = list(split.train)
    if args.fine_tune_joint:
        if not any(split.finetune.values()):
            raise UsageError("-fine_tune_joint needs #N architectures: -family_test A#N")
        train += [s for family in held for s in split.finetune[family]]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    pairs: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    steps = args.num_seeds * (1 + len(held))
    selections: dict[str, list[dict[str, Any]]] = {}  # fine-tune epochs chosen per seed
    heads: list[dict[str, Any]] = []  # -acc_head forest/ridge/auto: the head per target
    bar = tqdm(total=steps, desc=args.model_name, disable=args.quiet)
    t0 = time.perf_counter()

    def score(variant: str, family: str, pred: Any) -> None:
        for t, pr in collect_predictions(pred, split.test[family], targets).items():
            per_seed.setdefault(family, {}).setdefault(variant, {}).setdefault(t, []).append(
                regression_metrics(pr.y_true, pr.y_pred)
            )
            acc = pairs.setdefault((family, variant, t), ([], []))
            acc[0].extend(pr.y_true)
            acc[1].extend(pr.y_pred)

    for i in range(args.num_seeds):
        seed = args.seed + i
        bar.set_postfix(seed=seed, step="train")
        base = Predictor(
            spec=replace(make_spec(args.gnn), pos_enc=args.pos_enc),
            targets=targets,
            tar_norm=args.tar_norm,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            progress=False,
            analytic=not args.no_analytic,
            latency_kind=args.latency_kind,
            kernel_model=args.kernel_model,
            acc_head=args.acc_head,
            forest_kind=args.forest_kind,
            forest_trees=args.forest_trees,
            acc_share=args.acc_share,
        )
        if not split.train:
            raise UsageError("no training samples in -family_train")
        fit_predictor(base, train, args.acc_norm, args.acc_rank_weight)
        if base.acc_readouts:  # which readout head answers each accuracy target
            heads.append({"seed": seed, "targets": base.acc_head_summary()})
        if args.save_predictor and i == 0:
            base.save(out_dir / f"{args.model_name}_seed{seed}.safetensors")
        kp = None
        if args.k_adapt is not None:
            kp = KAdapterPredictor(
                base, args.family_k, k_epochs=args.k_epochs, lr=args.lr, seed=seed, progress=False
            )
            kp.fit(k_samples)
        bar.update(1)
        for family in held:
            bar.set_postfix(seed=seed, step=family)
            score("joint" if args.fine_tune_joint else "noft", family, base)
            ft_set = split.finetune[family]
            # -fine_tune_relevel with -fine_tune_epochs 0: the re-levelled zero-shot network
            if (args.fine_tune_epochs or args.fine_tune_relevel) and ft_set:
                tuned_ft = finetune(
                    base,
                    ft_set,
                    args.fine_tune_epochs,
                    batch_size=args.fine_tune_batch_size,
                    lr=args.fine_tune_lr,
                    params=args.fine_tune_params,
                    relevel=args.fine_tune_relevel or False,
                    rank_weight=args.fine_tune_rank_weight,
                    select_folds=args.fine_tune_select_folds,
                )
                score("ft", family, tuned_ft)
                for sel in tuned_ft.meta.get("finetune_selection", []):
                    selections.setdefault(family, []).append({"seed": seed, **sel})
            if kp is not None:
                score("kadapt_noft", family, kp)
                if args.fine_tune_epochs and ft_set:
                    tuned = kp.clone()
                    if args.fine_tune_relevel:
                        relevel_acc(tuned, ft_set, args.fine_tune_relevel)
                    tuned.finetune(
                        ft_set,
                        args.k_adapt,
                        args.fine_tune_epochs,
                        lr=args.fine_tune_lr,
                        batch_size=args.fine_tune_batch_size,
                    )
                    score("kadapt_ft", family, tuned)
            bar.update(1)
    bar.close()
    result: dict[str, Any] = {
        "model_name": args.model_name,
        "args": {k: v for k, v in vars(args).items()},
        "targets": targets,
        # the label set each accuracy target learnt from ("any": every set)
        "acc_tags": acc_tags(acc_mode, [t[4:] for t in targets if t.startswith("acc:")]),
        "families": known,
        "split": split.describe(),
        "finetune_graphs": split.finetune_graphs,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": {
            fam: {
                var: {t: mean_std(runs) for t, runs in by_t.items()} for var, by_t in by_var.items()
            }
            for fam, by_var in per_seed.items()
        },
        "plots": [],
    }
    if selections:
        result["finetune_selection"] = selections
    if heads:
        result["acc_heads"] = heads
    for family, t in sorted({(f, t) for f, _, t in pairs}):
        # one plot per (family, target), its variants as series
        series = {v: pairs[(family, v, t)] for v in VARIANTS if (family, v, t) in pairs}
        path = out_dir / f"{args.model_name}_{_safe(family)}_{_safe(t)}.png"
        scatter_plot(
            series,
            path,
            title=f"{args.model_name}: {t} on held-out {family} ({args.num_seeds} seed(s) pooled)",
            unit=UNITS.get(t, ""),
            log_scale=t in ("memory", "latency", "flops"),
        )
        result["plots"].append(str(path))
    json_path = out_dir / f"{args.model_name}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str, allow_nan=True))
    result["json"] = str(json_path)
    return result


def _digits(metric: str) -> int:
    return 3 if metric in ("srcc", "kendall") else 2


def print_table(result: dict[str, Any]) -> None:
    from aiop.predictor.metrics import format_mean_std

    cols = [("median_ape", 1, "medAPE%"), ("p95_ape", 1, "p95APE%"), ("mape", 1, "MAPE%")]
    cols += [("srcc", 1, "SRCC"), ("kendall", 1, "tau"), ("within_5", 100, "±5%")]
    cols += [("within_10", 100, "±10%")]
    head = f"{'family':<12} {'variant':<12} {'target':<10} " + " ".join(f"{c[2]:>15}" for c in cols)
    print(head)
    for fam, by_var in result["results"].items():
        for var, by_t in by_var.items():
            for t, stats in by_t.items():
                cells = " ".join(
                    f"{format_mean_std(stats.get(k, {}), scale, _digits(k)):>15}"
                    for k, scale, _ in cols
                )
                print(f"{fam:<12} {var:<12} {t:<10} {cells}")
    print(f"wrote {result['json']} and {len(result['plots'])} plot(s) in {result['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        _check_args(args)
        result = run(args)
    except UsageError as exc:
        print(f"run_gpi_acc_predictor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
