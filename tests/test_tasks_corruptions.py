"""CIFAR-10-C-style corruptions: all 15 × 5, shapes, range, determinism, monotone severity."""

from __future__ import annotations

import numpy as np
import pytest

from aiop.tasks.corruptions import CORRUPTIONS, GROUPS, CorruptionError, corrupt
from aiop.tasks.digits import load_digits_split
from aiop.tasks.streams import _resize


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return _resize(load_digits_split("mnist", "test").images[:12], 32)


def test_the_fifteen_names() -> None:
    assert len(CORRUPTIONS) == 15
    assert sorted(c for g in GROUPS.values() for c in g) == sorted(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_and_severity(digits: np.ndarray, name: str) -> None:
    diffs = []
    for severity in range(1, 6):
        out = corrupt(digits, name, severity, seed=3)
        assert out.shape == digits.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 and np.isfinite(out).all()
        assert np.array_equal(out, corrupt(digits, name, severity, seed=3))  # deterministic
        diffs.append(float(np.abs(out - digits).mean()))
    assert min(diffs) > 0, f"{name} changes nothing"
    if name != "elastic_transform":  # CIFAR-10-C's elastic constants are not monotone
        assert diffs[4] > diffs[0], f"{name}: severity 5 is not stronger than 1: {diffs}"


def test_seed_changes_random_corruptions(digits: np.ndarray) -> None:
    a = corrupt(digits, "gaussian_noise", 3, seed=0)
    b = corrupt(digits, "gaussian_noise", 3, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(corrupt(digits, "contrast", 3, 0), corrupt(digits, "contrast", 3, 1))


def test_channel_first_rgb(digits: np.ndarray) -> None:
    rgb = np.repeat(digits[:4, None], 3, axis=1)
    for name in ("brightness", "jpeg_compression", "snow", "pixelate", "frost"):
        out = corrupt(rgb, name, 4, seed=0)
        assert out.shape == rgb.shape
    odd = np.repeat(digits[:2, None], 2, axis=1)  # two channels: grey images per channel
    assert corrupt(odd, "jpeg_compression", 2).shape == odd.shape


@pytest.mark.parametrize(
    ("images", "name", "severity", "match"),
    [
        (np.zeros((2, 8, 8), np.float32), "rain", 1, "unknown corruption"),
        (np.zeros((2, 8, 8), np.float32), "fog", 0, "severity"),
        (np.zeros((2, 8, 8), np.float32), "fog", 6, "severity"),
        (np.zeros((2, 8, 8), np.float32), "fog", 2.5, "severity"),
        (np.zeros((8, 8), np.float32), "fog", 1, "shape"),
        (np.zeros((2, 8, 8), np.uint8), "fog", 1, "floats"),
        (np.full((2, 8, 8), np.nan, np.float32), "fog", 1, "NaN"),
    ],
)
def test_bad_input(images: np.ndarray, name: str, severity: int, match: str) -> None:
    with pytest.raises(CorruptionError, match=match):
        corrupt(images, name, severity)
