"""Train a :class:`~aiop.tasks.heads.TaskModel` on a task on CPU, decode its outputs, evaluate.

* :func:`encode_targets` turns the data sets' per-image target dicts into dense
  tensors with the batch first (CenterNet heatmaps, sizes, offsets and centre
  masks; foreground and semantic maps; keypoint heatmaps and visibility), so a
  batch splits into micro-batches like its images and losses need no
  data-dependent shapes (the profiler runs them on fake tensors).
* :func:`task_loss`: CenterNet's penalty-reduced focal loss + L1 size/offset,
  BCE foreground masks, cross-entropy for classes and semantic maps, visibility
  weighted MSE for keypoint heatmaps.
* :func:`decode`: detections (3×3 max-pool peak picking, top-k), instance masks
  (foreground inside the box), panoptic segments (detections pasted by score onto
  the semantic foreground), keypoints (heatmap argmax with quarter-cell
  sub-pixel refinement toward the higher neighbour).
* :func:`evaluate`: top-1, mIoU, COCO AP (bbox, segm), PQ and PCK@0.2 through
  :mod:`aiop.tasks.metrics`.
* :func:`train_task_model`: Adam with a cosine schedule for a few epochs,
  deterministic under a seed, with a tqdm bar.

Boxes are in continuous pixels (a box edge at x = 0 is the image's left edge),
keypoints at pixel centres (as the data sets give them); a dense output cell
``j`` covers ``[j·s, (j+1)·s)`` of the continuous axis for stride ``s``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aiop.tasks.heads import NUM_CLASSES, NUM_KEYPOINTS, TaskModel, check_task

log = logging.getLogger(__name__)

# The headline metric of each task (the accuracy label the predictor learns).
PRIMARY_METRIC: dict[str, str] = {
    "classification": "top1",
    "detection": "bbox_AP",
    "instance": "segm_AP",
    "semantic": "mIoU",
    "panoptic": "PQ",
    "pose": "PCK",
}
# Default input side per task: the smallest that keeps each task meaningful, so one label
# costs under a minute of one CPU core (benchmarks/task_labels.py). MNIST digits are 28 px,
# so 32 px classifies them; scene digits need 48 px to stay 12-26 px tall; PCK@0.2 of a
# figure's torso needs 64 px (a torso of 10-20 px; at 32 px the threshold is ~2 px).
DEFAULT_RESOLUTION: dict[str, int] = {
    "classification": 32,
    "detection": 48,
    "instance": 48,
    "semantic": 48,
    "panoptic": 48,
    "pose": 64,
}
MAX_DETECTIONS = 20
INITS: tuple[str, ...] = ("scratch", "supernet")


def check_init(init: str) -> str:
    """``init`` if it is one of :data:`INITS` (where a backbone's weights start), else a
    one-line error naming them."""
    if init not in INITS:
        raise ValueError(f"unknown backbone init {init!r}; valid: {', '.join(INITS)}")
    return init


# Background covers most pixels of a scene: at full weight a short training run learns to
# predict background everywhere (mIoU ≈ 1/11). Down-weighting it makes digits pay off early.
BACKGROUND_WEIGHT = 0.1
PANOPTIC_SCORE = 0.3


# --------------------------------------------------------------------------- target encoding
def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift that keeps IoU ≥ ``min_overlap``."""
    a1, b1 = 1.0, h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _draw_gaussian(hm: np.ndarray, cx: int, cy: int, sigma: float) -> None:
    """Max-merge a Gaussian (peak exactly 1 at cell (cy, cx)) into ``hm`` in place."""
    h, w = hm.shape
    ys = np.arange(h, dtype=np.float32)[:, None] - cy
    xs = np.arange(w, dtype=np.float32)[None, :] - cx
    g = np.exp(-(xs**2 + ys**2) / (2 * sigma**2))
    np.maximum(hm, g, out=hm)


def _centernet_targets(targets: Sequence[dict[str, Any]], res: int, out: int) -> list[torch.Tensor]:
    b = len(targets)
    s = res / out
    hm = np.zeros((b, NUM_CLASSES, out, out), np.float32)
    wh = np.zeros((b, 2, out, out), np.float32)
    off = np.zeros((b, 2, out, out), np.float32)
    reg = np.zeros((b, out, out), np.float32)
    for i, t in enumerate(targets):
        boxes = np.asarray(t["boxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(t["labels"], np.int64).reshape(-1)
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            bw, bh = (x2 - x1) / s, (y2 - y1) / s
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x1 + x2) / 2 / s, (y1 + y2) / 2 / s
            ix, iy = min(int(cx), out - 1), min(int(cy), out - 1)
            radius = max(0.0, gaussian_radius(bh, bw))
            _draw_gaussian(hm[i, int(c)], ix, iy, sigma=(2 * radius + 1) / 6)
            wh[i, :, iy, ix] = (bw, bh)
            off[i, :, iy, ix] = (cx - ix, cy - iy)
            reg[i, iy, ix] = 1.0
    return [torch.from_numpy(a) for a in (hm, wh, off, reg)]


def _pose_targets(targets: Sequence[dict[str, Any]], res: int, out: int) -> list[torch.Tensor]:
    s = res / out
    b = len(targets)
    hm = np.zeros((b, NUM_KEYPOINTS, out, out), np.float32)
    vis = np.zeros((b, NUM_KEYPOINTS), np.float32)
    grid = np.arange(out, dtype=np.float32) + 0.5  # cell centres in cell units
    for i, t in enumerate(targets):
        # keypoints use pixel centres (pixel i spans [i - 0.5, i + 0.5]): shift to edges
        kp = (np.asarray(t["keypoints"], np.float32).reshape(NUM_KEYPOINTS, 2) + 0.5) / s
        v = np.asarray(t["visible"], bool).reshape(NUM_KEYPOINTS)
        for k in np.flatnonzero(v):
            gx = np.exp(-((grid - kp[k, 0]) ** 2) / 2)  # sigma = 1 cell
            gy = np.exp(-((grid - kp[k, 1]) ** 2) / 2)
            hm[i, k] = gy[:, None] * gx[None, :]
        vis[i] = v
    return [torch.from_numpy(hm), torch.from_numpy(vis)]


def _semantic(targets: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(t["semantic"], dtype=torch.int64) for t in targets])


def encode_targets(task: str, targets: Any, resolution: int, out_size: int) -> Any:
    """Dense training targets of a collated batch (see the module docstring)."""
    check_task(task)
    if task == "classification":
        return torch.as_tensor(targets, dtype=torch.int64)
    if task == "semantic":
        return _semantic(targets)
    if task == "pose":
        return tuple(_pose_targets(targets, resolution, out_size))
    dense = _centernet_targets(targets, resolution, out_size)
    if task == "instance":
        fg = torch.stack([(_semantic([t])[0] > 0).float() for t in targets])
        dense.append(fg)
    elif task == "panoptic":
        dense.append(_semantic(targets))
    return tuple(dense)


def random_dense_targets(
    task: str,
    batch: int,
    resolution: int,
    out_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Random targets with the shapes and dtypes of :func:`encode_targets` (shape-only ops,
    so they build on fake tensors too): what :meth:`TaskModel.make_batch` feeds the profiler."""
    kw: dict[str, Any] = {"generator": generator, "device": device}
    r, o = resolution, out_size
    if task == "classification":
        return torch.randint(0, NUM_CLASSES, (batch,), **kw)
    if task == "semantic":
        return torch.randint(0, NUM_CLASSES + 1, (batch, r, r), **kw)
    if task == "pose":
        return (
            torch.rand(batch, NUM_KEYPOINTS, o, o, **kw),
            torch.ones(batch, NUM_KEYPOINTS, device=device),
        )
    hm = torch.rand(batch, NUM_CLASSES, o, o, **kw)
    wh = torch.rand(batch, 2, o, o, **kw) * (o / 2)
    off = torch.rand(batch, 2, o, o, **kw)
    reg = (torch.rand(batch, o, o, **kw) > 0.95).float()
    dense = [hm, wh, off, reg]
    if task == "instance":
        dense.append((torch.rand(batch, r, r, **kw) > 0.7).float())
    elif task == "panoptic":
        dense.append(torch.randint(0, NUM_CLASSES + 1, (batch, r, r), **kw))
    return tuple(dense)


# --------------------------------------------------------------------------- losses
def focal_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (α = 2, β = 4), mean over objects."""
    pos = (gt >= 1 - 1e-4).float()
    log_p = F.logsigmoid(logits)
    log_1p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_term = pos * (1 - p) ** 2 * log_p
    neg_term = (1 - pos) * (1 - gt) ** 4 * p**2 * log_1p
    return -(pos_term + neg_term).sum() / pos.sum().clamp(min=1.0)


def _masked_l1(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(1)
    return ((pred - gt).abs() * m).sum() / (m.sum() * pred.shape[1]).clamp(min=1.0)


def task_loss(task: str, outputs: Any, targets: Any) -> torch.Tensor:
    """The training loss of ``task`` (outputs of :class:`TaskModel`, targets of
    :func:`encode_targets`)."""
    if task == "classification":
        return F.cross_entropy(outputs, targets)
    if task == "semantic":
        return _semantic_loss(outputs, targets)
    if task == "pose":
        hm, vis = targets
        err = ((outputs - hm) ** 2).sum(dim=(2, 3)) * vis
        return err.sum() / vis.sum().clamp(min=1.0)
    heat, size, offset, *extra = outputs
    hm, wh, off, reg, *extra_t = targets
    loss = focal_loss(heat, hm) + 0.1 * _masked_l1(size, wh, reg) + _masked_l1(offset, off, reg)
    if task == "instance":
        # background pixels weigh BACKGROUND_WEIGHT, as in the semantic loss (else the short
        # run predicts no foreground at all and every mask is empty)
        fg = extra_t[0]
        weight = fg + BACKGROUND_WEIGHT * (1 - fg)
        loss = loss + F.binary_cross_entropy_with_logits(extra[0][:, 0], fg, weight=weight)
    elif task == "panoptic":
        loss = loss + _semantic_loss(extra[0], extra_t[0])
    return loss


def _semantic_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    weight = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
    weight[0] = BACKGROUND_WEIGHT
    return F.cross_entropy(logits, target, weight=weight)


# --------------------------------------------------------------------------- decoding
def decode_detections(
    heat: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    resolution: int,
    k: int = MAX_DETECTIONS,
) -> list[dict[str, torch.Tensor]]:
    """CenterNet decoding: peaks of the class heatmaps (3×3 max-pool NMS), top ``k`` per image,
    boxes from the size and offset at the peak, in input pixels."""
    b, c, h, w = heat.shape
    s = resolution / w
    hm = torch.sigmoid(heat)
    peaks = hm * (F.max_pool2d(hm, 3, stride=1, padding=1) == hm)
    scores, idx = peaks.reshape(b, -1).topk(min(k, c * h * w))
    cls = idx // (h * w)
    cell = idx % (h * w)
    ys, xs = (cell // w), (cell % w)
    out = []
    for i in range(b):
        y, x = ys[i], xs[i]
        bw, bh = size[i, 0, y, x].clamp(min=0), size[i, 1, y, x].clamp(min=0)
        cx, cy = (x.float() + offset[i, 0, y, x]) * s, (y.float() + offset[i, 1, y, x]) * s
        boxes = torch.stack(
            [cx - bw * s / 2, cy - bh * s / 2, cx + bw * s / 2, cy + bh * s / 2], dim=1
        ).clamp(0, resolution)
        keep = scores[i] > 1e-3
        out.append({"boxes": boxes[keep], "scores": scores[i][keep], "labels": cls[i][keep]})
    return out


def _box_mask(box: torch.Tensor, res: int) -> torch.Tensor:
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    m = torch.zeros(res, res, dtype=torch.bool)
    m[max(y1, 0) : min(max(y2, y1 + 1), res), max(x1, 0) : min(max(x2, x1 + 1), res)] = True
    return m


def instance_masks(dets: dict[str, torch.Tensor], foreground: torch.Tensor) -> torch.Tensor:
    """Instance masks ``[K, R, R]`` uint8: the foreground inside each detection's box."""
    res = foreground.shape[-1]
    if len(dets["boxes"]) == 0:
        return torch.zeros(0, res, res, dtype=torch.uint8)
    return torch.stack([(_box_mask(b, res) & foreground) for b in dets["boxes"]]).to(torch.uint8)


def panoptic_segments(
    dets: dict[str, torch.Tensor], semantic: torch.Tensor, score: float = PANOPTIC_SCORE
) -> dict[str, Any]:
    """Panoptic-FPN style merge: detections above ``score``, highest first, each claims the
    still-free semantic foreground inside its box (dropped when less than half of it is free);
    its class is the semantic majority vote there. Returns ``{"masks", "labels", "scores"}``
    with non-overlapping uint8 masks (background: no segment)."""
    res = semantic.shape[-1]
    fg = semantic > 0
    taken = torch.zeros(res, res, dtype=torch.bool)
    masks, labels, scores = [], [], []
    order = torch.argsort(dets["scores"], descending=True)
    for j in order.tolist():
        if float(dets["scores"][j]) < score:
            break
        region = _box_mask(dets["boxes"][j], res) & fg
        free = region & ~taken
        area = int(free.sum())
        if area == 0 or area < 0.5 * int(region.sum()):
            continue
        votes = torch.bincount(semantic[free] - 1, minlength=NUM_CLASSES)
        taken |= free
        masks.append(free)
        labels.append(int(votes.argmax()))
        scores.append(float(dets["scores"][j]))
    stacked = (
        torch.stack(masks).to(torch.uint8) if masks else torch.zeros(0, res, res, dtype=torch.uint8)
    )
    return {
        "masks": stacked,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def decode_keypoints(heatmaps: torch.Tensor, resolution: int) -> torch.Tensor:
    """Keypoints ``[B, K, 2]`` (x, y pixels): argmax, then a quarter cell toward the higher
    neighbour (the standard sub-pixel refinement of heatmap pose estimators)."""
    b, k, _, w = heatmaps.shape
    s = resolution / w
    flat = heatmaps.reshape(b, k, -1).argmax(-1)
    ys, xs = (flat // w), (flat % w)
    hm = F.pad(heatmaps, (1, 1, 1, 1), mode="replicate")
    bi = torch.arange(b)[:, None].expand(b, k)
    ki = torch.arange(k)[None, :].expand(b, k)
    dx = hm[bi, ki, ys + 1, xs + 2] - hm[bi, ki, ys + 1, xs]
    dy = hm[bi, ki, ys + 2, xs + 1] - hm[bi, ki, ys, xs + 1]
    x = xs.float() + 0.5 + 0.25 * torch.sign(dx)
    y = ys.float() + 0.5 + 0.25 * torch.sign(dy)
    return torch.stack([x, y], dim=-1) * s - 0.5  # back to pixel-centre coordinates


def reference_size(keypoints: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
    """PCK's reference length per figure: LSP's torso diameter
    (:func:`aiop.tasks.metrics.torso_size`), or the figure's longer bbox side where the torso
    is degenerate (a figure seen edge-on)."""
    from aiop.tasks.metrics import bbox_size, torso_size

    torso = torso_size(keypoints)
    return torch.where(torso > 1.0, torso, bbox_size(bbox))


# --------------------------------------------------------------------------- evaluation
def semantic_argmax(logits: torch.Tensor, dim: int, unweighted: bool = False) -> torch.Tensor:
    """Class map of semantic ``logits`` (classes along ``dim``, 0 = background).

    The semantic loss weighs background BACKGROUND_WEIGHT, so softmax(logits) is the
    *weighted* posterior and its argmax calls a pixel foreground already where
    p(digit) > BACKGROUND_WEIGHT · p(background). ``unweighted`` adds log(1 /
    BACKGROUND_WEIGHT) to the background logit first: the argmax of the unweighted posterior.
    """
    if unweighted:
        logits = logits.clone()
        logits.select(dim, 0).add_(math.log(1.0 / BACKGROUND_WEIGHT))
    return logits.argmax(dim)


@torch.no_grad()
def predict(
    model: TaskModel,
    loader: Iterable[tuple[torch.Tensor, Any]],
    *,
    mask_threshold: float = 0.5,
    unweight_semantic: bool = False,
) -> tuple[list, list]:
    """Decoded predictions and the raw targets over a loader (eval mode); ``unweight_semantic``:
    semantic maps (and panoptic's) from the unweighted posterior (:func:`semantic_argmax`)."""
    task = model.task
    was_training = model.training
    model.eval()
    preds: list[Any] = []
    gts: list[Any] = []
    try:
        for images, targets in loader:
            res = images.shape[-1]
            out = model(images)
            if task == "classification":
                preds.append(out)
                gts.append(torch.as_tensor(targets))
            elif task == "semantic":
                preds.extend(semantic_argmax(out, 1, unweight_semantic))
                gts.extend(targets)
            elif task == "pose":
                preds.extend(decode_keypoints(out, res))
                gts.extend(targets)
            else:
                dets = decode_detections(out[0], out[1], out[2], res)
                for i, d in enumerate(dets):
                    if task == "instance":
                        fg = torch.sigmoid(out[3][i, 0]) > mask_threshold
                        d["masks"] = instance_masks(d, fg)
                    elif task == "panoptic":
                        d = panoptic_segments(d, semantic_argmax(out[3][i], 0, unweight_semantic))
                    preds.append(d)
                gts.extend(targets)
    finally:
        model.train(was_training)
    return preds, gts


def score(task: str, preds: list, gts: list) -> dict[str, float]:
    """The task's metrics (fractions in [0, 1]) from :func:`predict`'s output."""
    from aiop.tasks import metrics

    if task == "classification":
        return {"top1": metrics.top1(torch.cat(preds), torch.cat(gts))}
    if task == "semantic":
        sem = torch.stack([torch.as_tensor(t["semantic"]) for t in gts])
        return {"mIoU": metrics.mean_iou(torch.stack(preds), sem, num_classes=NUM_CLASSES + 1)}
    if task == "pose":
        gt_kp = torch.stack([torch.as_tensor(t["keypoints"], dtype=torch.float32) for t in gts])
        vis = torch.stack([torch.as_tensor(t["visible"], dtype=torch.bool) for t in gts])
        bbox = torch.stack([torch.as_tensor(t["bbox"], dtype=torch.float32) for t in gts])
        return {"PCK": metrics.pck(torch.stack(preds), gt_kp, vis, reference_size(gt_kp, bbox))}
    if task == "panoptic":
        pq = metrics.panoptic_quality(preds, gts)
        return {"PQ": pq["PQ"], "SQ": pq["SQ"], "RQ": pq["RQ"]}
    out = {f"bbox_{k}": v for k, v in metrics.coco_ap(preds, gts, "bbox").items()}
    if task == "instance":
        out.update({f"segm_{k}": v for k, v in metrics.coco_ap(preds, gts, "segm").items()})
    return out


def evaluate(
    model: TaskModel,
    loader: Iterable[tuple[torch.Tensor, Any]],
    *,
    mask_threshold: float = 0.5,
    unweight_semantic: bool = False,
) -> dict[str, float]:
    preds, gts = predict(
        model, loader, mask_threshold=mask_threshold, unweight_semantic=unweight_semantic
    )
    return score(model.task, preds, gts)


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """How one architecture is trained for its label (defaults: ≤ 60 s on one CPU core)."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    resolution: int | None = None  # None: DEFAULT_RESOLUTION of the task
    n_train: int | None = 1000
    n_val: int | None = 300
    data_seed: int = 0
    seed: int = 0
    train_backbone: bool = True
    max_seconds: float | None = None  # stop early (and say so) past this wall time
    # a label is the mean over this many trainings under seeds seed, seed+1, ...
    # (aiop.tasks.labels.train_repeats); train_task_model itself trains once
    repeats: int = 1
    # where the label is measured: "val", or "val+test" (every held-out item: for the 5,000
    # MNIST digits 1,500 instead of 500, a third of the top-1 sampling noise's variance)
    val_split: str = "val"
    # where the backbone starts: "scratch" (random weights from the seed) or "supernet" (its
    # slice of the family's weight-sharing supernet, aiop.tasks.supernet; OFA/AIO-P's way)
    init: str = "scratch"
    # where instance masks are cut: sigmoid(mask logit) > mask_threshold (0.5: v1-v4; None,
    # as configs stored before the field existed say, reads as 0.5). The mask loss weighs
    # background BACKGROUND_WEIGHT, so the sigmoid is the weighted posterior;
    # 1 / (1 + BACKGROUND_WEIGHT) cuts the unweighted one at 0.5 (recipe v5)
    mask_threshold: float = 0.5
    # semantic maps (semantic, panoptic) from the unweighted posterior (semantic_argmax);
    # False: the argmax of the logits, v1-v5. Unlike instance masks, semantic labels do not
    # gain: ICC(1) 0.76 -> 0.40 on 12 ofa_mbv3 x 2 seeds (task_label_noise_v4s.md)
    unweight_semantic: bool = False
    # classification measured on held-out digits under CIFAR-10-C's fifteen corruptions in
    # turn at this severity (corrupted_digits); None: the clean digits, v1-v5
    eval_corruption: int | None = None

    def __post_init__(self) -> None:
        check_init(self.init)
        if self.mask_threshold is None:
            self.mask_threshold = 0.5
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(
                f"mask_threshold is a probability in (0, 1), got {self.mask_threshold!r}"
            )
        if self.eval_corruption not in (None, 0, 1, 2, 3, 4, 5):
            raise ValueError(f"eval_corruption is a severity 1-5, got {self.eval_corruption!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_task(self, task: str) -> TrainConfig:
        """This config with the task's default resolution filled in."""
        if self.resolution is not None:
            return self
        return replace(self, resolution=DEFAULT_RESOLUTION[check_task(task)])


@dataclass
class TrainResult:
    task: str
    metrics: dict[str, float]
    seconds: float
    train_seconds: float
    steps: int
    cpu_seconds: float = 0.0  # CPU time of this process: one core's work, whatever the load
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def primary(self) -> float:
        return self.metrics[PRIMARY_METRIC[self.task]]


def corrupted_digits(ds: Any, severity: int, seed: int, offset: int = 0) -> Any:
    """A classification dataset whose image ``i`` carries corruption ``CORRUPTIONS[(offset +
    i) % 15]`` (:mod:`aiop.tasks.corruptions`, CIFAR-10-C's fifteen) at ``severity``: a
    harder held-out set, deterministic in ``seed``."""
    from aiop.tasks.corruptions import CORRUPTIONS, corrupt
    from aiop.tasks.data import ClassificationDataset

    images = ds.images.numpy()  # (N, 1, R, R) in [0, 1]
    out = np.empty_like(images)
    kinds = (offset + np.arange(len(images))) % len(CORRUPTIONS)
    for k, name in enumerate(CORRUPTIONS):
        pick = np.flatnonzero(kinds == k)
        if pick.size:
            out[pick] = corrupt(images[pick], name, severity, seed=seed)
    return ClassificationDataset(torch.from_numpy(out), ds.labels)


def make_loader(
    task: str,
    split: str,
    cfg: TrainConfig,
    *,
    shuffle: bool,
    n: int | None = None,
    corruption: int | None = None,
) -> torch.utils.data.DataLoader:
    """A single-process loader over :func:`aiop.tasks.data.build_dataset` (deterministic);
    ``corruption``: the severity of :func:`corrupted_digits` (classification only)."""
    from aiop.tasks.data import build_dataset, collate_fn

    cfg = cfg.for_task(task)
    if corruption and task != "classification":
        raise ValueError(f"a corrupted held-out set exists for classification, not {task!r}")
    parts = split.split("+")
    if len(parts) == 1:
        ds = build_dataset(task, split, resolution=cfg.resolution, n=n, seed=cfg.data_seed)
        if corruption:
            ds = corrupted_digits(ds, corruption, cfg.data_seed)
    else:  # e.g. "val+test": evaluate on more held-out items (less sampling noise)
        # n is shared out in proportion to the splits' default sizes
        sizes = [len(build_dataset(task, s, resolution=cfg.resolution, seed=cfg.data_seed))
                 for s in parts]  # fmt: skip
        counts = (
            [None] * len(parts)
            if n is None
            else [min(sz, max(1, round(n * sz / sum(sizes)))) for sz in sizes]
        )
        sets = [
            build_dataset(task, s, resolution=cfg.resolution, n=c, seed=cfg.data_seed)
            for s, c in zip(parts, counts, strict=True)
        ]
        if corruption:  # the corruptions take turns across the parts as within one
            starts = np.cumsum([0] + [len(d) for d in sets[:-1]])
            sets = [
                corrupted_digits(d, corruption, cfg.data_seed, int(o))
                for d, o in zip(sets, starts, strict=True)
            ]
        ds = torch.utils.data.ConcatDataset(sets)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn(task),
        generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
        num_workers=0,
    )


def fit(
    model: TaskModel,
    loader: Iterable[tuple[torch.Tensor, Any]],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 1e-4,
    params: Iterable[nn.Parameter] | None = None,
    progress: bool = False,
    desc: str = "train",
    deadline: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[int, list[float], bool]:
    """Adam + cosine decay over ``epochs`` passes of ``loader``; returns (steps, per-epoch mean
    losses, stopped early). ``params`` defaults to every trainable parameter."""
    from tqdm import tqdm

    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    res = model.input_size[-1]
    out = model.output_size
    model.train()
    steps, losses, early = 0, [], False
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        for _ in range(epochs):
            running, count = 0.0, 0
            for images, targets in loader:
                dense = encode_targets(
                    model.task, targets, images.shape[-1], _out_size(res, out, images)
                )
                loss = model.loss(model(images), dense)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                steps += 1
                running += loss.item()
                count += 1
                bar.update(1)
                if on_step is not None:
                    on_step(steps, running / count)
                if deadline is not None and time.perf_counter() > deadline:
                    early = True
                    break
            losses.append(running / max(count, 1))
            if early:
                break
    finally:
        bar.close()
    return steps, losses, early


def _out_size(model_res: int, model_out: int, images: torch.Tensor) -> int:
    return math.ceil(images.shape[-1] / model_res * model_out)


def train_task_model(
    model: TaskModel,
    cfg: TrainConfig,
    *,
    train_loader: Iterable[tuple[torch.Tensor, Any]] | None = None,
    val_loader: Iterable[tuple[torch.Tensor, Any]] | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` on its task and evaluate it on the validation split."""
    t0, c0 = time.perf_counter(), time.process_time()
    task = model.task
    cfg = cfg.for_task(task)
    torch.manual_seed(cfg.seed)
    train_loader = train_loader or make_loader(task, "train", cfg, shuffle=True, n=cfg.n_train)
    val_loader = val_loader or make_loader(
        task, cfg.val_split, cfg, shuffle=False, n=cfg.n_val, corruption=cfg.eval_corruption
    )
    if not cfg.train_backbone:
        for p in [*model.stem.parameters(), *model.blocks.parameters()]:
            p.requires_grad_(False)
    deadline = None if cfg.max_seconds is None else t0 + cfg.max_seconds
    steps, losses, early = fit(
        model,
        train_loader,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        progress=progress,
        desc=desc or task,
        deadline=deadline,
    )
    t1 = time.perf_counter()
    metrics = evaluate(
        model,
        val_loader,
        mask_threshold=cfg.mask_threshold,
        unweight_semantic=cfg.unweight_semantic,
    )
    return TrainResult(
        task=task,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
        train_seconds=t1 - t0,
        steps=steps,
        cpu_seconds=time.process_time() - c0,
        losses=losses,
        stopped_early=early,
    )


def build_task_model(
    spec: str,
    task: str,
    *,
    resolution: int | None = None,
    seed: int = 0,
    width: int | None = None,
    init: str = "scratch",
    progress: bool = False,
) -> TaskModel:
    """``zoo:NAME`` / ``family:FAMILY:SEED`` at ``resolution`` with the ``task`` head; weights
    initialised deterministically from ``seed`` — with ``init="supernet"`` the backbone's then
    replaced by its slice of the family's supernet (trained into the cache on first use)."""
    from aiop.models import build
    from aiop.tasks.heads import DEFAULT_WIDTH

    resolution = resolution or DEFAULT_RESOLUTION[check_task(task)]
    check_init(init)
    torch.manual_seed(seed)
    backbone = build(spec, num_classes=NUM_CLASSES, resolution=resolution)
    model = TaskModel(
        backbone, task, resolution=resolution, width=width or DEFAULT_WIDTH, name=spec
    )
    if init == "supernet":
        from aiop.tasks.supernet import inherit_spec, supernet_config

        inherit_spec(model, supernet_config(model.arch.get("family", "")), progress=progress)
    return model
