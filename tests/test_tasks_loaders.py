"""On-disk data set loaders, each on a tiny fixture the test writes into tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from aiop.tasks.digits import DataError
from aiop.tasks.draw import save_samples
from aiop.tasks.loaders import (
    LSP,
    MPII,
    MPII_TO_LSP,
    Cifar10,
    Cifar10C,
    CocoDetection,
    Office31,
)

# ---------------------------------------------------------------- CIFAR-10 (-C)


def _cifar_records(labels: list[int]) -> bytes:
    out = bytearray()
    for k, lab in enumerate(labels):
        img = np.zeros((3, 32, 32), dtype=np.uint8)
        img[0], img[1], img[2] = 10 * lab, k, 200  # red encodes the label, green the index
        img[0, 0, 1] = 255  # one marked pixel: row 0, column 1 of the red plane
        out += bytes([lab]) + img.tobytes()
    return bytes(out)


def _write_cifar_bin(root: Path) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}.bin").write_bytes(_cifar_records([i, (i + 3) % 10]))
    (d / "test_batch.bin").write_bytes(_cifar_records([7, 8, 9]))
    return d


def test_cifar10_binary(tmp_path):
    d = _write_cifar_bin(tmp_path)
    train, test = Cifar10(tmp_path, "train"), Cifar10(d, "test")
    assert len(train) == 10 and len(test) == 3
    x, y = test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 8
    assert x[0, 5, 5] == pytest.approx(80 / 255) and x[1, 5, 5] == pytest.approx(1 / 255)
    assert x[0, 0, 1] == 1.0 and x[0, 1, 0] != 1.0  # row-major planes, not transposed
    assert [int(train[i][1]) for i in range(4)] == [1, 4, 2, 5]
    assert Cifar10(tmp_path, "test", resolution=16)[0][0].shape == (3, 16, 16)


def test_cifar10_bad_files(tmp_path):
    d = _write_cifar_bin(tmp_path)
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_3\.bin: missing"):
        Cifar10(tmp_path, "train")
    (d / "test_batch.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match=r"test_batch\.bin: 100 bytes is not a whole number"):
        Cifar10(tmp_path, "test")
    with pytest.raises(DataError, match="unknown CIFAR-10 split"):
        Cifar10(tmp_path, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: missing data_batch_1\.bin"):
        Cifar10(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere: missing"):
        Cifar10(tmp_path / "nowhere")


def test_cifar10_pickled_needs_trust(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 4]}))
    with pytest.raises(DataError, match=r"pickled.*trust_pickle=True"):
        Cifar10(tmp_path, "test")
    ds = Cifar10(tmp_path, "test", trust_pickle=True)
    assert len(ds) == 2 and int(ds[1][1]) == 4
    assert ds[0][0][0, 0, 1] == pytest.approx(1 / 255)
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a pickled CIFAR-10 batch"):
        Cifar10(tmp_path, "test", trust_pickle=True)


def _write_cifar_c(root: Path, per: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    images = np.zeros((5 * per, 32, 32, 3), dtype=np.uint8)
    for s in range(5):
        images[s * per : (s + 1) * per] = 10 * (s + 1)  # pixel value encodes the severity
    np.save(root / "gaussian_noise.npy", images)
    np.save(root / "fog.npy", images)
    np.save(root / "labels.npy", np.arange(5 * per) % 10)


def test_cifar10c_severity_blocks(tmp_path):
    _write_cifar_c(tmp_path)
    ds = Cifar10C(tmp_path, "gaussian_noise", 3)
    assert len(ds) == 3
    assert all(ds[i][0].max() == pytest.approx(30 / 255) for i in range(3))
    assert [int(ds[i][1]) for i in range(3)] == [6, 7, 8]
    assert Cifar10C(tmp_path, "fog", 5, resolution=8)[2][0].shape == (3, 8, 8)


def test_cifar10c_bad_files(tmp_path):
    _write_cifar_c(tmp_path)
    with pytest.raises(DataError, match=r"snow\.npy: missing; corruptions here: fog, gaussian"):
        Cifar10C(tmp_path, "snow", 1)
    with pytest.raises(DataError, match=r"severity must be 1\.\.5"):
        Cifar10C(tmp_path, "fog", 6)
    (tmp_path / "fog.npy").write_text("garbage")
    with pytest.raises(DataError, match=r"fog\.npy: not a readable \.npy array"):
        Cifar10C(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"fog\.npy: not a readable"):
        Cifar10C(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 images \(N, 32, 32, 3\)"):
        Cifar10C(tmp_path, "fog", 1)
    np.save(tmp_path / "labels.npy", np.arange(4))
    with pytest.raises(DataError, match=r"labels\.npy: \(4,\) labels for 15 images"):
        Cifar10C(tmp_path, "gaussian_noise", 1)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(DataError, match=r"labels\.npy: missing"):
        Cifar10C(tmp_path, "gaussian_noise", 1)


# ---------------------------------------------------------------------- Office-31


def test_office31(tmp_path):
    for domain in ("amazon", "webcam"):
        for c, (name, colour) in enumerate((("bike", (255, 0, 0)), ("back_pack", (0, 0, 255)))):
            d = tmp_path / domain / "images" / name
            d.mkdir(parents=True)
            for k in range(2 + c):
                Image.new("RGB", (40, 30), colour).save(d / f"frame_{k:04d}.jpg")
    ds = Office31(tmp_path, "amazon", resolution=24)
    assert ds.classes == ("back_pack", "bike") and len(ds) == 5
    x, y = ds[0]
    assert x.shape == (3, 24, 24) and int(y) == 0 and x[2].mean() > 0.9 > 0.1 > x[0].mean()
    assert int(ds[4][1]) == 1 and ds[4][0][0].mean() > 0.9
    with pytest.raises(DataError, match="dslr/images: missing; domains here: amazon, webcam"):
        Office31(tmp_path, "dslr")
    (tmp_path / "amazon" / "images" / "bike" / "frame_0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"frame_0000\.jpg: not a readable image"):
        ds[3]
    empty = tmp_path / "other" / "dslr" / "images"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        Office31(tmp_path / "other", "dslr")


# ---------------------------------------------------------------------------- COCO


def _write_coco(root: Path) -> tuple[Path, Path]:
    from pycocotools import mask as mask_utils

    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(images / "a.png")
    Image.new("RGB", (20, 20), (0, 0, 0)).save(images / "b.png")
    rle_mask = np.zeros((20, 20), dtype=np.uint8, order="F")
    rle_mask[5:15, 2:8] = 1
    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode("ascii")  # compressed RLE, as COCO files hold it
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 30, "width": 40},
            {"id": 9, "file_name": "b.png", "height": 20, "width": 20},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {  # a polygon: the rectangle x 4..14, y 2..12
                "id": 1,
                "image_id": 7,
                "category_id": 5,
                "bbox": [4, 2, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [[4, 2, 14, 2, 14, 12, 4, 12]],
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 2,
                "bbox": [2, 5, 6, 10],
                "area": 60,
                "iscrowd": 0,
                "segmentation": rle,
            },
            {  # crowd regions are left out
                "id": 3,
                "image_id": 9,
                "category_id": 5,
                "bbox": [10, 10, 5, 5],
                "area": 25,
                "iscrowd": 1,
                "segmentation": rle,
            },
        ],
    }
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, images


def test_coco_detection(tmp_path):
    ann, images = _write_coco(tmp_path)
    ds = CocoDetection(ann, images)
    assert len(ds) == 2 and ds.categories == ("dog", "cat")
    x, t = ds[0]
    assert x.shape == (3, 30, 40) and t["image_id"] == 7
    assert t["boxes"].tolist() == [[4.0, 2.0, 14.0, 12.0]] and t["labels"].tolist() == [1]
    assert t["masks"].shape == (1, 30, 40) and 90 <= int(t["masks"].sum()) <= 121
    assert int((t["semantic"] == 2).sum()) == int(t["masks"].sum())
    x, t = ds[1]
    assert t["labels"].tolist() == [0] and len(t["boxes"]) == 1  # the crowd is gone
    assert int(t["masks"].sum()) == 60 and t["masks"][0, 5:15, 2:8].all()
    x, t = CocoDetection(ann, images, resolution=10)[1]
    assert x.shape == (3, 10, 10) and t["masks"].shape == (1, 10, 10)
    assert t["boxes"].tolist() == [[1.0, 2.5, 4.0, 7.5]]
    # Loader items draw like generated ones.
    assert save_samples(ds, "instance", tmp_path / "coco.png", n=2).stat().st_size > 0


def test_coco_bad_files(tmp_path):
    ann, images = _write_coco(tmp_path)
    good = json.loads(ann.read_text())
    ann.write_text("{not json")
    with pytest.raises(DataError, match=r"instances\.json: not valid JSON"):
        CocoDetection(ann, images)
    ann.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match="lacks a 'annotations' list"):
        CocoDetection(ann, images)
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["image_id"] = 99
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"annotations\[0\] names unknown image 99"):
        CocoDetection(ann, images)
    bad = json.loads(json.dumps(good))
    del bad["images"][1]["height"]
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"images\[1\] lacks height"):
        CocoDetection(ann, images)
    with pytest.raises(DataError, match=r"missing\.json: missing"):
        CocoDetection(tmp_path / "missing.json", images)
    ann.write_text(json.dumps(good))
    (images / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png: missing image"):
        CocoDetection(ann, images)[0]
    Image.new("RGB", (10, 10)).save(images / "a.png")
    with pytest.raises(DataError, match=r"a\.png: image is 10×10 but instances\.json says 40×30"):
        CocoDetection(ann, images)[0]


# ---------------------------------------------------------------------------- pose


def _dot_image(path: Path, size: tuple[int, int], points: np.ndarray) -> None:
    """A dark image with a 3×3 white dot at each (x, y)."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for x, y in np.round(points).astype(int):
        if 0 <= x < w and 0 <= y < h:
            arr[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 255
    Image.fromarray(arr).save(path)


def _lsp_fixture(root: Path, extended: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = 3
    kp = np.stack([rng.uniform(2, 38, (n, 14)), rng.uniform(2, 18, (n, 14))], axis=2)
    flag = np.zeros((n, 14))
    flag[:, :4] = 1
    joints = np.concatenate([kp, flag[..., None]], axis=2)  # (N, 14, 3)
    (root / "images").mkdir(parents=True)
    for i in range(n):
        _dot_image(root / "images" / f"im{i + 1:04d}.jpg", (40, 20), kp[i, 12:13])
    arr = joints.transpose(1, 2, 0) if extended else joints.transpose(2, 1, 0)
    savemat(root / "joints.mat", {"joints": arr})
    return kp


@pytest.mark.parametrize("extended", [False, True])
def test_lsp_layouts_and_visibility(tmp_path, extended):
    kp = _lsp_fixture(tmp_path, extended)
    ds = LSP(tmp_path, resolution=80)  # 40×20 padded to 40×40, then ×2
    assert len(ds) == 3 and ds.layout == ("lspet" if extended else "lsp")
    x, t = ds[1]
    assert x.shape == (3, 80, 80)
    np.testing.assert_allclose(t["keypoints"].numpy(), (kp[1] + 0.5) * 2 - 0.5, rtol=1e-5)
    # LSP flags occluded joints (flag 1 = hidden); LSP-extended flags visible ones.
    expect = np.arange(14) >= 4 if not extended else np.arange(14) < 4
    np.testing.assert_array_equal(t["visible"].numpy(), expect)
    # The dot drawn at the neck lands where the keypoint says.
    nx, ny = t["keypoints"][12].round().long().tolist()
    assert x[:, ny, nx].mean() > 0.5
    assert save_samples(ds, "pose", tmp_path / "lsp.png", n=3).stat().st_size > 0
    forced = LSP(tmp_path, resolution=80, visibility="visible")[1][1]["visible"].numpy()
    np.testing.assert_array_equal(forced, np.arange(14) < 4)


def test_lsp_bad_files(tmp_path):
    _lsp_fixture(tmp_path, False)
    (tmp_path / "images" / "im0002.jpg").unlink()
    with pytest.raises(DataError, match=r"2 images for 3 annotated poses in joints\.mat"):
        LSP(tmp_path)
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((2, 14, 3))})
    with pytest.raises(DataError, match=r"joints must be 3 × 14 × N or 14 × 3 × N, got \(2, 14"):
        LSP(tmp_path)
    savemat(tmp_path / "joints.mat", {"points": np.zeros((3, 14, 2))})
    with pytest.raises(DataError, match=r"joints\.mat: lacks a 'joints' array"):
        LSP(tmp_path)
    (tmp_path / "joints.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(DataError, match=r"joints\.mat: not a readable MATLAB file"):
        LSP(tmp_path)
    (tmp_path / "joints.mat").unlink()
    with pytest.raises(DataError, match=r"joints\.mat: missing"):
        LSP(tmp_path)
    with pytest.raises(DataError, match="visibility must be"):
        LSP(tmp_path, visibility="maybe")


def _mpii_fixture(root: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    # 1-based MATLAB coordinates around a person centred at (50, 40) with scale 0.3
    # (crop side 1.25 · 200 · 0.3 = 75 px).
    joints = np.stack([rng.uniform(30, 70, 16), rng.uniform(20, 60, 16)], axis=1)
    vis = np.ones(16)
    vis[[0, 7]] = 0
    _dot_image(root / "images" / "000001.jpg", (100, 80), joints[[9]] - 1)
    rec = {
        "image": "000001.jpg",
        "joints": joints.tolist(),
        "joints_vis": vis.tolist(),
        "center": [50.0, 36.5],
        "scale": 0.3,
    }
    ann = root / "train.json"
    ann.write_text(json.dumps([rec, {**rec, "scale": 0.6}]))
    return ann, joints


def test_mpii_maps_16_joints_to_lsp(tmp_path):
    ann, joints = _mpii_fixture(tmp_path)
    ds = MPII(ann, tmp_path / "images", resolution=75)  # 75-px crop: scale 1
    assert len(ds) == 2
    x, t = ds[0]
    assert x.shape == (3, 75, 75) and t["keypoints"].shape == (14, 2)
    # Centre (50, 36.5) + 15·0.3 down − 1 → (49, 40); the 75-px crop starts at (11.5, 2.5),
    # taken from the nearest pixel edge (12, 3).
    expect = joints[list(MPII_TO_LSP)] - 1 - np.array([12, 3])
    np.testing.assert_allclose(t["keypoints"].numpy(), expect, atol=1e-4)
    vis = t["visible"].numpy()
    assert not vis[0] and vis[1:].all()  # MPII joint 0 (r-ankle) was unlabelled
    # LSP's head top is MPII's joint 9: the dot drawn there is where the keypoint says.
    hx, hy = t["keypoints"][13].round().long().tolist()
    assert x[:, hy, hx].mean() > 0.5
    assert MPII_TO_LSP[12:] == (8, 9)


def test_mpii_bad_files(tmp_path):
    ann, _ = _mpii_fixture(tmp_path)
    recs = json.loads(ann.read_text())
    del recs[1]["joints_vis"]
    ann.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"train\.json: record 1 lacks joints_vis"):
        MPII(ann, tmp_path / "images")
    recs[1]["joints_vis"] = [1] * 16
    recs[1]["joints"] = recs[1]["joints"][:14]
    ann.write_text(json.dumps(recs))
    with pytest.raises(DataError, match="record 1 needs 16 joints"):
        MPII(ann, tmp_path / "images")
    ann.write_text(json.dumps({"annolist": []}))
    with pytest.raises(DataError, match="expected a list of person records"):
        MPII(ann, tmp_path / "images")
    ann.write_text("[{")
    with pytest.raises(DataError, match=r"train\.json: not valid JSON"):
        MPII(ann, tmp_path / "images")


def test_open_dataset_by_name(tmp_path):
    from aiop.tasks.loaders import LOADERS, open_dataset

    _write_cifar_c(tmp_path)
    ds = open_dataset("cifar10c", tmp_path, "fog", 2)
    assert isinstance(ds, Cifar10C) and ds.severity == 2
    assert set(LOADERS) == {"cifar10", "cifar10c", "office31", "coco", "lsp", "mpii"}
    with pytest.raises(DataError, match="unknown data set 'imagenet'; choose one of cifar10, "):
        open_dataset("imagenet", tmp_path)
