"""The tasks data contract: item formats, scene and figure consistency, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aiop.tasks.data import (
    LSP_KEYPOINTS,
    NUM_CLASSES,
    NUM_KEYPOINTS,
    SCENE_TASKS,
    TASKS,
    build_dataset,
    collate_fn,
)
from aiop.tasks.digits import DataError, load_digits_split
from aiop.tasks.draw import save_samples
from aiop.tasks.pose import PoseConfig, generate_figures
from aiop.tasks.scenes import SceneConfig, generate_scenes, masks_to_boxes


def test_constants_follow_lsp():
    assert TASKS == ("classification", "detection", "instance", "semantic", "panoptic", "pose")
    assert NUM_CLASSES == 10 and NUM_KEYPOINTS == 14 == len(LSP_KEYPOINTS)
    assert LSP_KEYPOINTS[0] == "right_ankle" and LSP_KEYPOINTS[8] == "right_shoulder"
    assert LSP_KEYPOINTS[12:] == ("neck", "head_top")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("resolution", [32, 64])
def test_items_follow_the_contract(task, resolution):
    ds = build_dataset(task, "val", resolution=resolution, n=12)
    assert len(ds) == 12
    image, target = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    if task == "classification":
        assert target.dtype == torch.int64 and target.ndim == 0 and 0 <= int(target) < 10
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    elif task == "pose":
        assert target["keypoints"].shape == (14, 2) and target["keypoints"].dtype == torch.float32
        assert target["visible"].shape == (14,) and target["visible"].dtype == torch.bool
        assert target["bbox"].shape == (4,) and target["bbox"].dtype == torch.float32
    else:
        k = len(target["labels"])
        assert k >= 1
        assert target["boxes"].shape == (k, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64
        assert target["masks"].shape == (k, resolution, resolution)
        assert target["masks"].dtype == torch.uint8
        assert target["semantic"].shape == (resolution, resolution)
        assert target["semantic"].dtype == torch.int64
        assert target["image_id"] == 3
    # Items are fresh tensors: editing one does not change the data set.
    image.zero_()
    assert float(ds[3][0].max()) > 0


def test_scene_tasks_share_scenes_and_targets_are_consistent():
    items = {t: build_dataset(t, "test", n=40)[7] for t in SCENE_TASKS}
    ref_img, ref = items["detection"]
    for _, (img, tgt) in items.items():
        assert torch.equal(img, ref_img)
        assert all(torch.equal(tgt[k], ref[k]) for k in ("boxes", "labels", "masks", "semantic"))
    ds = build_dataset("instance", "test", n=40)
    counts = []
    for i in range(len(ds)):
        img, t = ds[i]
        masks, labels = t["masks"].numpy().astype(bool), t["labels"].numpy()
        counts.append(len(labels))
        assert set(labels.tolist()) <= set(range(10))
        # Instance masks never overlap and each is non-empty.
        assert masks.sum(axis=0).max() <= 1 and masks.reshape(len(masks), -1).any(axis=1).all()
        # Boxes are the tight boxes of the masks.
        np.testing.assert_array_equal(t["boxes"].numpy(), masks_to_boxes(masks))
        # The semantic map is background 0, digit class + 1 on each instance.
        sem = t["semantic"].numpy()
        expect = np.zeros_like(sem)
        for m, c in zip(masks, labels, strict=True):
            expect[m] = c + 1
        np.testing.assert_array_equal(sem, expect)
        # Masks are the ink of real digits: bright pixels, and nearly all ink is masked.
        grey = img[0].numpy()
        assert grey[masks.any(axis=0)].min() > 0.3
        assert (grey > 0.5).sum() <= masks.any(axis=0).sum()
    # Several digits per canvas, from one up to the configured maximum.
    assert min(counts) >= 1 and max(counts) <= SceneConfig().max_digits and np.mean(counts) > 1.8


@pytest.mark.parametrize("bound", [0.0, 0.1, 0.3])
def test_scene_overlap_is_bounded(bound):
    cfg = SceneConfig(resolution=48, min_digits=4, max_digits=6, max_overlap=bound)
    scenes = generate_scenes("val", 60, config=cfg)
    crowded, occluded = 0, 0
    for i in range(len(scenes)):
        masks = scenes.masks(i)
        visible = masks.reshape(len(masks), -1).sum(axis=1)
        ink = scenes.ink_areas[i]
        # Each later digit covers at most `bound` of an earlier digit's ink.
        assert (visible >= np.floor((1 - bound * (len(masks) - 1)) * ink)).all()
        assert (visible <= ink).all() and visible.min() > 0
        crowded += len(masks) >= 4
        occluded += int((visible < ink).sum())
    assert crowded > 10
    assert (occluded == 0) == (bound == 0.0)


def test_generation_is_deterministic_and_prefix_stable():
    a = generate_scenes("val", 30, seed=3)
    b = generate_scenes("val", 30, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.instances, b.instances)
    short = generate_scenes("val", 5, seed=3)
    np.testing.assert_array_equal(short.images, a.images[:5])
    other = generate_scenes("val", 30, seed=4)
    assert not np.array_equal(other.images, a.images)
    f1, f2 = generate_figures("train", 20, seed=1), generate_figures("train", 20, seed=1)
    np.testing.assert_array_equal(f1.images, f2.images)
    np.testing.assert_array_equal(f1.keypoints, f2.keypoints)
    assert not np.array_equal(generate_figures("val", 20, seed=1).keypoints, f1.keypoints)


def test_datasets_are_cached_in_memory():
    a = build_dataset("semantic", "val", n=10, seed=5)
    b = build_dataset("panoptic", "val", n=10, seed=5)
    assert a.scenes is b.scenes
    c = build_dataset("classification", "val", n=10, seed=5)
    assert build_dataset("classification", "val", n=10, seed=5) is c


def test_classification_matches_the_digit_split():
    split = load_digits_split("mnist", "val", 0)
    ds = build_dataset("classification", "val", resolution=28)
    assert len(ds) == len(split)
    np.testing.assert_allclose(ds[10][0][0].numpy(), split.images[10], atol=1e-5)
    assert int(ds[10][1]) == split.labels[10]
    sub = build_dataset("classification", "val", n=50)
    labels = [int(sub[i][1]) for i in range(len(sub))]
    assert len(set(labels)) == 10  # a seeded subset, not the first class only
    sk = build_dataset("classification", "train", resolution=16, source="sklearn")
    assert sk[0][0].shape == (3, 16, 16) and len(sk) == len(load_digits_split("sklearn"))


def test_pose_figures_are_plausible():
    figs = generate_figures("val", 200, config=PoseConfig(resolution=64))
    kp, vis, boxes, imgs = figs.keypoints, figs.visible, figs.bboxes, figs.images
    inside = (kp >= 0).all(axis=2) & (kp <= 63).all(axis=2)
    assert not (vis & ~inside).any()  # joints off the canvas are never visible
    assert 0.6 < vis.mean() < 0.97  # some joints are hidden, most are not
    assert (~vis & inside).any()  # occluders hide some joints on the canvas
    # Visible joints fall on painted limbs, brighter than any background.
    n_idx, j_idx = np.nonzero(vis)
    xs, ys = np.round(kp[n_idx, j_idx]).astype(int).T
    assert (imgs[n_idx, :, ys, xs].max(axis=1) > 0.45 * 255).mean() > 0.97
    # Boxes hold the figure's visible joints.
    vx, vy = kp[n_idx, j_idx].T
    assert (vx >= boxes[n_idx, 0]).all() and (vx <= boxes[n_idx, 2]).all()
    assert (vy >= boxes[n_idx, 1]).all() and (vy <= boxes[n_idx, 3]).all()
    # Anatomy: the torso is longer than the forearm, the head sits above the neck
    # for upright figures.
    torso = np.linalg.norm(kp[:, 12] - (kp[:, 2] + kp[:, 3]) / 2, axis=1)
    forearm = np.linalg.norm(kp[:, 6] - kp[:, 7], axis=1)
    assert (torso > forearm).all()
    upright = np.abs(np.arctan2(kp[:, 13, 0] - kp[:, 12, 0], kp[:, 12, 1] - kp[:, 13, 1])) < 1
    assert upright.mean() > 0.7


@pytest.mark.parametrize("task", ["classification", "detection", "pose"])
def test_collate_fn_with_a_dataloader(task):
    ds = build_dataset(task, "val", resolution=32, n=10)
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_fn(task))))
    assert images.shape == (4, 3, 32, 32)
    if task == "classification":
        assert targets.shape == (4,) and targets.dtype == torch.int64
    else:
        assert isinstance(targets, list) and len(targets) == 4 and isinstance(targets[0], dict)


def test_bad_input_fails_with_one_clear_message():
    with pytest.raises(DataError, match="unknown task 'depth'; choose one of classification, "):
        build_dataset("depth")
    with pytest.raises(DataError, match="unknown task"):
        collate_fn("segmentation")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        build_dataset("pose", "dev")
    with pytest.raises(DataError, match="at least 16 pixels, got 8"):
        build_dataset("detection", resolution=8)
    with pytest.raises(DataError, match="positive integer"):
        build_dataset("detection", n=0)
    with pytest.raises(DataError, match="exceeds the 500 mnist digits"):
        build_dataset("classification", "val", n=501)
    with pytest.raises(DataError, match="unknown digit source 'cifar'"):
        build_dataset("semantic", source="cifar")
    with pytest.raises(IndexError):
        build_dataset("pose", "val", n=3)[3]


@pytest.mark.parametrize("task", TASKS)
def test_sample_grid_is_written(tmp_path, task):
    ds = build_dataset(task, "val", resolution=32, n=6)
    out = save_samples(ds, task, tmp_path / "sub" / f"{task}.png", n=6, cols=3)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="PNG"):
        save_samples(ds, task, tmp_path / "x.jpg")


def test_draw_command(tmp_path, capsys):
    from aiop.tasks.draw import main

    out = tmp_path / "grid.png"
    assert main(["panoptic", str(out), "--n", "4", "--resolution", "32"]) == 0
    assert out.stat().st_size > 0
    assert main(["depth", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown task 'depth'; choose one of " + ", ".join(TASKS)]


def test_generated_data_match_their_recorded_fingerprints():
    """Pins "the same arguments give the same items on every machine": a change to the
    generators, or a platform whose numerics differ, shows up here."""
    import hashlib

    s = generate_scenes("test", 16, seed=0, config=SceneConfig(resolution=48))
    blob = s.images.tobytes() + s.instances.tobytes() + np.concatenate(s.labels).tobytes()
    assert hashlib.sha256(blob).hexdigest()[:16] == "d6c00eca4fedee94"
    f = generate_figures("test", 16, seed=0, config=PoseConfig(resolution=48))
    kp = np.round(f.keypoints.astype(np.float64), 2)
    blob = f.images.tobytes() + kp.tobytes() + f.visible.tobytes()
    assert hashlib.sha256(blob).hexdigest()[:16] == "36a88892fc43eadf"


def test_bad_generator_settings():
    with pytest.raises(DataError, match="max_digits <= 255"):
        SceneConfig(max_digits=300)
    with pytest.raises(DataError, match="max_overlap must be in"):
        SceneConfig(max_overlap=1.0)
    with pytest.raises(DataError, match="min_height <= max_height"):
        PoseConfig(min_height=0.9, max_height=0.5)
    with pytest.raises(DataError, match="at least 1"):
        generate_figures("val", 0)
