"""``RidgeReadout``: a standardised ridge regression stored as flat arrays, evaluated with numpy.

scikit-learn fits it (``StandardScaler`` then ``RidgeCV``, its penalty chosen among
:data:`RIDGE_ALPHAS` by efficient leave-one-out); the scaler's mean and scale, the
coefficients and the intercept are copied out, so a predictor file holds them as
safetensors tensors beside (or instead of) a :class:`~aiop.predictor.forest.TreeEnsemble`
— no pickle, no scikit-learn needed to predict. It is the accuracy head where labels
follow the block readout nearly linearly: on ofa_resnet semantic segmentation with 350
labelled architectures it ranks held-out ones at 0.816 against the random forest's 0.740
(benchmarks/results/acc_predictor_v5_forest/README.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

# the grid benchmarks/acc_readout_regressors.py measured ridge with
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 25))


class RidgeError(ValueError):
    """A ridge readout cannot be fitted or restored as asked."""


@dataclass
class RidgeReadout:
    """``predict(x) = ((x - mean) / scale) @ coef + intercept``.

    ``scale`` is 1 where a feature is constant on the training rows (scikit-learn's
    ``StandardScaler`` does the same), so such a feature's coefficient is 0.
    """

    mean: np.ndarray  # float64 [features]
    scale: np.ndarray  # float64 [features]
    coef: np.ndarray  # float64 [features]
    intercept: float
    alpha: float
    n_features: int

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, *, alphas: tuple[float, ...] = RIDGE_ALPHAS
    ) -> RidgeReadout:
        """Standardise ``x`` [rows, features], fit a ridge to ``y`` [rows] with the
        leave-one-out best of ``alphas``."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
            raise RidgeError(
                f"a ridge readout needs ≥ 2 rows of features and labels, not {x.shape}"
            )
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise RidgeError("a ridge readout's features and labels must be finite")
        if not alphas or min(alphas) <= 0:
            raise RidgeError(f"ridge penalties must be positive, got {alphas}")
        try:
            from sklearn.linear_model import RidgeCV
            from sklearn.preprocessing import StandardScaler
        except ImportError:
            raise RidgeError(
                "fitting a ridge readout needs scikit-learn: pip install 'aiop[tasks]'"
            ) from None
        scaler = StandardScaler().fit(x)
        model = RidgeCV(alphas=np.asarray(alphas)).fit(scaler.transform(x), y)
        return cls(
            mean=scaler.mean_.astype(np.float64),
            scale=scaler.scale_.astype(np.float64),
            coef=np.asarray(model.coef_, dtype=np.float64),
            intercept=float(model.intercept_),
            alpha=float(model.alpha_),
            n_features=int(x.shape[1]),
        )

    @property
    def max_feature_used(self) -> int:
        """The highest feature index with a non-zero coefficient (-1: a constant)."""
        used = np.flatnonzero(self.coef)
        return int(used.max()) if used.size else -1

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The prediction for each row of ``x`` [rows, n_features]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise RidgeError(
                f"the ridge readout reads {self.n_features} features per row, got shape {x.shape}"
            )
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    # -- persistence ------------------------------------------------------------
    _ARRAYS = ("mean", "scale", "coef")

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The arrays as tensors named ``prefix + name``; intercept and alpha as a [2] tensor
        (``n_features`` goes in the JSON)."""
        state = {prefix + k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                 for k in self._ARRAYS}  # fmt: skip
        state[prefix + "intercept_alpha"] = torch.tensor(
            [self.intercept, self.alpha], dtype=torch.float64
        )
        return state

    @classmethod
    def from_tensors(
        cls, state: Mapping[str, torch.Tensor], prefix: str, n_features: int
    ) -> RidgeReadout:
        """Inverse of :meth:`to_tensors`, checking shapes and values."""
        try:
            arrays = {k: state[prefix + k].numpy().astype(np.float64) for k in cls._ARRAYS}
            extra = state[prefix + "intercept_alpha"].numpy().astype(np.float64)
        except KeyError as exc:
            raise RidgeError(f"ridge array {exc.args[0]} missing") from None
        if extra.shape != (2,):
            raise RidgeError(f"ridge intercept/alpha of shape {extra.shape}, expected (2,)")
        ridge = cls(**arrays, intercept=float(extra[0]), alpha=float(extra[1]),
                    n_features=int(n_features))  # fmt: skip
        ridge.check()
        return ridge

    def check(self) -> None:
        """Raise :class:`RidgeError` unless the arrays fit ``n_features`` and are usable."""
        for k in self._ARRAYS:
            if getattr(self, k).shape != (self.n_features,):
                raise RidgeError(
                    f"ridge {k} of shape {getattr(self, k).shape}, expected ({self.n_features},)"
                )
        values = np.concatenate([self.mean, self.scale, self.coef, [self.intercept]])
        if not np.isfinite(values).all() or (self.scale <= 0).any():
            raise RidgeError("ridge arrays hold non-finite values or a non-positive scale")


__all__ = ["RIDGE_ALPHAS", "RidgeError", "RidgeReadout"]
