"""Is the forest the limit? Other regressors on the block readout, over several test splits.

Fits, for one task and family, each regressor on the ``n`` labelled architectures of the
family's pool alone (``split_by_family(samples, 'FAMILY#n', split_seed)``; with ``--joint``
on the other families' architectures as well, as the predictor does) and scores its
SRCC on the held-out rest, for every split seed in ``--split_seeds``; the spread over
splits is the test set's own noise, which one split hides. Regressors: the predictor's
forests (:class:`aiop.predictor.forest.TreeEnsemble`, extra / random), scikit-learn's
gradient boosting, the predictor's standardised ridge (:class:`aiop.predictor.linear.
RidgeReadout`, its alpha by leave-one-out) and the predictor's ``acc_head="auto"`` (the
random forest or the ridge, whichever :func:`aiop.predictor.acc_heads.choose_heads`
cross-validates better on the training architectures of the held-out graph's family). With
``--test_acc_mode`` the regressors learn from one label set and are scored against another,
a seed replicate of it (``replicate-v6-seed1``) or their mean (``A+B``): how much of a
ranking is the training labels' own seed. The predictor ships the forests, the ridge and
``auto``; gradient boosting and the extremely randomised trees are references::

    OMP_NUM_THREADS=1 python benchmarks/acc_readout_regressors.py --task classification \\
        --acc_mode classification=individual-v6 --family ofa_mbv3 --n 150 \\
        --out benchmarks/results/acc_predictor_v5_forest --name readout_regressors_v6_mbv3

Writes ``NAME.json`` and ``NAME.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="data/task_labels.db")
    p.add_argument("--task", default="classification")
    p.add_argument("--acc_mode", default=None, help="label set (default: the task's default set)")
    p.add_argument(
        "--test_acc_mode",
        default=None,
        help="score against this label set instead (e.g. a seed replicate of --acc_mode's: "
        "how much of a ranking is the training labels' own seed); default: --acc_mode's",
    )
    p.add_argument(
        "--share_tasks",
        nargs="*",
        default=[],
        help="also score the default forest trained on labels shared with these tasks' labels "
        "of the same training architectures (aiop.predictor.share), at each --share_weights",
    )
    p.add_argument("--share_weights", nargs="+", default=["0.25", "0.5", "1", "cv"])
    p.add_argument("--family", required=True)
    p.add_argument("--n", type=int, default=150, help="labelled pool of the family")
    p.add_argument("--split_seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--joint", action="store_true", help="train on the other families too")
    p.add_argument("--out", default="benchmarks/results/acc_predictor_v5_forest")
    p.add_argument("--name", default=None, help="result stem (default: readout_regressors_TASK)")
    return p


def regressors() -> dict[str, Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], Any]]]:
    """Each regressor as fit(x, y) -> predict."""
    from sklearn.ensemble import GradientBoostingRegressor

    from aiop.predictor.forest import TreeEnsemble
    from aiop.predictor.linear import RidgeReadout

    def forest(kind: str):
        return lambda x, y: TreeEnsemble.fit(x, y, kind=kind, trees=200).predict

    def gbm(x, y):
        m = GradientBoostingRegressor(
            n_estimators=300, max_depth=3, learning_rate=0.03, subsample=0.8, random_state=0
        )
        return m.fit(x, y).predict

    def ridge(x, y):
        return RidgeReadout.fit(x, y).predict

    return {
        "forest (extra)": forest("extra"),
        DEFAULT_FOREST: forest("random"),
        "gradient boosting": gbm,
        "ridge": ridge,
    }


SHARED = "forest (random), shared"
AUTO = "auto (forest or ridge per family by CV)"
DEFAULT_FOREST = "forest (random, the default)"


def _srcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """SRCC of a prediction; NaN for a constant one, which ranks nothing (left out of the
    mean and said in the table)."""
    from scipy.stats import spearmanr

    return float("nan") if bool(np.ptp(pred) == 0) else float(spearmanr(pred, truth)[0])


def _nan_stat(stat: Callable[[Any], Any], values: list[float]) -> float:
    """``stat`` over the splits that ranked (NaN: a constant prediction), NaN if none did."""
    ranked = [v for v in values if v == v]
    return float(stat(ranked)) if ranked else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scipy.stats import spearmanr

    from aiop.predictor.acc_heads import fit_head, fit_target_readout
    from aiop.predictor.blocks import block_readout
    from aiop.predictor.forest import TreeEnsemble
    from aiop.predictor.share import check_acc_share, choose_share, shared_labels
    from aiop.predictor.train import (
        ACC_MODE,
        AccModeError,
        acc_tags,
        load_samples,
        parse_acc_mode,
        split_by_family,
    )

    target = f"acc:{args.task}"
    if not Path(args.store).is_file():
        print(f"error: no store at {args.store}", file=sys.stderr)
        return 2
    try:
        acc_mode = ACC_MODE if args.acc_mode is None else parse_acc_mode(args.acc_mode)
        samples = load_samples(args.store, [target], acc_mode=acc_mode)  # A+B: checked here
        test_mode = acc_mode
        truth: dict[str, float] | None = None  # fingerprint -> the label scored against
        if args.test_acc_mode is not None:
            test_mode = parse_acc_mode(args.test_acc_mode)
            truth = {
                s.cg.fingerprint: s.labels[target]
                for s in load_samples(args.store, [target], acc_mode=test_mode)
            }
        weights = [check_acc_share(w) for w in args.share_weights] if args.share_tasks else []
        if any(isinstance(w, dict) for w in weights):
            raise ValueError("--share_weights takes numbers ≥ 0 or 'cv'")
        shared = []  # other tasks' samples, matched to the target's by their backbone
        if weights:
            share_targets = [f"acc:{t}" for t in args.share_tasks if t != args.task]
            shared = load_samples(args.store, share_targets, acc_mode=acc_mode)
            shared = [s for s in shared if s.cg.meta.get("model")]
    except (AccModeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    readout = {id(s.cg): block_readout(s.cg) for s in samples}
    models = regressors()
    scores: dict[str, list[float]] = {k: [] for k in [*models, AUTO]}
    auto_chosen: list[str] = []  # the head acc_head="auto" picked, per split
    scores.update({f"{SHARED} {w}": [] for w in weights})
    chosen: list[float] = []  # the weight "cv" picked, per split
    sizes: list[int] = []
    agreement: list[float] = []  # SRCC of the training set's labels with the scoring set's
    for seed in args.split_seeds:
        try:
            split = split_by_family(
                samples, f"{args.family}#{args.n}", seed, require_train=args.joint
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        pool, test = split.finetune[args.family], split.test[args.family]
        if truth is not None:  # architectures the scoring set did not label cannot be scored
            test = [s for s in test if s.cg.fingerprint in truth]
        if len(pool) < 2 or len(test) < 3:
            print(f"error: {args.family}: {len(pool)} pool / {len(test)} test", file=sys.stderr)
            return 2
        if args.joint:
            pool = [*split.train, *pool]
        x = np.array([readout[id(s.cg)] for s in pool])
        xt = np.array([readout[id(s.cg)] for s in test])
        keep = x.std(axis=0) > 0  # constant columns carry nothing and upset the scaler
        y = np.array([s.labels[target] for s in pool])
        yt = np.array([s.labels[target] for s in test])
        if truth is not None:
            own = yt
            yt = np.array([truth[s.cg.fingerprint] for s in test])
            agreement.append(float(spearmanr(own, yt)[0]))
        sizes.append(len(test))
        for name, fit in models.items():
            scores[name].append(_srcc(fit(x[:, keep], y)(xt[:, keep]), yt))
        auto = fit_target_readout(
            "auto", x[:, keep], y, [s.family for s in pool],
            lambda k, xx, yy: fit_head(k, xx, yy, forest_kind="random", trees=200, seed=0),
            n_readout=int(keep.sum()),
            cv_fit=lambda k, xx, yy: fit_head(k, xx, yy, forest_kind="random", trees=100, seed=0),
        )  # fmt: skip
        auto_chosen.append(auto.by_family.get(args.family, auto.default))
        scores[AUTO].append(_srcc(auto.predict(xt[:, keep]), yt))
        if weights:
            pool_models = [s.cg.meta.get("model") for s in pool]
            if len(set(pool_models) - {None}) != len(pool):
                print("error: sharing needs one graph per model (meta model)", file=sys.stderr)
                return 2
            test_models = {s.cg.meta.get("model") for s in test}
            arch: dict[str, dict[str, tuple[str, float]]] = {}
            for s in shared:  # other tasks' labels of every architecture not held out
                if s.cg.meta["model"] not in test_models:
                    for t, v in s.labels.items():
                        arch.setdefault(t, {})[s.cg.meta["model"]] = (s.family, v)
            arch[target] = {m: (s.family, yv) for m, s, yv in zip(pool_models, pool, y)}
            row_of = dict(zip(pool_models, x[:, keep]))

            def fit_predict(train, ys, held, trees=200, row_of=row_of):
                forest = TreeEnsemble.fit(
                    np.stack([row_of[m] for m in train]), np.asarray(ys), trees=trees
                )
                return forest.predict(np.stack([row_of[m] for m in held]))

            for w in weights:
                lam = w
                if w == "cv":
                    lam, _ = choose_share(
                        arch, target, lambda a, b, c: fit_predict(a, b, c, trees=100)
                    )
                    chosen.append(lam)
                labels = shared_labels(arch, target, float(lam))
                fit = models[DEFAULT_FOREST]
                pred = fit(x[:, keep], np.array([labels[m] for m in pool_models]))(xt[:, keep])
                scores[f"{SHARED} {w}"].append(_srcc(pred, yt))
    result = {
        "args": vars(args),
        "acc_tags": acc_tags(acc_mode, [args.task]),
        "test_acc_tags": acc_tags(test_mode, [args.task]),
        "label_agreement": agreement,
        "share_cv_chosen": chosen,
        "auto_chosen": auto_chosen,
        "test_sizes": sizes,
        "srcc": scores,
        "mean": {k: _nan_stat(np.nanmean, v) for k, v in scores.items()},
        "std": {k: _nan_stat(np.nanstd, v) for k, v in scores.items()},
    }
    cmd = "python benchmarks/acc_readout_regressors.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"# Regressors on the block readout: {args.task}, {args.family}, "
        f"{'joint' if args.joint else 'family only'} n = {args.n}",
        "",
        f"Command: `{cmd}`",
        "",
        f"SRCC on the held-out architectures ({sizes[0]} per split) for split seeds "
        f"{', '.join(map(str, args.split_seeds))}; mean ± std over the splits (nan: a "
        "constant prediction, left out of the mean).",
        "",
    ]
    if truth is not None:
        tags = result["test_acc_tags"][args.task]
        lines += [
            f"Trained on `{result['acc_tags'][args.task]}`, scored against `{tags}`. "
            f"The two sets' own labels of the held-out architectures agree at SRCC "
            f"{np.mean(agreement):.3f} ± {np.std(agreement):.3f} "
            f"({' / '.join(f'{a:.3f}' for a in agreement)}).",
            "",
        ]
    if weights:
        lines += [
            f"`{SHARED} W`: the default forest on training labels shared with the same "
            f"architectures' {', '.join(args.share_tasks)} labels at weight W "
            "(`aiop.predictor.share`; `cv`: chosen by 5-fold cross-validation on the "
            f"training architectures, here {' / '.join(f'{c:g}' for c in chosen) or '–'}).",
            "",
        ]
    lines += [
        f'`{AUTO}`: the predictor\'s `acc_head="auto"`; it answered {args.family} with '
        f"{' / '.join(auto_chosen)} (per split).",
        "",
        "| regressor | SRCC mean ± std | per split |",
        "|---|---|---|",
    ]
    for k, v in scores.items():
        per = " / ".join(f"{x:.3f}" for x in v)
        mean, std = result["mean"][k], result["std"][k]
        lines.append(f"| {k} | {mean:.3f} ± {std:.3f} | {per} |")
    name = args.name or f"readout_regressors_{args.task}"
    write_results(args.out, name, result, "\n".join(lines) + "\n")
    print("\n".join(lines[-len(scores) :]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
