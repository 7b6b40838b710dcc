"""Unsupervised drift detection on the incoming batches: re-plan without being told.

A device does not know when its input domain changes; the stream's domain
boundaries are the benchmark's knowledge, not the device's. :class:`DriftDetector`
watches the statistics a first normalisation layer would see, computed on the raw
batch before it trains (no extra forward pass, microseconds per batch):

* per-channel mean and standard deviation of each image (brightness, contrast:
  fog, brightness, contrast corruptions move them);
* mean absolute horizontal and vertical differences and the mean absolute
  Laplacian (high-frequency energy: noise raises it, blur lowers it, pixelation
  and JPEG change the balance between first and second differences).

The features are per image and independent of the weights, so adaptation itself
(the weights moving) cannot raise a false alarm, unlike the model's prediction
entropy, which falls as the model adapts within a domain.

The test is a two-window one. After every (re-)plan the detector gathers a
reference of ``reference_batches`` batches; from then on each new batch's mean
feature vector is compared with the reference: the shift of each feature in units
of the reference's per-image standard deviation (a standardised mean difference,
Cohen's d). Drift is declared when the largest shift stays above ``threshold``
for ``patience`` consecutive batches. A batch mean of 32 images has a standard
deviation of about 0.18 per-image standard deviations, so the default threshold
of 1.0 lies more than five of those away: chance alone practically never crosses
it twice in a row, while a new corruption or severity usually moves several
features by 2–20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class DriftError(ValueError):
    """Bad drift-detector settings."""


FEATURES: tuple[str, ...] = ("mean", "std", "dx", "dy", "laplacian")


def image_features(images: np.ndarray) -> np.ndarray:
    """Per-image statistics of a batch ``(B, C, H, W)`` → ``(B, C × 5)``.

    Mean and standard deviation per channel, and per channel the mean absolute
    horizontal difference, vertical difference and 4-neighbour Laplacian
    (log1p-scaled: energies span orders of magnitude between blur and noise).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise DriftError(f"expected images as (batch, channels, height, width), got {x.shape}")
    b, c = x.shape[:2]
    mean = x.mean(axis=(2, 3))
    std = x.std(axis=(2, 3))
    if x.shape[2] > 2 and x.shape[3] > 2:
        dx = np.abs(np.diff(x, axis=3)).mean(axis=(2, 3))
        dy = np.abs(np.diff(x, axis=2)).mean(axis=(2, 3))
        lap = np.abs(
            4 * x[:, :, 1:-1, 1:-1]
            - x[:, :, :-2, 1:-1]
            - x[:, :, 2:, 1:-1]
            - x[:, :, 1:-1, :-2]
            - x[:, :, 1:-1, 2:]
        ).mean(axis=(2, 3))
    else:  # too small for differences: only the first two statistics carry information
        dx = dy = lap = np.zeros((b, c), np.float32)
    energies = np.log1p(100.0 * np.stack([dx, dy, lap], axis=2))  # (B, C, 3)
    feats = np.concatenate([mean[:, :, None], std[:, :, None], energies], axis=2)
    return feats.reshape(b, c * len(FEATURES))


@dataclass
class DriftEvent:
    """A detected drift: where, how large, and which feature moved most."""

    step: int
    score: float
    feature: str

    def describe(self) -> str:
        return f"drift detected at step {self.step} ({self.feature} moved {self.score:.1f} SD)"


@dataclass
class DriftDetector:
    """Two-window drift test on per-image input statistics (see the module docstring)."""

    threshold: float = 1.0
    patience: int = 2
    reference_batches: int = 2
    channels: int | None = None
    _ref: list[np.ndarray] = field(default_factory=list, repr=False)
    _mu: np.ndarray | None = field(default=None, repr=False)
    _sd: np.ndarray | None = field(default=None, repr=False)
    _above: int = 0
    last_score: float = 0.0
    events: list[DriftEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold)):
            raise DriftError(f"drift threshold must be a number, got {self.threshold!r}")
        if self.threshold <= 0:
            raise DriftError(f"drift threshold must be positive, got {self.threshold!r}")
        for key in ("patience", "reference_batches"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DriftError(f"drift {key} must be a positive integer, got {value!r}")

    def reset(self) -> None:
        """Start a new reference (after a re-plan: the new domain is the new normal)."""
        self._ref, self._mu, self._sd, self._above = [], None, None, 0
        self.last_score = 0.0

    @property
    def ready(self) -> bool:
        """Whether the reference is complete (drift can be tested)."""
        return self._mu is not None

    def _name(self, index: int) -> str:
        c = index // len(FEATURES)
        return f"{FEATURES[index % len(FEATURES)]}[c{c}]"

    def update(self, images: np.ndarray, step: int = -1) -> DriftEvent | None:
        """Feed one batch; returns a :class:`DriftEvent` when drift is declared (then resets)."""
        feats = image_features(images)
        if self._mu is None:
            self._ref.append(feats)
            if len(self._ref) >= self.reference_batches:
                ref = np.concatenate(self._ref)
                self._mu = ref.mean(axis=0)
                # a floor keeps a constant feature (a blank channel) from dividing by zero
                self._sd = np.maximum(ref.std(axis=0), 1e-3 * (np.abs(self._mu) + 1e-3))
            return None
        assert self._sd is not None
        shift = np.abs(feats.mean(axis=0) - self._mu) / self._sd
        k = int(np.argmax(shift))
        self.last_score = float(shift[k])
        self._above = self._above + 1 if self.last_score > self.threshold else 0
        if self._above < self.patience:
            return None
        event = DriftEvent(step=step, score=round(self.last_score, 3), feature=self._name(k))
        self.events.append(event)
        self.reset()
        return event
