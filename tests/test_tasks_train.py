"""Targets, losses, decoding and training of task models (aiop.tasks.train, shared_head)."""

from __future__ import annotations

import pytest
import torch

from aiop.models.examples import TinyResNet
from aiop.tasks import metrics
from aiop.tasks.data import build_dataset, collate_fn
from aiop.tasks.heads import HeadError, TaskModel
from aiop.tasks.train import (
    TrainConfig,
    decode_detections,
    decode_keypoints,
    encode_targets,
    focal_loss,
    instance_masks,
    panoptic_segments,
    reference_size,
    score,
    train_task_model,
)

RES = 32


def _batch(task: str, n: int = 8, split: str = "val"):
    ds = build_dataset(task, split, resolution=RES, n=n, seed=0)
    return collate_fn(task)([ds[i] for i in range(len(ds))])


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(1e-6, 1 - 1e-6))


def test_perfect_centernet_outputs_decode_to_the_truth() -> None:
    """Encoded targets, read back as network outputs, decode to AP 1, segm AP 1 and PQ 1."""
    _images, targets = _batch("panoptic")
    hm, wh, off, _reg, sem = encode_targets("panoptic", targets, RES, RES // 4)
    dets = decode_detections(_logit(hm), wh, off, RES)
    assert metrics.coco_ap(dets, targets, "bbox")["AP50"] == pytest.approx(1.0)
    for d, t in zip(dets, targets):
        d["masks"] = instance_masks(d, torch.as_tensor(t["semantic"]) > 0)
    assert metrics.coco_ap(dets, targets, "bbox")["AP"] > 0.9
    # overlapping digits share foreground pixels: box ∩ foreground is not exact there
    assert metrics.coco_ap(dets, targets, "segm")["AP"] > 0.7
    pan = [panoptic_segments(d, s) for d, s in zip(dets, sem)]
    assert metrics.panoptic_quality(pan, targets)["PQ"] > 0.8


def test_keypoint_heatmaps_round_trip_within_a_cell() -> None:
    _images, targets = _batch("pose", n=16)
    hm, vis = encode_targets("pose", targets, RES, RES // 4)
    assert hm.shape == (16, 14, 8, 8) and vis.shape == (16, 14)
    kp = decode_keypoints(hm, RES)
    gt = torch.stack([t["keypoints"] for t in targets])
    err = (kp - gt).norm(dim=-1)[vis.bool()]
    assert float(err.max()) <= 4.0  # within one 4-px cell
    assert float(err.median()) < 1.2  # sub-pixel refinement: mostly within a third of a cell
    ref = reference_size(gt, torch.stack([t["bbox"] for t in targets]))
    vis_b = torch.stack([t["visible"] for t in targets])
    assert metrics.pck(kp, gt, vis_b, ref) > 0.9


def test_focal_loss_prefers_the_truth() -> None:
    _images, targets = _batch("detection")
    hm = encode_targets("detection", targets, RES, RES // 4)[0]
    good, bad = focal_loss(_logit(hm * 0.98 + 0.01), hm), focal_loss(torch.zeros_like(hm), hm)
    assert 0 <= float(good) < float(bad)


def test_scores_are_fractions_for_every_task() -> None:
    torch.manual_seed(0)
    for task in ("classification", "semantic", "pose", "instance", "panoptic"):
        model = TaskModel(TinyResNet(in_chans=3, resolution=RES), task, width=16)
        images, targets = _batch(task)
        model.eval()
        with torch.no_grad():
            out = model(images)
        from aiop.tasks.train import predict

        preds, gts = predict(model, [(images, targets)])
        result = score(task, preds, gts)
        assert result and all(0.0 <= v <= 1.0 for v in result.values()), (task, result)
        assert out is not None


def _train(task: str, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = TaskModel(TinyResNet(in_chans=3, resolution=RES), task, width=16)
    cfg = TrainConfig(epochs=1, batch_size=16, resolution=RES, n_train=64, n_val=32, seed=seed)
    return train_task_model(model, cfg).metrics


def test_training_is_deterministic_and_learns() -> None:
    a, b = _train("semantic", 0), _train("semantic", 0)
    assert a == b
    torch.manual_seed(0)
    model = TaskModel(TinyResNet(in_chans=3, resolution=RES), "classification", width=16)
    cfg = TrainConfig(epochs=5, batch_size=16, resolution=RES, n_train=256, n_val=100, lr=3e-3)
    result = train_task_model(model, cfg)
    assert result.losses[-1] < result.losses[0]
    assert result.metrics["top1"] > 0.4  # chance is 0.1; about 0.65 after 5 epochs


def test_shared_head_round_trip(tmp_path) -> None:
    from aiop.tasks.shared_head import (
        SharedHeadConfig,
        load_head,
        pseudo_label,
        save_head,
        train_shared_head,
    )

    cfg = SharedHeadConfig(
        family="ofa_mbv3", task="semantic", pool_size=2, steps=3, batch_size=8,
        resolution=RES, n_train=32, width=16,
    )  # fmt: skip
    head, meta = train_shared_head(cfg)
    path = save_head(head, meta, tmp_path / "h.safetensors")
    state, meta2 = load_head(path)
    assert meta2["task"] == "semantic" and meta2["family"] == "ofa_mbv3"
    assert set(state) == set(head.state_dict())
    ft = TrainConfig(epochs=1, batch_size=8, resolution=RES, n_train=16, n_val=16)
    _model, result = pseudo_label("family:ofa_mbv3:3", "semantic", state, ft, width=16)
    assert 0.0 <= result.metrics["mIoU"] <= 1.0
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(HeadError, match="not a safetensors"):
        load_head(tmp_path / "bad.safetensors")
    with pytest.raises(HeadError, match="does not exist"):
        load_head(tmp_path / "missing.safetensors")
    with pytest.raises(HeadError, match="unknown shared-head mode"):
        SharedHeadConfig(family="ofa_mbv3", task="semantic", mode="teleport")


def test_latent_sampling_trains_only_the_head_and_swap_trains_bodies() -> None:
    from aiop.tasks import shared_head as sh

    for mode in ("latent", "swap"):
        cfg = sh.SharedHeadConfig(
            family="ofa_resnet", task="classification", pool_size=2, steps=2, batch_size=8,
            resolution=RES, n_train=16, width=16, mode=mode,
        )  # fmt: skip
        pool = sh.build_pool(cfg)
        assert pool[0].head is pool[1].head  # one head for the whole pool
        body = [p.detach().clone() for m in pool for p in m.blocks.parameters()]
        head0 = [p.detach().clone() for p in pool[0].head.parameters()]
        head, meta = sh.train_shared_head(cfg, pool=pool)
        moved = [
            not torch.equal(a, p)
            for a, p in zip(body, (p for m in pool for p in m.blocks.parameters()))
        ]
        assert any(not torch.equal(a, p) for a, p in zip(head0, head.parameters()))
        assert any(moved) == (mode == "swap"), mode
        # the shared head is built for the family's widest backbone
        assert meta["channels"][-1] >= max(m.info.channels[-1] for m in pool)
        assert meta["config"]["mode"] == mode
