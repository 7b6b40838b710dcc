"""``TreeEnsemble``: a regression forest stored as flat arrays, evaluated with numpy.

scikit-learn fits it (extremely randomised trees by default); the fitted trees are
copied out of ``tree_`` into five arrays over all nodes of all trees, so a
predictor file holds them as safetensors tensors — no pickle, no scikit-learn
needed to predict. :meth:`TreeEnsemble.predict` walks every tree for every row at
once, one level per step, and returns what scikit-learn's ``predict`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

FOREST_KINDS = ("extra", "random")
# Breiman's random forest: over four test splits of seven task/family sets (joint, 150
# labelled; benchmarks/results/acc_predictor_v5_forest/readout_regressors_joint_*.md) it ranks
# held-out architectures at 0.760 on average against the extremely randomised trees' 0.740,
# +0.10 on semantic labels, and is never more than 0.03 behind
DEFAULT_FOREST_KIND = "random"
LEAF = -1


class ForestError(ValueError):
    """A forest cannot be fitted or restored as asked."""


@dataclass
class TreeEnsemble:
    """The nodes of every tree, concatenated; ``roots`` indexes each tree's first node.

    ``left``/``right`` are global node indices (``-1`` at a leaf); a row goes left
    where ``x[feature] <= threshold``; the prediction is the mean of the leaves' ``value``.
    """

    left: np.ndarray  # int64 [nodes]
    right: np.ndarray  # int64 [nodes]
    feature: np.ndarray  # int64 [nodes]
    threshold: np.ndarray  # float64 [nodes]
    value: np.ndarray  # float64 [nodes]
    roots: np.ndarray  # int64 [trees]
    n_features: int

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        *,
        kind: str = DEFAULT_FOREST_KIND,
        trees: int = 200,
        min_samples_leaf: int = 3,
        seed: int = 0,
    ) -> TreeEnsemble:
        """Fit ``trees`` regression trees of ``kind`` (``extra``: ExtraTrees, ``random``:
        RandomForest) on ``x`` [rows, features] → ``y`` [rows]."""
        if kind not in FOREST_KINDS:
            raise ForestError(f"unknown forest kind {kind!r}; choose {', '.join(FOREST_KINDS)}")
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
            raise ForestError(f"a forest needs ≥ 2 rows of features and labels, got {x.shape}")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ForestError("a forest's features and labels must be finite")
        try:
            from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor
        except ImportError:
            raise ForestError(
                "fitting a forest needs scikit-learn: pip install 'aiop[tasks]'"
            ) from None
        maker = ExtraTreesRegressor if kind == "extra" else RandomForestRegressor
        model = maker(
            n_estimators=trees, min_samples_leaf=min_samples_leaf, random_state=seed, n_jobs=1
        )
        model.fit(x, y)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("l", "r", "f", "t", "v")}
        roots, offset = [], 0
        for est in model.estimators_:
            t = est.tree_
            roots.append(offset)
            leaf = t.children_left == LEAF
            parts["l"].append(np.where(leaf, LEAF, t.children_left + offset))
            parts["r"].append(np.where(leaf, LEAF, t.children_right + offset))
            parts["f"].append(np.where(leaf, 0, t.feature))
            parts["t"].append(t.threshold)
            parts["v"].append(t.value[:, 0, 0])
            offset += t.node_count
        return cls(
            left=np.concatenate(parts["l"]).astype(np.int64),
            right=np.concatenate(parts["r"]).astype(np.int64),
            feature=np.concatenate(parts["f"]).astype(np.int64),
            threshold=np.concatenate(parts["t"]).astype(np.float64),
            value=np.concatenate(parts["v"]).astype(np.float64),
            roots=np.asarray(roots, dtype=np.int64),
            n_features=int(x.shape[1]),
        )

    @property
    def trees(self) -> int:
        return len(self.roots)

    @property
    def max_feature_used(self) -> int:
        """The highest feature index any split reads (-1: every tree is one leaf)."""
        used = self.feature[self.left != LEAF]
        return int(used.max()) if used.size else -1

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The forest's prediction for each row of ``x`` [rows, n_features]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ForestError(
                f"the forest reads {self.n_features} features per row, got shape {x.shape}"
            )
        # scikit-learn compares float32 features with float64 thresholds
        x = x.astype(np.float32).astype(np.float64)
        rows = np.arange(x.shape[0])[:, None]
        node = np.broadcast_to(self.roots, (x.shape[0], self.trees)).copy()
        while True:
            inner = self.left[node] != LEAF
            if not inner.any():
                break
            go_left = x[rows, self.feature[node]] <= self.threshold[node]
            step = np.where(go_left, self.left[node], self.right[node])
            node = np.where(inner, step, node)
        return self.value[node].mean(axis=1)

    # -- persistence ------------------------------------------------------------
    _ARRAYS = ("left", "right", "feature", "threshold", "value", "roots")

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The arrays as tensors named ``prefix + name`` (``n_features`` goes in the JSON)."""
        return {
            prefix + k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
            for k in self._ARRAYS
        }

    @classmethod
    def from_tensors(
        cls, state: Mapping[str, torch.Tensor], prefix: str, n_features: int
    ) -> TreeEnsemble:
        """Inverse of :meth:`to_tensors`, checking that the arrays form valid trees."""
        try:
            arrays = {k: state[prefix + k].numpy() for k in cls._ARRAYS}
        except KeyError as exc:
            raise ForestError(f"forest array {exc.args[0]} missing") from None
        forest = cls(
            **{
                k: v.astype(np.float64 if k in ("threshold", "value") else np.int64)
                for k, v in arrays.items()
            },
            n_features=int(n_features),
        )
        forest.check()
        return forest

    def check(self) -> None:
        """Raise :class:`ForestError` unless every index stays inside the arrays."""
        n = len(self.left)
        if not (
            len(self.right) == len(self.feature) == len(self.threshold) == len(self.value) == n
        ):
            raise ForestError("forest arrays differ in length")
        inner = self.left != LEAF
        children = np.concatenate([self.left[inner], self.right[inner], self.roots])
        if n == 0 or self.trees == 0 or (children < 0).any() or (children >= n).any():
            raise ForestError("forest node index out of range")
        if (self.right[~inner] != LEAF).any():
            raise ForestError("forest leaf with a right child")
        if ((self.feature[inner] < 0) | (self.feature[inner] >= self.n_features)).any():
            raise ForestError("forest feature index out of range")
        # children come after their parent (scikit-learn's depth-first layout), so a walk ends
        parents = np.flatnonzero(inner)
        if (self.left[inner] <= parents).any() or (self.right[inner] <= parents).any():
            raise ForestError("forest child before its parent (a cycle)")


__all__ = ["FOREST_KINDS", "ForestError", "TreeEnsemble"]
