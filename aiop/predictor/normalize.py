"""Invertible target normalisers (AIO-P's ``-tar_norm``), JSON-serialisable.

* ``stand``: ``(y − μ) / σ``.
* ``stand_flops``: AIO-P's ``y / (log10(GFLOPs + 1) + 1)``, then standardised;
  it needs each sample's forward FLOPs.
* ``log``: ``log(y)``, then standardised — for memory and latency, which span
  orders of magnitude.
* ``none``: identity.

μ and σ are fitted on training targets only; the held-out set is never used to
fit them (AIO-P's dev targets were not normalised like training targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

NORMALIZERS = ("stand", "stand_flops", "log", "none")


class NormalizerError(ValueError):
    """A normaliser was misused (unknown kind, not fitted, bad values)."""


def _flops_divisor(flops: np.ndarray) -> np.ndarray:
    return np.log10(np.asarray(flops, dtype=np.float64) / 1e9 + 1.0) + 1.0


@dataclass
class Normalizer:
    """``transform``/``inverse`` between targets and the network's output scale."""

    kind: str = "stand"
    mean: float = 0.0
    std: float = 1.0
    fitted: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZERS:
            raise NormalizerError(f"unknown normaliser {self.kind!r}; choose one of {NORMALIZERS}")

    def _pre(self, y: np.ndarray, flops: np.ndarray | None) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "log":
            if np.any(y <= 0):
                raise NormalizerError("the log normaliser needs positive targets")
            return np.log(y)
        if self.kind == "stand_flops":
            if flops is None:
                raise NormalizerError("stand_flops needs the forward FLOPs of every sample")
            return y / _flops_divisor(flops)
        return y

    def fit(self, y: np.ndarray, flops: np.ndarray | None = None) -> Normalizer:
        if self.kind == "none":
            self.mean, self.std = 0.0, 1.0
        else:
            z = self._pre(y, flops)
            if z.size == 0:
                raise NormalizerError("cannot fit a normaliser on no targets")
            self.mean = float(z.mean())
            std = float(z.std())
            self.std = std if std > 1e-12 and math.isfinite(std) else 1.0
        self.fitted = True
        return self

    def transform(self, y: np.ndarray, flops: np.ndarray | None = None) -> np.ndarray:
        if not self.fitted:
            raise NormalizerError("normaliser used before fit()")
        return (self._pre(y, flops) - self.mean) / self.std

    def inverse(self, z: np.ndarray, flops: np.ndarray | None = None) -> np.ndarray:
        if not self.fitted:
            raise NormalizerError("normaliser used before fit()")
        v = np.asarray(z, dtype=np.float64) * self.std + self.mean
        if self.kind == "log":
            return np.exp(v)
        if self.kind == "stand_flops":
            if flops is None:
                raise NormalizerError("stand_flops needs the forward FLOPs of every sample")
            return v * _flops_divisor(flops)
        return v

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(str(d["kind"]), float(d["mean"]), float(d["std"]), bool(d.get("fitted", True)))
