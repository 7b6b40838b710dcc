"""Task metrics, all as fractions in [0, 1]: top-1, mIoU, COCO AP, PQ and PCK.

* :func:`top1`: share of argmax predictions equal to the label.
* :func:`mean_iou`: per-class IoU from one confusion matrix over all pixels,
  averaged over the classes present in the ground truth or the prediction
  (mmsegmentation's rule: a class nobody predicts or annotates is left out).
* :func:`coco_ap`: pycocotools' own ``COCOeval`` (boxes or masks), AP@[.5:.95],
  AP50, AP75.
* :func:`panoptic_quality`: Kirillov et al.'s PQ = SQ × RQ, matching segments of
  the same class at IoU > 0.5, averaged over classes (as panopticapi does).
  Every digit is a "thing"; background pixels are not a segment.
* :func:`pck`: share of visible joints within ``alpha × ref_size`` of the truth;
  :func:`torso_size` (LSP's left shoulder to right hip) and :func:`bbox_size`
  give the usual reference sizes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

# LSP indices used by the torso reference size (see aiop.tasks.pose.LSP_KEYPOINTS).
_RIGHT_HIP, _LEFT_SHOULDER = 2, 9


class MetricError(ValueError):
    """Inputs a metric cannot score: mismatched shapes, missing keys, no ground truth."""


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Share of rows of ``logits`` ``[N, C]`` whose argmax equals ``labels`` ``[N]``."""
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise MetricError(
            f"top1 needs logits [N, C] and labels [N], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise MetricError("top1 of an empty batch is undefined")
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def confusion_matrix(
    pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """``[C, C]`` int64 counts, rows ground truth, columns prediction."""
    if pred.shape != gt.shape:
        raise MetricError(
            f"prediction and ground truth shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}"
        )
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    for name, t in (("ground truth", gt), ("prediction", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise MetricError(
                f"{name} holds class {int(t.min()) if int(t.min()) < 0 else int(t.max())}, "
                f"outside 0..{num_classes - 1}"
            )
    return torch.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def mean_iou(
    pred: Tensor, gt: Tensor, num_classes: int = 11, ignore_index: int | None = None
) -> float:
    """Mean IoU of class maps ``[N, R, R]`` over the classes that occur in either.

    ``num_classes`` defaults to 11: background plus the ten digits of the scenes'
    ``semantic`` maps. Pixels whose ground truth is ``ignore_index`` are skipped.
    """
    cm = confusion_matrix(pred, gt, num_classes, ignore_index).double()
    tp = cm.diag()
    union = cm.sum(dim=0) + cm.sum(dim=1) - tp
    present = union > 0
    if not bool(present.any()):
        raise MetricError("mean IoU needs at least one labelled pixel")
    return float((tp[present] / union[present]).mean())


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = boxes.reshape(-1, 4).astype(np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _image_size(target: dict[str, Any]) -> tuple[int, int]:
    for key in ("masks", "semantic", "panoptic"):
        if key in target and _np(target[key]).ndim >= 2:
            h, w = _np(target[key]).shape[-2:]
            return int(h), int(w)
    if "size" in target:
        h, w = (int(v) for v in _np(target["size"]).reshape(-1)[:2])
        return h, w
    boxes = _np(target.get("boxes", np.zeros((0, 4)))).reshape(-1, 4)
    # Box-only targets: an image just large enough for its boxes serves bbox AP.
    return int(np.ceil(boxes[:, 3].max(initial=1))), int(np.ceil(boxes[:, 2].max(initial=1)))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _require(d: dict[str, Any], keys: Sequence[str], what: str, i: int) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise MetricError(f"{what} {i} lacks {', '.join(missing)}")


def coco_ap(
    detections: list[dict[str, Any]], targets: list[dict[str, Any]], iou_type: str = "bbox"
) -> dict[str, float]:
    """COCO AP@[.5:.95], AP50 and AP75 (fractions) from pycocotools' ``COCOeval``.

    ``detections[i]`` scores ``targets[i]``: detections hold ``boxes`` (xyxy),
    ``scores`` and ``labels`` (plus ``masks`` ``[D, H, W]``, binary or
    probabilities cut at 0.5, for ``iou_type="segm"``); targets hold ``boxes``,
    ``labels`` (and ``masks``). As in COCO, a class absent from the ground truth
    is left out of the mean. No detections at all score 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise MetricError(f"unknown iou_type {iou_type!r}; choose bbox or segm")
    if len(detections) != len(targets):
        raise MetricError(
            f"{len(detections)} detection sets for {len(targets)} images; need one per image"
        )
    gt_keys = ["boxes", "labels"] + (["masks"] if iou_type == "segm" else [])
    dt_keys = ["boxes", "scores", "labels"] + (["masks"] if iou_type == "segm" else [])
    images, annotations, results = [], [], []
    categories: set[int] = set()
    for i, (det, tgt) in enumerate(zip(detections, targets, strict=True)):
        _require(tgt, gt_keys, "target", i)
        _require(det, dt_keys, "detection set", i)
        h, w = _image_size(tgt)
        images.append({"id": i + 1, "height": h, "width": w})
        boxes, labels = _xyxy_to_xywh(_np(tgt["boxes"])), _np(tgt["labels"]).reshape(-1)
        masks = _np(tgt["masks"]) if "masks" in tgt else None
        if len(boxes) != len(labels) or (masks is not None and len(masks) != len(labels)):
            raise MetricError(f"target {i}: boxes, labels and masks differ in number")
        for k, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            ann = {
                "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                "image_id": i + 1,
                "category_id": int(label) + 1,
                "bbox": box.tolist(),
                "iscrowd": 0,
                # COCO's area is the mask's pixel count where there is a mask.
                "area": float(masks[k].sum()) if masks is not None else float(box[2] * box[3]),
            }
            if iou_type == "segm":
                ann["segmentation"] = _rle(masks[k] > 0)
            annotations.append(ann)
            categories.add(int(label) + 1)
        d_boxes = _xyxy_to_xywh(_np(det["boxes"]))
        d_scores = _np(det["scores"]).reshape(-1)
        d_labels = _np(det["labels"]).reshape(-1)
        if not len(d_boxes) == len(d_scores) == len(d_labels):
            raise MetricError(f"detection set {i}: boxes, scores and labels differ in number")
        d_masks = _np(det["masks"]) if iou_type == "segm" else None
        if d_masks is not None and len(d_masks) != len(d_boxes):
            raise MetricError(f"detection set {i}: {len(d_masks)} masks for {len(d_boxes)} boxes")
        for k in range(len(d_boxes)):
            res = {
                "image_id": i + 1,
                "category_id": int(d_labels[k]) + 1,
                "score": float(d_scores[k]),
            }
            if d_masks is not None:
                m = d_masks[k]
                binary = m > 0.5 if np.issubdtype(m.dtype, np.floating) else m > 0
                res["segmentation"] = _rle(binary)
            else:
                res["bbox"] = d_boxes[k].tolist()
            results.append(res)
            categories.add(int(d_labels[k]) + 1)
    if not annotations:
        raise MetricError("COCO AP needs at least one ground-truth object")
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c - 1)} for c in sorted(categories)],
    }
    # pycocotools prints progress to stdout; keep the caller's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 when undefined; its float sums leave 0.9999999999999998.
    ap, ap50, ap75 = (min(1.0, max(0.0, round(float(v), 12))) for v in ev.stats[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def _segment_map(d: dict[str, Any], what: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """An id map (0 = no segment, ``k + 1`` = segment ``k``) and the segments' labels."""
    if "labels" not in d or not ("masks" in d or "panoptic" in d):
        raise MetricError(f"{what} {i} needs labels and either masks or panoptic")
    labels = _np(d["labels"]).reshape(-1).astype(np.int64)
    if "panoptic" in d:
        ids = _np(d["panoptic"]).astype(np.int64)
        if ids.ndim != 2:
            raise MetricError(f"{what} {i}: panoptic map must be [H, W], got {ids.shape}")
        if ids.min() < 0 or ids.max() > len(labels):
            raise MetricError(f"{what} {i}: panoptic ids must be in 0..{len(labels)}")
        return ids, labels
    masks = _np(d["masks"])
    masks = (masks > 0.5) if np.issubdtype(masks.dtype, np.floating) else masks > 0
    if masks.ndim != 3 or len(masks) != len(labels):
        raise MetricError(
            f"{what} {i}: need masks [K, H, W] and K labels, got {masks.shape} and {len(labels)}"
        )
    if masks.sum(axis=0).max(initial=0) > 1:
        raise MetricError(f"{what} {i}: panoptic segments overlap; each pixel takes one segment")
    ids = np.zeros(masks.shape[1:], dtype=np.int64)
    for k, m in enumerate(masks):
        ids[m] = k + 1
    return ids, labels


def panoptic_quality(
    pred_panoptic: list[dict[str, Any]], targets: list[dict[str, Any]]
) -> dict[str, float]:
    """PQ, SQ and RQ (fractions) of non-overlapping predicted segments.

    Each prediction and target holds ``labels`` ``[S]`` and either ``masks``
    ``[S, H, W]`` (non-overlapping) or ``panoptic``, an ``[H, W]`` map of segment
    ids (0 = none, ``k + 1`` = segment ``k``). A predicted and a true segment of
    the same class match when their IoU exceeds 0.5 (the match is then unique).
    Per class: PQ = ΣIoU / (TP + FP/2 + FN/2), SQ = ΣIoU / TP, RQ = TP / (TP +
    FP/2 + FN/2); the results average over classes seen in either.
    """
    if len(pred_panoptic) != len(targets):
        raise MetricError(f"{len(pred_panoptic)} predictions for {len(targets)} targets")
    stats: dict[int, np.ndarray] = {}  # class → [iou sum, tp, fp, fn]

    def acc(c: int) -> np.ndarray:
        return stats.setdefault(int(c), np.zeros(4))

    for i, (pred, tgt) in enumerate(zip(pred_panoptic, targets, strict=True)):
        p_ids, p_labels = _segment_map(pred, "prediction", i)
        g_ids, g_labels = _segment_map(tgt, "target", i)
        if p_ids.shape != g_ids.shape:
            raise MetricError(f"image {i}: prediction {p_ids.shape} vs target {g_ids.shape}")
        n_p, n_g = len(p_labels) + 1, len(g_labels) + 1
        inter = np.bincount((g_ids * n_p + p_ids).ravel(), minlength=n_g * n_p).reshape(n_g, n_p)
        g_area, p_area = inter.sum(axis=1), inter.sum(axis=0)
        matched_p: set[int] = set()
        matched_g: set[int] = set()
        for g in range(1, n_g):
            for p in range(1, n_p):
                if inter[g, p] == 0 or g_labels[g - 1] != p_labels[p - 1]:
                    continue
                iou = inter[g, p] / (g_area[g] + p_area[p] - inter[g, p])
                if iou > 0.5:
                    s = acc(g_labels[g - 1])
                    s[0] += iou
                    s[1] += 1
                    matched_g.add(g)
                    matched_p.add(p)
        for g in range(1, n_g):
            if g not in matched_g and g_area[g] > 0:
                acc(g_labels[g - 1])[3] += 1
        for p in range(1, n_p):
            if p not in matched_p and p_area[p] > 0:
                acc(p_labels[p - 1])[2] += 1
    if not stats:
        raise MetricError("panoptic quality needs at least one segment")
    pq, sq, rq = [], [], []
    for iou, tp, fp, fn in stats.values():
        denom = tp + 0.5 * fp + 0.5 * fn
        pq.append(iou / denom)
        sq.append(iou / tp if tp else 0.0)
        rq.append(tp / denom)
    return {"PQ": float(np.mean(pq)), "SQ": float(np.mean(sq)), "RQ": float(np.mean(rq))}


def torso_size(keypoints: Tensor) -> Tensor:
    """LSP's torso diameter, left shoulder to right hip, of keypoints ``[N, 14, 2]``."""
    return (keypoints[:, _LEFT_SHOULDER] - keypoints[:, _RIGHT_HIP]).norm(dim=-1)


def bbox_size(boxes: Tensor) -> Tensor:
    """The longer side of xyxy boxes ``[N, 4]``."""
    return torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def pck(pred: Tensor, gt: Tensor, visible: Tensor, ref_size: Tensor, alpha: float = 0.2) -> float:
    """PCK@alpha: share of visible joints within ``alpha × ref_size`` pixels of the truth.

    ``pred`` and ``gt`` are ``[N, J, 2]``, ``visible`` ``[N, J]`` bool and
    ``ref_size`` ``[N]`` (e.g. :func:`torso_size` or :func:`bbox_size`).
    """
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise MetricError(
            f"pck needs pred and gt [N, J, 2], got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    if visible.shape != pred.shape[:2] or ref_size.shape != pred.shape[:1]:
        raise MetricError(
            f"pck needs visible [N, J] and ref_size [N], got {tuple(visible.shape)} "
            f"and {tuple(ref_size.shape)}"
        )
    if not alpha > 0:
        raise MetricError(f"alpha must be positive, got {alpha}")
    vis = visible.bool()
    if not bool(vis.any()):
        raise MetricError("pck needs at least one visible joint")
    dist = (pred.double() - gt.double()).norm(dim=-1)
    hit = dist <= alpha * ref_size.double()[:, None]
    return float(hit[vis].double().mean())
