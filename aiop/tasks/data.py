"""Task data sets: one entry point, :func:`build_dataset`, for every task of issue 6.

Items are ``(image, target)`` with ``image`` float32 ``[3, R, R]`` in [0, 1]:

* ``classification``: real digits (``source`` ``"mnist"`` or ``"sklearn"``)
  resized to R, grey replicated to three channels; target an int64 scalar.
* ``detection`` / ``instance`` / ``semantic`` / ``panoptic``: the same scenes of
  real MNIST digits (:mod:`aiop.tasks.scenes`); target a dict with ``boxes``
  float32 ``[K, 4]`` xyxy pixels, ``labels`` int64 ``[K]``, ``masks`` uint8
  ``[K, R, R]``, ``semantic`` int64 ``[R, R]`` (0 background, ``c + 1`` digit
  ``c``) and ``image_id``.
* ``pose``: stick figures with LSP's 14 keypoints (:mod:`aiop.tasks.pose`);
  target a dict with ``keypoints`` float32 ``[14, 2]`` (x, y), ``visible`` bool
  ``[14]`` and ``bbox`` float32 ``[4]`` xyxy.

Data sets are generated once per ``(task, split, resolution, n, seed, source)``
and kept in memory; every item is rebuilt as fresh tensors, so callers may
modify what they get.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from aiop.tasks.digits import SOURCES, SPLITS, DataError, load_digits_split
from aiop.tasks.pose import LSP_KEYPOINTS, NUM_KEYPOINTS, PoseConfig, PoseSet, generate_figures
from aiop.tasks.scenes import SceneConfig, SceneSet, generate_scenes

__all__ = [
    "LSP_KEYPOINTS",
    "NUM_CLASSES",
    "NUM_KEYPOINTS",
    "SCENE_TASKS",
    "TASKS",
    "ClassificationDataset",
    "PoseDataset",
    "SceneDataset",
    "build_dataset",
    "check_task",
    "collate_fn",
]

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("classification", "detection", "instance", "semantic", "panoptic", "pose")
SCENE_TASKS: tuple[str, ...] = ("detection", "instance", "semantic", "panoptic")
NUM_CLASSES = 10


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else a :class:`DataError` naming them."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


class ClassificationDataset(Dataset):
    """Real digits resized to ``R × R``; items ``(float32 [3, R, R], int64 scalar)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images  # float32 (N, 1, R, R)
        self.labels = labels  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].repeat(3, 1, 1), self.labels[i].clone()


class SceneDataset(Dataset):
    """Multi-digit scenes; the four scene tasks read the same targets."""

    def __init__(self, scenes: SceneSet, task: str) -> None:
        self.scenes = scenes
        self.task = task

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"scene index {i} out of range for {len(self)} scenes")
        i = i % len(self)
        s = self.scenes
        grey = torch.from_numpy(s.images[i].astype(np.float32) / np.float32(255.0))
        target = {
            "boxes": torch.from_numpy(s.boxes(i)),
            "labels": torch.from_numpy(s.labels[i].copy()),
            "masks": torch.from_numpy(s.masks(i)),
            "semantic": torch.from_numpy(s.semantic(i)),
            "image_id": i,
        }
        return grey.expand(3, -1, -1).clone(), target


class PoseDataset(Dataset):
    """Stick figures with LSP keypoints; items ``(float32 [3, R, R], dict)``."""

    def __init__(self, figures: PoseSet) -> None:
        self.figures = figures

    def __len__(self) -> int:
        return len(self.figures)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"figure index {i} out of range for {len(self)} figures")
        i = i % len(self)
        f = self.figures
        image = torch.from_numpy(f.images[i].astype(np.float32) / np.float32(255.0))
        target = {
            "keypoints": torch.from_numpy(f.keypoints[i].copy()),
            "visible": torch.from_numpy(f.visible[i].copy()),
            "bbox": torch.from_numpy(f.bboxes[i].copy()),
            "image_id": i,
        }
        return image, target


def _check_args(task: str, split: str, resolution: int, n: int | None, source: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise DataError(f"unknown digit source {source!r}; choose one of {', '.join(SOURCES)}")
    # Scenes and figures need room for several objects; digits alone do not.
    least = 8 if task == "classification" else 16
    if not isinstance(resolution, int) or resolution < least:
        raise DataError(
            f"resolution for {task} must be an integer of at least {least} pixels, "
            f"got {resolution!r}"
        )
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive integer or None, got {n!r}")


@lru_cache(maxsize=32)
def _classification(
    split: str, resolution: int, n: int | None, seed: int, source: str
) -> ClassificationDataset:
    digits = load_digits_split(source, split, seed)
    images, labels = digits.images, digits.labels
    if n is not None:
        if n > len(labels):
            raise DataError(f"n={n} exceeds the {len(labels)} {source} digits of the {split} split")
        # The split is ordered by class; a seeded permutation keeps subsets balanced.
        pick = np.sort(np.random.default_rng((seed, 7)).permutation(len(labels))[:n])
        images, labels = images[pick], labels[pick]
    x = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    # antialias matters only when shrinking (e.g. MNIST 28 → 16).
    x = F.interpolate(
        x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    ).clamp_(0.0, 1.0)
    return ClassificationDataset(x, torch.from_numpy(labels.copy()))


@lru_cache(maxsize=32)
def _scenes(split: str, resolution: int, n: int | None, seed: int, source: str) -> SceneSet:
    return generate_scenes(
        split, n, seed=seed, source=source, config=SceneConfig(resolution=resolution)
    )


@lru_cache(maxsize=32)
def _figures(split: str, resolution: int, n: int | None, seed: int) -> PoseSet:
    return generate_figures(split, n, seed=seed, config=PoseConfig(resolution=resolution))


def build_dataset(
    task: str,
    split: str = "train",
    *,
    resolution: int = 64,
    n: int | None = None,
    seed: int = 0,
    source: str = "mnist",
) -> Dataset:
    """The data set of ``task`` for ``split`` (see the module docstring).

    ``n`` caps the number of items (classification: a seeded, class-balanced
    subset of the split; scenes and figures: how many to generate, default half
    the split's digits for scenes and 2,000 / 300 / 600 figures). ``source``
    picks the digits for classification and scenes; pose ignores it.
    """
    check_task(task)
    _check_args(task, split, resolution, n, source)
    if task == "classification":
        return _classification(split, resolution, n, seed, source)
    if task == "pose":
        return PoseDataset(_figures(split, resolution, n, seed))
    return SceneDataset(_scenes(split, resolution, n, seed, source), task)


def _collate_classification(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(labels)


def _collate_dicts(batch: list) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def collate_fn(task: str) -> Callable[[list], tuple[torch.Tensor, Any]]:
    """A DataLoader ``collate_fn`` for ``task``: images stacked to ``[B, 3, R, R]``;
    labels stacked for classification, a list of target dicts otherwise.

    The functions are module-level, so loaders with worker processes can pickle them.
    """
    check_task(task)
    if task == "classification":
        return partial(_collate_classification)
    return partial(_collate_dicts)
