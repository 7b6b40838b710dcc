"""Accuracy heads on the block readout: a forest, a ridge, or whichever cross-validates better.

The predictor's network can answer accuracy targets itself (``acc_head="gnn"``, AIO-P), but
on labelled architectures of a family a regressor on the graph's block readout plus the
configuration vector (:mod:`aiop.predictor.blocks`) ranks them far better. Which regressor
depends on the label set, and within one task on the family: on semantic segmentation the
random forest leads on ofa_pn and ofa_mbv3, a standardised ridge on ofa_resnet
(benchmarks/results/acc_predictor_v5_forest/README.md). So ``acc_head="auto"`` chooses per
family (:func:`choose_heads`, grouped k-fold cross-validation over the training graphs) and
a graph is answered by the head of the family whose labelled graphs it is nearest to
(:meth:`TargetReadout.family_of`).

A :class:`TargetReadout` holds one accuracy target's fitted heads, the choice, and the rows
they were fitted on (a fine-tune refits on their union with new ones); it is stored as
safetensors tensors plus a JSON entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from aiop.predictor.forest import ForestError, TreeEnsemble
from aiop.predictor.linear import RidgeError, RidgeReadout
from aiop.predictor.metrics import _rank_corr

READOUT_HEADS = ("forest", "ridge")
ACC_HEADS = ("gnn", *READOUT_HEADS, "auto")
ReadoutHead = TreeEnsemble | RidgeReadout
ReadoutFit = Callable[[str, np.ndarray, np.ndarray], ReadoutHead]
CV_FOLDS = 5
# repeated k-fold: a choice between two heads within the folds' noise flips with the fold
# draw; over fifteen label sets three draws instead of one moved ofa_mbv3 / ofa_resnet
# detection +0.035 / +0.021 SRCC and ofa_mbv3 semantic -0.019 (the rest unchanged)
CV_REPEATS = 3


class ReadoutHeadError(ValueError):
    """A readout head cannot be fitted or restored as asked."""


def head_prefix(kind: str, target: str) -> str:
    """Where a target's head lives among a predictor file's tensors (``acc_forest/`` is the
    format forests have always had)."""
    return f"acc_{kind}/{target}/"


def fit_head(
    kind: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    forest_kind: str,
    trees: int,
    seed: int,
) -> ReadoutHead:
    """Fit a readout head of ``kind`` (``forest`` or ``ridge``) on rows ``x`` → ``y``."""
    try:
        if kind == "forest":
            return TreeEnsemble.fit(x, y, kind=forest_kind, trees=trees, seed=seed)
        if kind == "ridge":
            return RidgeReadout.fit(x, y)
    except (ForestError, RidgeError) as exc:
        raise ReadoutHeadError(str(exc)) from None
    raise ReadoutHeadError(f"unknown readout head {kind!r}; choose {', '.join(READOUT_HEADS)}")


def head_from_tensors(
    kind: str, state: Mapping[str, torch.Tensor], target: str, n_features: int
) -> ReadoutHead:
    """Restore ``target``'s head of ``kind`` from a predictor file's tensors."""
    prefix = head_prefix(kind, target)
    try:
        if kind == "forest":
            return TreeEnsemble.from_tensors(state, prefix, n_features)
        if kind == "ridge":
            return RidgeReadout.from_tensors(state, prefix, n_features)
    except (ForestError, RidgeError) as exc:
        raise ReadoutHeadError(str(exc)) from None
    raise ReadoutHeadError(f"unknown readout head {kind!r}; choose {', '.join(READOUT_HEADS)}")


def _mean_scored(values: Sequence[float]) -> float:
    """The mean of the fold scores that ranked something (NaN: none did)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _pick(per_fold: Mapping[str, Sequence[float]], kinds: Sequence[str]) -> str:
    """The kind with the best mean fold SRCC (the first of ``kinds`` on a tie or when no
    fold scored). Unlike a sharing weight, neither head is the cautious choice: where the
    two are close, either costs little, and a margin rule kept the forest on ofa_resnet
    semantic segmentation, where the ridge led on every split by 0.02-0.06."""
    best, best_score = kinds[0], -np.inf
    for kind in kinds:
        score = _mean_scored(per_fold[kind])  # NaN never beats
        if score > best_score:
            best, best_score = kind, score
    return best


@dataclass
class HeadChoice:
    """What :func:`choose_heads` decided: a kind per family with enough graphs to decide,
    ``default`` for the others, and the mean fold SRCC behind each decision."""

    default: str
    by_family: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # kind -> over all families
    family_scores: dict[str, dict[str, float]] = field(default_factory=dict)


def choose_heads(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    families: Mapping[Any, str],
    fit: ReadoutFit,
    *,
    kinds: Sequence[str] = READOUT_HEADS,
    folds: int = CV_FOLDS,
    repeats: int = CV_REPEATS,
    seed: int = 0,
) -> HeadChoice:
    """Which head among ``kinds`` ranks held-out graphs best, per family and overall.

    Rows ``x``/``y`` belong to graphs ``groups`` [rows] (a graph's rows are its
    configurations); ``families`` maps a group to its family. The graphs are split into
    ``folds`` folds, ``repeats`` times over; ``fit(kind, x, y)`` is fitted on the others
    (every family together, as the predictor fits) and predicts the fold. A family's fold
    score is the SRCC between its held-out graphs' mean predictions and mean labels (≥ 3
    graphs). A family with at least ``3 * folds`` graphs gets its own choice; ``default`` is
    chosen on the mean over families. Each choice is the kind with the best mean fold SRCC.
    """
    x, y, groups = np.asarray(x), np.asarray(y, dtype=np.float64), np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2 * folds:
        return HeadChoice(default=kinds[0])
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(repeats):
        order = rng.permutation(ids)
        parts += [order[k::folds] for k in range(folds)]
    names = sorted({families[g] for g in ids})
    # kind -> family -> per-fold SRCC (NaN where the fold held < 3 of the family's graphs)
    per_fold = {k: {f: [] for f in names} for k in kinds}
    for held in parts:
        test = np.isin(groups, held)
        g_test, y_test = groups[test], y[test]
        mean_true = {g: float(y_test[g_test == g].mean()) for g in held}
        for kind in kinds:
            pred = fit(kind, x[~test], y[~test]).predict(x[test])
            mean_pred = {g: float(pred[g_test == g].mean()) for g in held}
            for family in names:
                gs = [g for g in held if families[g] == family]
                rho = float("nan")
                if len(gs) >= 3:
                    rho = _rank_corr(
                        "srcc",
                        np.array([mean_true[g] for g in gs]),
                        np.array([mean_pred[g] for g in gs]),
                    )
                per_fold[kind][family].append(rho)
    overall = {k: [_mean_scored(v) for v in zip(*per_fold[k].values())] for k in kinds}
    choice = HeadChoice(
        default=_pick(overall, kinds), scores={k: _mean_scored(v) for k, v in overall.items()}
    )
    count = {f: sum(families[g] == f for g in ids) for f in names}
    for family in names:
        if count[family] < 3 * folds:
            continue
        fam_folds = {k: per_fold[k][family] for k in kinds}
        choice.by_family[family] = _pick(fam_folds, kinds)
        choice.family_scores[family] = {k: _mean_scored(v) for k, v in fam_folds.items()}
    return choice


@dataclass
class TargetReadout:
    """One accuracy target's readout heads, which answers which graph, and their rows.

    ``heads`` maps each kind in use to a head fitted on every row; ``by_family`` names the
    kind per family (``default`` for the rest); ``rows_family`` indexes ``families`` per
    row. A graph is routed by :meth:`family_of` only when the families' kinds differ.
    """

    heads: dict[str, ReadoutHead]
    default: str
    rows_x: np.ndarray
    rows_y: np.ndarray
    rows_family: np.ndarray  # int64 [rows], into ``families``
    families: list[str]
    n_readout: int  # the leading columns of a row that are the block readout
    by_family: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    family_scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.rows_x.shape[1])

    @property
    def kinds(self) -> list[str]:
        """The kinds this target answers with (the default first)."""
        used = [self.default, *sorted(set(self.by_family.values()) - {self.default})]
        return [k for k in used if k in self.heads]

    @property
    def row_families(self) -> list[str]:
        """Each row's family."""
        return [self.families[int(i)] for i in self.rows_family]

    @property
    def max_feature_used(self) -> int:
        """The highest feature any head reads (past ``n_readout``: the configuration)."""
        return max(h.max_feature_used for h in self.heads.values())

    @cached_property
    def _block_scale(self) -> np.ndarray:
        """Each block-readout column's spread over the rows (1 where constant): computed once,
        not per prediction (the rows are never changed in place; a refit makes a new one)."""
        scale = self.rows_x[:, : self.n_readout].std(axis=0)
        scale[scale == 0] = 1.0
        return scale

    def family_of(self, readout: np.ndarray) -> str:
        """The family of the training row nearest to ``readout`` (the block readout alone,
        each column scaled by its spread over the rows)."""
        block = self.rows_x[:, : self.n_readout]
        dist = (((block - readout[: self.n_readout]) / self._block_scale) ** 2).sum(axis=1)
        return self.families[int(self.rows_family[int(np.argmin(dist))])]

    def head_for(self, readout: np.ndarray) -> tuple[str, ReadoutHead]:
        """The kind and head that answer a graph with this block readout."""
        kind = self.default
        if len(self.kinds) > 1:
            kind = self.by_family.get(self.family_of(readout), self.default)
        return kind, self.heads[kind]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Each row's prediction by the head its graph is routed to."""
        x = np.asarray(x, dtype=np.float64)
        if len(self.kinds) == 1:
            return self.heads[self.default].predict(x)
        out = np.empty(len(x))
        for i, row in enumerate(x):
            out[i] = self.head_for(row)[1].predict(row[None])[0]
        return out

    # -- persistence ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.default,
            "n_features": self.n_features,
            "by_family": self.by_family,
            "families": self.families,
            "scores": self.scores,
            "family_scores": self.family_scores,
        }

    def to_tensors(self, target: str) -> dict[str, torch.Tensor]:
        """Every head's arrays, and the rows under the default head's prefix."""
        state: dict[str, torch.Tensor] = {}
        for kind, head in self.heads.items():
            state.update(head.to_tensors(head_prefix(kind, target)))
        prefix = head_prefix(self.default, target)
        for name in ("rows_x", "rows_y", "rows_family"):
            state[prefix + name] = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
        return state

    @classmethod
    def from_saved(
        cls,
        entry: Mapping[str, Any],
        state: Mapping[str, torch.Tensor],
        target: str,
        n_readout: int,
    ) -> TargetReadout:
        """Inverse of :meth:`to_json` + :meth:`to_tensors` (files from before the ridge
        head: no ``by_family``, no ``rows_family``, one family ``""``)."""
        default, n = entry["kind"], int(entry["n_features"])
        by_family = {str(f): str(k) for f, k in (entry.get("by_family") or {}).items()}
        families = [str(f) for f in (entry.get("families") or [""])]
        for kind in {default, *by_family.values()}:
            if kind not in READOUT_HEADS:
                raise ReadoutHeadError(f"unknown kind {kind!r}")
        heads = {k: head_from_tensors(k, state, target, n) for k in {default, *by_family.values()}}
        prefix = head_prefix(default, target)
        try:
            x = state[prefix + "rows_x"].numpy().astype(np.float64)
            y = state[prefix + "rows_y"].numpy().astype(np.float64)
        except KeyError as exc:
            raise ReadoutHeadError(f"array {exc.args[0]} missing") from None
        fam = state.get(prefix + "rows_family")
        rows_family = np.zeros(len(y), np.int64) if fam is None else fam.numpy().astype(np.int64)
        if x.ndim != 2 or x.shape != (len(y), n) or rows_family.shape != (len(y),):
            raise ReadoutHeadError(f"rows of the wrong shape {x.shape}")
        if len(y) and (rows_family.min() < 0 or rows_family.max() >= len(families)):
            raise ReadoutHeadError("row family index out of range")
        return cls(
            heads=heads,
            default=default,
            rows_x=x,
            rows_y=y,
            rows_family=rows_family,
            families=families,
            n_readout=n_readout,
            by_family=by_family,
            scores={str(k): float(v) for k, v in (entry.get("scores") or {}).items()},
            family_scores={
                str(f): {str(k): float(v) for k, v in sc.items()}
                for f, sc in (entry.get("family_scores") or {}).items()
            },
        )


def fit_target_readout(
    setting: str,
    x: np.ndarray,
    y: np.ndarray,
    row_families: Sequence[str],
    fit: ReadoutFit,
    *,
    n_readout: int,
    cv_fit: ReadoutFit | None = None,
    seed: int = 0,
) -> TargetReadout:
    """Fit one target's readout on rows ``x``/``y`` whose families are ``row_families``.

    ``setting``: ``forest`` or ``ridge`` (one head), or ``auto`` (:func:`choose_heads`,
    with ``cv_fit`` for the folds, a cheaper fit). Rows with the same block readout (the
    first ``n_readout`` columns) are one graph's configurations: one group in the folds.
    """
    x = np.asarray(x, dtype=np.float64)
    names = sorted(set(row_families))
    rows_family = np.array([names.index(f) for f in row_families], dtype=np.int64)
    if setting == "auto":
        _, groups = np.unique(x[:, :n_readout], axis=0, return_inverse=True)
        groups = groups.reshape(-1)
        group_family = {int(g): names[int(f)] for g, f in zip(groups, rows_family)}
        choice = choose_heads(x, y, groups, group_family, cv_fit or fit, seed=seed)
    elif setting in READOUT_HEADS:
        choice = HeadChoice(default=setting)
    else:
        raise ReadoutHeadError(f"unknown readout head {setting!r}; choose {', '.join(ACC_HEADS)}")
    kinds = {choice.default, *choice.by_family.values()}
    return TargetReadout(
        heads={k: fit(k, x, y) for k in sorted(kinds)},
        default=choice.default,
        rows_x=x,
        rows_y=np.asarray(y, dtype=np.float64),
        rows_family=rows_family,
        families=names,
        n_readout=n_readout,
        by_family=choice.by_family,
        scores=choice.scores,
        family_scores=choice.family_scores,
    )


__all__ = [
    "ACC_HEADS",
    "READOUT_HEADS",
    "HeadChoice",
    "ReadoutHead",
    "ReadoutHeadError",
    "TargetReadout",
    "choose_heads",
    "fit_head",
    "fit_target_readout",
    "head_from_tensors",
    "head_prefix",
]
