"""Synthetic articulated figures with the 14 LSP keypoints, for pose estimation.

A figure is a stick person in a random plausible pose: body height, lean,
facing (towards or away from the camera), limb angles, elbow and knee bends and
per-limb foreshortening are drawn at random. Limbs are painted as thick,
anti-aliased lines, the person's right side in a warm colour and the left side
in a cool one (as colour-coded LSP visualisations do), so left and right are
learnable from the image. Some joints are invisible: covered by an opaque
occluder or outside the canvas, the two reasons LSP marks a joint invisible.

Coordinates are pixels with pixel centres at integers: ``(x, y) = (col, row)``.
Each figure draws from a generator seeded by ``(seed, split, index)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from aiop.tasks.digits import SPLITS, DataError

log = logging.getLogger(__name__)

# LSP's joint order (Johnson & Everingham, 2010); "right" is the person's right.
LSP_KEYPOINTS: tuple[str, ...] = (
    "right_ankle",
    "right_knee",
    "right_hip",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_wrist",
    "right_elbow",
    "right_shoulder",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "neck",
    "head_top",
)
NUM_KEYPOINTS = len(LSP_KEYPOINTS)
_J = {name: i for i, name in enumerate(LSP_KEYPOINTS)}

# Limbs as (joint, joint) pairs, grouped by how they are painted.
RIGHT_LIMBS = ((0, 1), (1, 2), (6, 7), (7, 8))
LEFT_LIMBS = ((5, 4), (4, 3), (11, 10), (10, 9))
TORSO = ((2, 3), (8, 9), (8, 2), (9, 3), (12, 8), (12, 9), (12, 13))
SKELETON: tuple[tuple[int, int], ...] = RIGHT_LIMBS + LEFT_LIMBS + TORSO

# Segment lengths as fractions of the body height.
_PROPORTIONS = {
    "head": 0.17,
    "torso": 0.30,
    "shoulder": 0.10,
    "hip": 0.07,
    "upper_arm": 0.16,
    "forearm": 0.14,
    "thigh": 0.24,
    "shin": 0.23,
}
_RIGHT_COLOUR = np.array([1.0, 0.35, 0.15], dtype=np.float32)
_LEFT_COLOUR = np.array([0.15, 0.55, 1.0], dtype=np.float32)
_TORSO_COLOUR = np.array([0.9, 0.9, 0.75], dtype=np.float32)


@dataclass(frozen=True)
class PoseConfig:
    """How figures are drawn; sizes are fractions of the canvas side."""

    resolution: int = 64
    min_height: float = 0.55
    max_height: float = 0.95
    # Chance that a figure leans arbitrarily (sports poses), else lean ~ N(0, 15°).
    p_tumble: float = 0.1
    # Chance that a figure faces away, which swaps its left and right on screen.
    p_back: float = 0.3
    p_occluder: float = 0.4
    # Largest offset of the figure's centre from the canvas centre; beyond ~0.25
    # limbs start to leave the canvas.
    max_shift: float = 0.3

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise DataError(f"pose resolution must be at least 16 pixels, got {self.resolution}")
        if not 0.0 < self.min_height <= self.max_height:
            raise DataError(
                f"need 0 < min_height <= max_height, got {self.min_height}, {self.max_height}"
            )


@dataclass(frozen=True)
class PoseSet:
    """``n`` figures: uint8 images ``(n, 3, R, R)``, keypoints ``(n, 14, 2)`` (x, y),
    visibility ``(n, 14)`` and the figure's xyxy box ``(n, 4)``."""

    config: PoseConfig
    split: str
    seed: int
    images: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    bboxes: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


class _Draws:
    """Uniform numbers drawn in one call and handed out in order.

    One ``rng.random(64)`` costs what a single scalar draw does; a figure needs
    about forty numbers, so this is most of the speed of figure generation.
    """

    def __init__(self, rng: np.random.Generator, count: int = 64) -> None:
        self._u = rng.random(count).tolist()
        self._i = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        u = self._u[self._i]
        self._i += 1
        return lo + (hi - lo) * u

    def normal(self, sigma: float) -> float:
        # Box-Muller on two uniforms (1 - u keeps the logarithm finite).
        u1, u2 = 1.0 - self.uniform(), self.uniform()
        return sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _rot(v: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return (c * v[0] - s * v[1], s * v[0] + c * v[1])


def _skeleton(d: _Draws, cfg: PoseConfig) -> tuple[np.ndarray, float]:
    """Keypoints ``(14, 2)`` of one random figure and its body height in pixels."""
    r = cfg.resolution
    height = d.uniform(cfg.min_height, cfg.max_height) * r
    p = {k: v * height for k, v in _PROPORTIONS.items()}
    tumble = d.uniform() < cfg.p_tumble
    lean = d.uniform(-math.pi, math.pi) if tumble else d.normal(0.26)
    # "down" along the body, in (x, y) image coordinates with y pointing down.
    down = (math.sin(lean), math.cos(lean))
    side = (down[1], -down[0])  # towards the image's right for an upright figure
    # Facing the camera, the person's right side is on the image's left.
    facing = -1.0 if d.uniform() < cfg.p_back else 1.0
    cx = r / 2 + d.uniform(-cfg.max_shift, cfg.max_shift) * r
    cy = r / 2 + d.uniform(-cfg.max_shift, cfg.max_shift) * r
    # The hips sit a little below the middle of the body's height.
    pelvis = (cx + down[0] * 0.03 * height, cy + down[1] * 0.03 * height)
    neck = (pelvis[0] - down[0] * p["torso"], pelvis[1] - down[1] * p["torso"])
    kp = np.zeros((NUM_KEYPOINTS, 2))
    kp[_J["neck"]] = neck
    head = _rot(down, d.normal(0.2))
    kp[_J["head_top"]] = (neck[0] - head[0] * p["head"], neck[1] - head[1] * p["head"])
    for sign, pre in ((1.0, "right"), (-1.0, "left")):
        out = (-side[0] * facing * sign, -side[1] * facing * sign)
        # Positive angles turn "down" away from the body's midline on this side.
        turn = math.copysign(1.0, down[0] * out[1] - down[1] * out[0])
        shoulder = (
            neck[0] + out[0] * p["shoulder"] + down[0] * 0.02 * height,
            neck[1] + out[1] * p["shoulder"] + down[1] * 0.02 * height,
        )
        hip = (pelvis[0] + out[0] * p["hip"], pelvis[1] + out[1] * p["hip"])
        arm = d.uniform(-0.4, 2.8)
        fore = arm + d.uniform(-2.4, 0.3)
        thigh = d.uniform(-0.35, 1.4)
        # Knees bend further when the thigh is raised, as in running or kicking.
        shin = thigh - d.uniform(0.0, 2.0) * (1.0 if thigh > 0.4 else 0.5)
        chain = (
            (shoulder, ("elbow", arm, "upper_arm", 0.7), ("wrist", fore, "forearm", 0.7)),
            (hip, ("knee", thigh, "thigh", 0.75), ("ankle", shin, "shin", 0.75)),
        )
        kp[_J[f"{pre}_shoulder"]] = shoulder
        kp[_J[f"{pre}_hip"]] = hip
        for root, *links in chain:
            at = root
            for joint, angle, length, short in links:
                # Foreshortening: a limb pointing at the camera looks shorter.
                step = p[length] * d.uniform(short, 1.0)
                v = _rot(down, turn * angle)
                at = (at[0] + v[0] * step, at[1] + v[1] * step)
                kp[_J[f"{pre}_{joint}"]] = at
    return kp, height


# Supersampling factor: Pillow draws aliased shapes fast; drawing at _SS× and
# box-reducing gives anti-aliased edges.
_SS = 2


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (round(float(c) * 255) for c in np.clip(colour, 0.0, 1.0))
    return (r, g, b)


def _draw_limbs(
    draw: ImageDraw.ImageDraw,
    pts: list[list[float]],
    segments: tuple,
    width: float,
    fill: tuple[int, int, int],
) -> None:
    """Thick segments with round ends, on a canvas already scaled by _SS."""
    w = max(1, round(width * _SS))
    for a, b in segments:
        draw.line([*pts[a], *pts[b]], fill=fill, width=w)
    rad = w / 2
    for j in {j for seg in segments for j in seg}:
        x, y = pts[j]
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)


def _draw_figure(
    rng: np.random.Generator, cfg: PoseConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = cfg.resolution
    d = _Draws(rng)
    kp, height = _skeleton(d, cfg)
    # Background: a random dark colour with coarse 4×4-pixel clutter.
    base = np.array([d.uniform(0.0, 0.3) for _ in range(3)], dtype=np.float32)
    cells = -(-r // 4)
    clutter = rng.random((cells, cells, 3), dtype=np.float32) * np.float32(0.12) + base
    step = 4 * _SS
    back = clutter.repeat(step, axis=0).repeat(step, axis=1)[: r * _SS, : r * _SS]
    canvas = Image.fromarray((back * 255.0 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # Pixel centres sit at integers; at _SS× they sit at _SS·x + (_SS − 1)/2.
    pts = kp * _SS + (_SS - 1) / 2
    pts_list = pts.tolist()
    half = max(0.75, 0.03 * height)
    layers = [
        (TORSO, _TORSO_COLOUR * d.uniform(0.8, 1.0), 2.6 * half),
        (LEFT_LIMBS, _LEFT_COLOUR * d.uniform(0.8, 1.0), 2 * half),
        (RIGHT_LIMBS, _RIGHT_COLOUR * d.uniform(0.8, 1.0), 2 * half),
    ]
    if d.uniform() < 0.5:  # which side is nearer the camera
        layers[1], layers[2] = layers[2], layers[1]
    for segments, colour, width in layers:
        _draw_limbs(draw, pts_list, segments, width, _rgb(colour))
    # Head: a disc between the neck and the head top.
    cx, cy = 0.45 * pts[_J["neck"]] + 0.55 * pts[_J["head_top"]]
    rad = (0.5 * float(np.linalg.norm(kp[_J["head_top"]] - kp[_J["neck"]])) + 0.5) * _SS
    draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=_rgb(_TORSO_COLOUR))

    visible = (kp[:, 0] >= 0) & (kp[:, 0] <= r - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= r - 1)
    if d.uniform() < cfg.p_occluder:
        # An opaque box over part of the figure, centred near a random joint.
        sw, sh = d.uniform(0.18, 0.4) * r, d.uniform(0.18, 0.4) * r
        j = min(int(d.uniform() * NUM_KEYPOINTS), NUM_KEYPOINTS - 1)
        c = kp[j] + np.array([d.normal(0.05 * r), d.normal(0.05 * r)])
        ix0, iy0 = max(0, math.ceil(c[0] - sw / 2)), max(0, math.ceil(c[1] - sh / 2))
        ix1 = min(r, math.floor(c[0] + sw / 2) + 1)
        iy1 = min(r, math.floor(c[1] + sh / 2) + 1)
        if ix1 > ix0 and iy1 > iy0:
            grey = np.array([d.uniform(0.2, 0.6) for _ in range(3)])
            # Whole output pixels ix0..ix1-1, iy0..iy1-1 are covered.
            box2 = [ix0 * _SS, iy0 * _SS, ix1 * _SS - 1, iy1 * _SS - 1]
            draw.rectangle(box2, fill=_rgb(grey))
            # A joint is hidden when the pixel it falls on is covered.
            inside = (
                (kp[:, 0] >= ix0 - 0.5)
                & (kp[:, 0] < ix1 - 0.5)
                & (kp[:, 1] >= iy0 - 0.5)
                & (kp[:, 1] < iy1 - 0.5)
            )
            visible &= ~inside
    image = np.asarray(canvas.reduce(_SS)).transpose(2, 0, 1)
    box = np.concatenate([kp.min(axis=0) - half, kp.max(axis=0) + half])
    box = np.clip(box, 0.0, float(r))
    return image, kp.astype(np.float32), visible, box.astype(np.float32)


def generate_figures(
    split: str = "train", n: int | None = None, *, seed: int = 0, config: PoseConfig | None = None
) -> PoseSet:
    """Draw ``n`` figures for ``split`` (default sizes: 2,000 / 300 / 600)."""
    cfg = config or PoseConfig()
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is None:
        n = {"train": 2000, "val": 300, "test": 600}[split]
    if n < 1:
        raise DataError(f"number of figures must be at least 1, got {n}")
    r = cfg.resolution
    images = np.zeros((n, 3, r, r), dtype=np.uint8)
    keypoints = np.zeros((n, NUM_KEYPOINTS, 2), dtype=np.float32)
    visible = np.zeros((n, NUM_KEYPOINTS), dtype=bool)
    boxes = np.zeros((n, 4), dtype=np.float32)
    # An offset keeps pose generators apart from scene generators of the same seed.
    split_code = 100 + SPLITS.index(split)
    # A bar only for runs long enough to wait for (about 1,600 figures per CPU-second).
    for i in tqdm(range(n), desc=f"{split} figures", disable=n < 10_000, leave=False):
        rng = np.random.default_rng((seed, split_code, i))
        images[i], keypoints[i], visible[i], boxes[i] = _draw_figure(rng, cfg)
    for a in (images, keypoints, visible, boxes):
        a.setflags(write=False)
    log.debug("drew %d %s figures at %d px", n, split, r)
    return PoseSet(cfg, split, seed, images, keypoints, visible, boxes)
