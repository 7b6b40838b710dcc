"""Cross-task label sharing for the accuracy forests.

An architecture labelled on several tasks carries, in each label, one seed's noise and
the architecture's own quality, which the tasks partly share (on 200 ofa_mbv3
architectures detection and panoptic rank alike at SRCC 0.78, semantic and detection at
0.68; classification and the scene tasks at 0.16-0.33). Sharing blends each training
label of task ``T`` with the same architecture's labels on the other tasks, all
standardised within (task, family)::

    z'_T = (z_T + lam * sum_U z_U) / (1 + lam * k)        # k: the other tasks it has
    y'_T = mean_T + std_T * z'_T

``lam = 0`` is no sharing; each task may have its own ``lam`` (``semantic=0.5``). Only
training labels change: a held-out architecture is still predicted from its graph alone,
and no label of it is read.

The tasks share more or less (classification hardly at all), so :func:`choose_share` can
pick ``lam`` per task from :data:`SHARE_GRID` by k-fold cross-validation over the task's
training architectures, scored by the SRCC of the fold's predictions against the task's
*own* labels, per family, and accepting a weight only where it beats no sharing by one
standard error of the paired fold differences. At 150 architectures that test is strict:
on ofa_mbv3 it kept semantic segmentation unshared on three of four test splits where a
fixed 0.5 lifts it from 0.73 to 0.82 (``benchmarks/results/acc_predictor_v5_forest/
readout_regressors_shared_*.md``). Naming the weight per task is the stronger choice there.

Architectures are matched across tasks by the ``model`` key a task graph carries in its
``meta`` (``family:ofa_mbv3:23`` for every task graph built on that backbone); a graph
without one keeps its own label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aiop.predictor.metrics import _rank_corr

SHARE_GRID = (0.0, 0.25, 0.5, 1.0)
ACC_SHARE_CHOICES = ("cv",)  # besides a number ≥ 0

# target -> model key -> (family, label)
ArchLabels = Mapping[str, Mapping[str, tuple[str, float]]]


AccShare = float | str | dict[str, float | str]


def _one_share(value: float | str) -> float | str:
    if isinstance(value, str):
        if value in ACC_SHARE_CHOICES:
            return value
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"acc_share must be a number ≥ 0, 'cv' or TASK=WEIGHT pairs, got {value!r}"
            ) from None
    if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
        raise ValueError(
            f"acc_share must be a number ≥ 0, 'cv' or TASK=WEIGHT pairs, got {value!r}"
        )
    return float(value)


def check_acc_share(value: AccShare) -> AccShare:
    """``value`` as a number ≥ 0, ``"cv"``, or a task -> weight mapping (also written
    ``"semantic=0.5,detection=cv"``; a task not named is not shared); ValueError otherwise."""
    if isinstance(value, str) and "=" in value:
        pairs = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
        value = {}
        for pair in pairs:
            task, sep, weight = pair.partition("=")
            if not sep or not task or task in value:
                raise ValueError(f"acc_share: bad or repeated TASK=WEIGHT pair {pair!r}")
            value[task] = weight
    if isinstance(value, dict):
        return {str(t).removeprefix("acc:"): _one_share(w) for t, w in value.items()}
    return _one_share(value)


def share_for(acc_share: AccShare, target: str) -> float | str:
    """The weight (or ``"cv"``) ``acc_share`` gives the accuracy target ``target``."""
    if isinstance(acc_share, dict):
        return acc_share.get(target.removeprefix("acc:"), 0.0)
    return acc_share


def _standardise(labels: Mapping[str, tuple[str, float]]) -> dict[str, tuple[float, float, float]]:
    """model -> (z, mean, std) with mean and std over the model's family."""
    by_family: dict[str, list[float]] = {}
    for family, y in labels.values():
        by_family.setdefault(family, []).append(y)
    stats = {}
    for family, ys in by_family.items():
        sd = float(np.std(ys))
        stats[family] = (float(np.mean(ys)), sd if sd > 0 else 1.0)
    return {m: ((y - stats[f][0]) / stats[f][1], *stats[f]) for m, (f, y) in labels.items()}


def shared_labels(arch_labels: ArchLabels, target: str, lam: float) -> dict[str, float]:
    """``target``'s labels (model -> value) blended with the other targets' labels of the same
    models at weight ``lam`` (see the module docstring)."""
    own = arch_labels[target]
    if lam == 0:
        return {m: y for m, (_, y) in own.items()}
    z = {t: _standardise(labels) for t, labels in arch_labels.items()}
    out = {}
    for m, (zt, mean, sd) in z[target].items():
        others = [z[u][m][0] for u in z if u != target and m in z[u]]
        blended = (zt + lam * sum(others)) / (1.0 + lam * len(others))
        out[m] = mean + sd * blended
    return out


def choose_share(
    arch_labels: ArchLabels,
    target: str,
    fit_predict: Callable[[Sequence[str], Sequence[float], Sequence[str]], np.ndarray],
    grid: Sequence[float] = SHARE_GRID,
    folds: int = 5,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The ``lam`` of ``grid`` whose shared labels rank held-out folds of ``target``'s
    architectures best, and each ``lam``'s score.

    ``fit_predict(train_models, train_labels, test_models)`` fits a regressor and predicts.
    A fold's score is the mean SRCC over its families with ≥ 3 architectures against the
    target's own labels. A ``lam > 0`` is chosen only where it beats ``lam = 0`` by more than
    one standard error of the paired per-fold differences; among those, the best.
    """
    own = arch_labels[target]
    models = sorted(own)
    if len(models) < 2 * folds:
        return 0.0, {}
    order = np.random.default_rng(seed).permutation(len(models))
    parts = [[models[i] for i in order[k::folds]] for k in range(folds)]
    per_fold: dict[float, list[float]] = {}  # NaN where a fold ranked nothing
    for lam in grid:
        fold_scores = []
        for held in parts:
            held_set = set(held)
            train = {**arch_labels, target: {m: v for m, v in own.items() if m not in held_set}}
            labels = shared_labels(train, target, lam)
            fit_models = sorted(labels)
            pred = fit_predict(fit_models, [labels[m] for m in fit_models], held)
            per_family = []
            for family in sorted({own[m][0] for m in held}):
                idx = [i for i, m in enumerate(held) if own[m][0] == family]
                if len(idx) >= 3:
                    rho = _rank_corr("srcc", np.array([own[held[i]][1] for i in idx]), pred[idx])
                    if rho == rho:
                        per_family.append(rho)
            fold_scores.append(float(np.mean(per_family)) if per_family else float("nan"))
        per_fold[float(lam)] = fold_scores
    scores = {lam: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
              for lam, v in per_fold.items()}  # fmt: skip
    # a weight must beat no sharing by more than one standard error of the paired fold
    # differences: the folds' own noise (about ±0.03 SRCC at 150 architectures) would
    # otherwise pick a weight for an unrelated task about as often as not
    best, best_score = 0.0, scores.get(0.0, float("nan"))
    base = np.array(per_fold.get(0.0, []))
    for lam in sorted(per_fold):
        if lam == 0.0 or not base.size:
            continue
        diff = np.array(per_fold[lam]) - base
        diff = diff[np.isfinite(diff)]
        if diff.size < 2:
            continue
        gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))
        if gain > se and scores[lam] > best_score:
            best, best_score = lam, scores[lam]
    return best, scores


__all__ = [
    "ACC_SHARE_CHOICES",
    "SHARE_GRID",
    "check_acc_share",
    "choose_share",
    "share_for",
    "shared_labels",
]
