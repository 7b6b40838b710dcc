"""Metrics against hand-computed cases and pycocotools' own behaviour."""

from __future__ import annotations

import pytest
import torch

from aiop.tasks.data import build_dataset
from aiop.tasks.metrics import (
    MetricError,
    bbox_size,
    coco_ap,
    mean_iou,
    panoptic_quality,
    pck,
    top1,
    torso_size,
)


def test_top1_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    assert top1(logits, torch.tensor([0, 1, 1, 0])) == 0.5
    with pytest.raises(MetricError, match="logits"):
        top1(logits, torch.tensor([0, 1]))


def test_mean_iou_by_hand():
    gt = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: 1 / 2; class 1: 2 / 3; classes 2..10 absent from both are left out.
    assert mean_iou(pred, gt) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(gt, gt) == 1.0
    # A class only predicted counts as IoU 0.
    assert mean_iou(torch.tensor([[[2, 0], [1, 1]]]), gt) == pytest.approx((0.5 + 1 + 0) / 3)
    ignored = torch.tensor([[[255, 0], [1, 1]]])
    assert mean_iou(pred, ignored, ignore_index=255) == pytest.approx((0 + 2 / 3) / 2)
    with pytest.raises(MetricError, match=r"outside 0\.\.10"):
        mean_iou(torch.full((1, 2, 2), 11), gt)
    with pytest.raises(MetricError, match="shapes differ"):
        mean_iou(pred[:, :1], gt)


def _target(boxes, labels):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _dets(boxes, scores, labels):
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
    }


def test_coco_ap_by_hand():
    tgt = [_target([[0, 0, 10, 10]], [3])]
    assert coco_ap([_dets([[0, 0, 10, 10]], [0.9], [3])], tgt) == {
        "AP": 1.0,
        "AP50": 1.0,
        "AP75": 1.0,
    }
    # IoU 0.62 clears thresholds 0.50, 0.55 and 0.60 of ten: AP 0.3, AP50 1, AP75 0.
    res = coco_ap([_dets([[0, 0, 10, 6.2]], [0.9], [3])], tgt)
    assert res["AP"] == pytest.approx(0.3, abs=1e-6) and res["AP50"] == 1.0 and res["AP75"] == 0
    # The wrong class finds nothing; no detections at all score zero.
    assert coco_ap([_dets([[0, 0, 10, 10]], [0.9], [4])], tgt)["AP"] == 0.0
    assert coco_ap([_dets(torch.zeros(0, 4), [], [])], tgt)["AP"] == 0.0
    # A confident false positive ranked above the true positive halves precision.
    two = [_target([[0, 0, 10, 10]], [3]), _target([[5, 5, 15, 15]], [3])]
    dets = [_dets([[0, 0, 10, 10]], [0.9], [3]), _dets([[20, 20, 30, 30]], [0.95], [3])]
    assert coco_ap(dets, two)["AP50"] < 0.6
    with pytest.raises(MetricError, match="one per image"):
        coco_ap(dets, tgt)
    with pytest.raises(MetricError, match="lacks scores"):
        coco_ap([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], tgt)
    with pytest.raises(MetricError, match="at least one ground-truth"):
        coco_ap([_dets([[0, 0, 1, 1]], [0.5], [0])], [_target(torch.zeros(0, 4), [])])


def test_coco_ap_on_scenes_boxes_and_masks():
    ds = build_dataset("instance", "val", n=20)
    targets = [ds[i][1] for i in range(len(ds))]
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), **t} for t in targets]
    assert coco_ap(perfect, targets)["AP"] == 1.0
    assert coco_ap(perfect, targets, "segm")["AP"] == 1.0
    shifted = [{**d, "boxes": d["boxes"] + 2.0} for d in perfect]
    assert 0.0 < coco_ap(shifted, targets)["AP"] < coco_ap(perfect, targets)["AP"]
    # Eroding every mask to its upper half lowers mask AP, but not box AP.
    halves = []
    for d in perfect:
        m = d["masks"].clone()
        for k, (_, y0, _, y1) in enumerate(d["boxes"].long().tolist()):
            m[k, (y0 + y1) // 2 :] = 0
        halves.append({**d, "masks": m.float() * 0.9})
    assert coco_ap(halves, targets, "segm")["AP"] < 0.5
    assert coco_ap(halves, targets, "bbox")["AP"] == 1.0
    with pytest.raises(MetricError, match="unknown iou_type"):
        coco_ap(perfect, targets, "keypoints")


def test_panoptic_quality_by_hand():
    gt_masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    gt_masks[0, :, :5] = 1  # 50 px, class 1
    gt_masks[1, :, 5:] = 1  # 50 px, class 2
    tgt = {"masks": gt_masks, "labels": torch.tensor([1, 2])}
    assert panoptic_quality([tgt], [tgt]) == {"PQ": 1.0, "SQ": 1.0, "RQ": 1.0}
    pred_masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    pred_masks[0, :8, :5] = 1  # IoU 40 / 50 = 0.8 with gt 0
    pred_masks[1, :, 5:] = 1  # perfect shape but class 3: FN for 2, FP for 3
    pred = {"masks": pred_masks, "labels": torch.tensor([1, 3])}
    res = panoptic_quality([pred], [tgt])
    assert res["PQ"] == pytest.approx(0.8 / 3)
    assert res["SQ"] == pytest.approx(0.8 / 3)
    assert res["RQ"] == pytest.approx(1 / 3)
    # The same prediction as an id map.
    ids = torch.zeros(10, 10, dtype=torch.long)
    ids[pred_masks[0].bool()] = 1
    ids[pred_masks[1].bool()] = 2
    assert panoptic_quality([{"panoptic": ids, "labels": torch.tensor([1, 3])}], [tgt]) == res
    # IoU exactly 0.5 is not a match.
    half = torch.zeros(1, 10, 10, dtype=torch.uint8)
    half[0, :, :5] = 1
    wide = {"masks": torch.ones(1, 10, 10, dtype=torch.uint8), "labels": torch.tensor([1])}
    assert panoptic_quality([wide], [{"masks": half, "labels": torch.tensor([1])}])["PQ"] == 0
    with pytest.raises(MetricError, match="overlap"):
        panoptic_quality([{"masks": torch.ones(2, 4, 4), "labels": torch.tensor([1, 2])}], [tgt])


def test_pck_by_hand():
    gt = torch.zeros(2, 14, 2)
    pred = gt.clone()
    pred[0, 0] = torch.tensor([3.0, 4.0])  # 5 px off
    pred[1, :7, 0] = 100.0  # far off, but 5 of these are invisible
    visible = torch.ones(2, 14, dtype=torch.bool)
    visible[1, :5] = False
    ref = torch.tensor([30.0, 30.0])  # threshold 6 px
    # 28 - 5 = 23 visible joints; misses: none in image 0, joints 5 and 6 in image 1.
    assert pck(pred, gt, visible, ref) == pytest.approx(21 / 23)
    assert pck(pred, gt, visible, torch.tensor([20.0, 20.0])) == pytest.approx(20 / 23)
    kp = torch.zeros(1, 14, 2)
    kp[0, 9] = torch.tensor([3.0, 0.0])
    kp[0, 2] = torch.tensor([0.0, 4.0])
    assert torso_size(kp).item() == pytest.approx(5.0)
    assert bbox_size(torch.tensor([[1.0, 2.0, 5.0, 12.0]])).item() == 10.0
    with pytest.raises(MetricError, match="visible joint"):
        pck(pred, gt, torch.zeros(2, 14, dtype=torch.bool), ref)
    with pytest.raises(MetricError, match="ref_size"):
        pck(pred, gt, visible, torch.ones(3))


def test_mean_iou_agrees_with_scikit_learn():
    from sklearn.metrics import jaccard_score

    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (3, 16, 16), generator=g)
    noise = torch.randint(0, 8, (3, 16, 16), generator=g)
    pred = torch.where(torch.rand(3, 16, 16, generator=g) < 0.6, gt, noise)
    present = sorted(set(gt.flatten().tolist()) | set(pred.flatten().tolist()))
    expect = jaccard_score(gt.flatten(), pred.flatten(), labels=present, average="macro")
    assert mean_iou(pred, gt) == pytest.approx(expect)
