"""Multi-digit scenes composed from real MNIST digits, for detection and segmentation.

Each scene pastes a few real digits of one split onto a black canvas at random
scale and position. A digit's ink mask comes from thresholding the (resized)
real digit, so boxes and masks describe the strokes a network actually sees.
Placement is rejected when a new digit's ink would cover more than
``max_overlap`` of an earlier digit's ink (or the other way round), which keeps
every instance mostly visible while still allowing touching and crossing digits.

Digits pasted later lie on top: the instance map assigns a pixel to the last
digit whose ink covers it, so instance masks never overlap (as COCO panoptic
requires) and the semantic map follows from it.

Each scene draws from its own generator seeded by ``(seed, split, index)``:
scene ``i`` is the same whatever the number of scenes asked for, on every
machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from aiop.tasks.digits import SPLITS, DataError, load_digits_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed; sizes are fractions of the canvas side."""

    resolution: int = 64
    min_digits: int = 1
    max_digits: int = 4
    # Digit height as a fraction of the canvas side.
    min_scale: float = 0.25
    max_scale: float = 0.55
    # Largest share of one digit's ink that another digit may cover.
    max_overlap: float = 0.15
    # Ink threshold on the resized digit (values in [0, 1]).
    ink_threshold: float = 0.35
    # Placement attempts per digit before it is left out of the scene.
    max_tries: int = 20

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise DataError(f"scene resolution must be at least 16 pixels, got {self.resolution}")
        # Instance ids live in a uint8 map.
        if not 1 <= self.min_digits <= self.max_digits <= 255:
            raise DataError(
                f"need 1 <= min_digits <= max_digits <= 255, got {self.min_digits}, "
                f"{self.max_digits}"
            )
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise DataError(
                f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}"
            )
        if not 0.0 <= self.max_overlap < 1.0:
            raise DataError(f"max_overlap must be in [0, 1), got {self.max_overlap}")


@dataclass(frozen=True)
class SceneSet:
    """``n`` scenes: grey images, instance maps and the digit label of each instance.

    ``images`` is uint8 ``(n, R, R)`` (value / 255 gives [0, 1]); ``instances`` is
    uint8 ``(n, R, R)`` with 0 for background and ``k + 1`` for instance ``k`` of
    that scene; ``labels[i]`` holds the digit class of each instance of scene ``i``
    and ``ink_areas[i]`` each instance's ink area before later digits covered any
    of it (visible area / ink area is the instance's unoccluded share).
    """

    config: SceneConfig
    split: str
    seed: int
    images: np.ndarray
    instances: np.ndarray
    labels: list[np.ndarray] = field(repr=False)
    ink_areas: list[np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def masks(self, i: int) -> np.ndarray:
        """Instance masks of scene ``i``: uint8 ``(K, R, R)``."""
        k = len(self.labels[i])
        ids = np.arange(1, k + 1, dtype=np.uint8)[:, None, None]
        return (self.instances[i][None] == ids).astype(np.uint8)

    def boxes(self, i: int) -> np.ndarray:
        """Tight xyxy boxes of the instance masks of scene ``i`` (x2, y2 exclusive)."""
        return masks_to_boxes(self.masks(i))

    def semantic(self, i: int) -> np.ndarray:
        """Class map of scene ``i``: int64 ``(R, R)``, 0 background, ``c + 1`` digit ``c``."""
        lut = np.concatenate([[0], self.labels[i] + 1]).astype(np.int64)
        return lut[self.instances[i]]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes, float32 ``(K, 4)``, of binary masks ``(K, H, W)``.

    ``x2``/``y2`` are exclusive pixel edges, so ``(x2 - x1) * (y2 - y1)`` covers
    the mask's pixels, as COCO's ``[x, y, w, h]`` boxes do.
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        if len(rows) == 0:
            continue
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


@lru_cache(maxsize=16)
def _ink_crops(
    source: str, split: str, seed: int, threshold: float
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Each digit of a split cropped to the tight box of its ink (so scale means ink
    height), and the digits' labels."""
    digits = load_digits_split(source, split, seed)
    crops = []
    for img in digits.images:
        ink = img > threshold
        rows = np.flatnonzero(ink.any(axis=1))
        cols = np.flatnonzero(ink.any(axis=0))
        if len(rows) == 0:  # an empty digit (none in MNIST) is kept whole
            crops.append(img)
            continue
        crops.append(np.ascontiguousarray(img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))
    return tuple(crops), digits.labels


@lru_cache(maxsize=4096)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row-normalised ``(n_out, n_in)`` triangle-filter weights, Pillow's bilinear rule.

    The filter widens with the down-scaling factor (antialiasing), and resizing an
    image is ``Wy @ img @ Wx.T``: two tiny matrix products instead of a Pillow
    round trip, which keeps scene generation above 1,000 scenes per second.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centres[:, None]) / support, 0.0, None)
    # Kept in float64: sums stay far from the rounding that could differ between BLAS builds.
    w /= w.sum(axis=1, keepdims=True)
    w.setflags(write=False)
    return w


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    out = _resize_matrix(img.shape[0], h) @ img @ _resize_matrix(img.shape[1], w).T
    return np.clip(out, 0.0, 1.0)


def _compose_scene(
    rng: np.random.Generator, crops: tuple[np.ndarray, ...], labels: np.ndarray, cfg: SceneConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = cfg.resolution
    canvas = np.zeros((r, r), dtype=np.float32)
    inst = np.zeros((r, r), dtype=np.uint8)
    ink_area: list[int] = []  # each placed digit's full ink area
    placed: list[int] = []
    k_target = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    for _ in range(k_target):
        j = int(rng.integers(len(crops)))
        crop = crops[j]
        h = max(4, round(rng.uniform(cfg.min_scale, cfg.max_scale) * r))
        w = max(2, min(r, round(crop.shape[1] * h / crop.shape[0])))
        digit = _resize(crop, h, w)
        ink = digit > cfg.ink_threshold
        area = int(ink.sum())
        if area == 0:
            continue
        for _try in range(cfg.max_tries):
            y0 = int(rng.integers(0, r - h + 1))
            x0 = int(rng.integers(0, r - w + 1))
            under = inst[y0 : y0 + h, x0 : x0 + w][ink]
            if _overlap_ok(under, area, ink_area, cfg.max_overlap):
                break
        else:
            continue
        k = len(placed)
        region = canvas[y0 : y0 + h, x0 : x0 + w]
        np.maximum(region, digit, out=region)
        inst[y0 : y0 + h, x0 : x0 + w][ink] = k + 1
        ink_area.append(area)
        placed.append(j)
    # Instances fully covered by later digits cannot happen (overlap is bounded),
    # but drop empty ids defensively so masks and labels always agree.
    present = np.unique(inst[inst > 0])
    if len(present) != len(placed):
        remap = np.zeros(len(placed) + 1, dtype=np.uint8)
        remap[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
        inst = remap[inst]
        placed = [placed[p - 1] for p in present]
        ink_area = [ink_area[p - 1] for p in present]
    image = np.round(canvas * 255.0).astype(np.uint8)
    return image, inst, labels[np.asarray(placed, dtype=np.int64)], np.asarray(ink_area, np.int64)


def _overlap_ok(under: np.ndarray, area: int, ink_area: list[int], bound: float) -> bool:
    """True if neither the new digit nor any earlier one loses more than ``bound`` of its ink."""
    covered = under[under > 0]
    if covered.size == 0:
        return True
    if covered.size > bound * area:
        return False
    counts = np.bincount(covered, minlength=len(ink_area) + 1)[1:]
    return bool(np.all(counts <= bound * np.asarray(ink_area)))


def generate_scenes(
    split: str = "train",
    n: int | None = None,
    *,
    seed: int = 0,
    source: str = "mnist",
    config: SceneConfig | None = None,
) -> SceneSet:
    """Compose ``n`` scenes from the real digits of ``split`` (default: half its size).

    Digits of the train split only appear in train scenes, and so on, so scene
    splits inherit the digit splits' separation.
    """
    cfg = config or SceneConfig()
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    crops, digit_labels = _ink_crops(source, split, seed, cfg.ink_threshold)
    if n is None:
        n = max(1, len(crops) // 2)
    if n < 1:
        raise DataError(f"number of scenes must be at least 1, got {n}")
    r = cfg.resolution
    images = np.zeros((n, r, r), dtype=np.uint8)
    instances = np.zeros((n, r, r), dtype=np.uint8)
    labels: list[np.ndarray] = []
    ink_areas: list[np.ndarray] = []
    split_code = SPLITS.index(split)
    # A bar only for runs long enough to wait for (about 3,000 scenes per CPU-second).
    for i in tqdm(range(n), desc=f"{split} scenes", disable=n < 20_000, leave=False):
        rng = np.random.default_rng((seed, split_code, i))
        images[i], instances[i], lab, ink = _compose_scene(rng, crops, digit_labels, cfg)
        labels.append(lab)
        ink_areas.append(ink)
    for a in (images, instances):
        a.setflags(write=False)
    log.debug("composed %d %s scenes at %d px", n, split, r)
    return SceneSet(cfg, split, seed, images, instances, labels, ink_areas)
