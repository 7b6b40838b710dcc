"""Loaders for real data sets a user already has on disk (nothing is downloaded).

Each returns a ``torch.utils.data.Dataset`` whose items follow the task data
contract of :mod:`aiop.tasks.data` where it applies: images float32
``[3, H, W]`` in [0, 1]; classification labels int64 scalars; detection and
segmentation targets dicts with ``boxes`` (xyxy pixels), ``labels``, ``masks``,
``semantic``, ``image_id``; pose targets dicts with ``keypoints`` ``[14, 2]``
(x, y) in LSP order, ``visible`` and ``bbox``.

==============  =====================================================================
``Cifar10``     ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``; the pickled
                python version only with ``trust_pickle=True`` (no pickle from users
                by default, see DESIGN).
``Cifar10C``    ``<corruption>.npy`` (``5·M × 32 × 32 × 3`` uint8, severities 1–5 in
                blocks of ``M`` rows; ``M`` = 10,000 in the release) and ``labels.npy``.
``Office31``    ``<root>/<domain>/images/<class>/*.jpg``.
``CocoDetection``  an instances annotation JSON and its image folder (pycocotools
                turns polygons and RLE into masks); crowd regions are left out.
``LSP``         ``joints.mat`` and ``images/``: LSP's ``3 × 14 × N`` (third row 1 =
                occluded) or LSP-extended's ``14 × 3 × N`` (third column 1 = visible).
``MPII``        the widely used JSON conversion (``train.json`` / ``valid.json`` /
                ``mpii_annotations.json``: ``image``, ``joints``, ``joints_vis``,
                ``center``, ``scale``), 16 joints mapped to LSP's 14.
==============  =====================================================================

Every file problem is a :class:`~aiop.tasks.digits.DataError` whose one line
names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from aiop.tasks.corruptions import CORRUPTIONS
from aiop.tasks.digits import DataError
from aiop.tasks.pose import NUM_KEYPOINTS

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# The 15 corruptions of Hendrycks & Dietterich (2019) and the 4 extra ones of the release.
CIFAR10C_CORRUPTIONS: tuple[str, ...] = (
    *CORRUPTIONS,
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
OFFICE31_DOMAINS: tuple[str, ...] = ("amazon", "dslr", "webcam")
# MPII's 16 joints: 0 r-ankle, 1 r-knee, 2 r-hip, 3 l-hip, 4 l-knee, 5 l-ankle, 6 pelvis,
# 7 thorax, 8 upper neck, 9 head top, 10 r-wrist, 11 r-elbow, 12 r-shoulder,
# 13 l-shoulder, 14 l-elbow, 15 l-wrist. LSP's neck is MPII's upper neck.
MPII_TO_LSP: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 8, 9)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# ---------------------------------------------------------------------- helpers


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: missing ({what})")
    return path


def _open_image(path: Path) -> Image.Image:
    """An RGB Pillow image, or a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: missing image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e.__class__.__name__})") from e


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[C, H, W]`` to ``size`` (h, w), kept in [0, 1]."""
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return y[0].clamp_(0.0, 1.0)


def _check_resolution(resolution: int | None) -> None:
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"resolution must be a positive integer or None, got {resolution!r}")


def _load_json(path: Path) -> Any:
    _need(path, "annotation JSON")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text, so not a JSON annotation file") from e


# ----------------------------------------------------------------- CIFAR-10 (-C)


class _ArrayClassification(Dataset):
    """Images ``(N, 32, 32, 3)`` uint8 (array or memory map) with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, resolution: int | None) -> None:
        _check_resolution(resolution)
        self.images = images
        self.labels = labels
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(self.images[i], dtype=np.uint8)).permute(2, 0, 1)
        x = x.float().div_(255.0)
        if self.resolution is not None:
            x = _resize(x, (self.resolution, self.resolution))
        return x, torch.tensor(int(self.labels[i]), dtype=torch.int64)


class Cifar10(_ArrayClassification):
    """CIFAR-10 from its binary release (or, trusted, its pickled python release).

    ``root`` is the folder that holds ``cifar-10-batches-bin`` (or
    ``cifar-10-batches-py``), or that folder itself.
    """

    RECORD = 1 + 3 * 32 * 32

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        resolution: int | None = None,
        trust_pickle: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"unknown CIFAR-10 split {split!r}; choose train or test")
        root = _need(Path(root), "CIFAR-10 folder")
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        binary = next(
            (d for d in (root / "cifar-10-batches-bin", root) if (d / f"{names[0]}.bin").exists()),
            None,
        )
        pickled = next(
            (d for d in (root / "cifar-10-batches-py", root) if (d / names[0]).is_file()), None
        )
        if binary is not None:
            images, labels = zip(*(self._read_bin(binary / f"{n}.bin") for n in names), strict=True)
        elif pickled is not None:
            if not trust_pickle:
                raise DataError(
                    f"{pickled / names[0]}: the python CIFAR-10 release is pickled; use the "
                    "binary release, or pass trust_pickle=True for files you trust"
                )
            images, labels = zip(*(self._read_pickle(pickled / n) for n in names), strict=True)
        else:
            raise DataError(
                f"{root}: missing {names[0]}.bin (expected cifar-10-batches-bin/ from the "
                "binary CIFAR-10 release)"
            )
        super().__init__(np.concatenate(images), np.concatenate(labels), resolution)
        self.split = split
        self.classes = CIFAR10_CLASSES

    @classmethod
    def _read_bin(cls, path: Path) -> tuple[np.ndarray, np.ndarray]:
        raw = np.fromfile(_need(path, "CIFAR-10 batch"), dtype=np.uint8)
        if raw.size == 0 or raw.size % cls.RECORD:
            raise DataError(
                f"{path}: {raw.size} bytes is not a whole number of {cls.RECORD}-byte "
                "CIFAR-10 records"
            )
        rec = raw.reshape(-1, cls.RECORD)
        labels = rec[:, 0].astype(np.int64)
        if labels.max() > 9:
            raise DataError(f"{path}: label {labels.max()} outside 0..9; not a CIFAR-10 batch")
        # Each record is label, then 1024 red, 1024 green, 1024 blue bytes, row-major.
        images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels

    @staticmethod
    def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with path.open("rb") as f:
                # Reached only with trust_pickle=True.
                d = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise DataError(f"{path}: not a pickled CIFAR-10 batch ({e})") from e
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: lacks CIFAR-10 data/labels ({e})") from e
        return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels


class Cifar10C(_ArrayClassification):
    """One corruption at one severity (1–5) of CIFAR-10-C, read by memory map."""

    def __init__(
        self,
        root: str | Path,
        corruption: str,
        severity: int,
        *,
        resolution: int | None = None,
    ) -> None:
        root = _need(Path(root), "CIFAR-10-C folder")
        if not isinstance(severity, int) or not 1 <= severity <= 5:
            raise DataError(f"CIFAR-10-C severity must be 1..5, got {severity!r}")
        path = root / f"{corruption}.npy"
        if not path.is_file():
            present = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
            raise DataError(f"{path}: missing; corruptions here: {', '.join(present) or 'none'}")
        images = self._load(path)
        labels = self._load(_need(root / "labels.npy", "CIFAR-10-C labels"))
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
            raise DataError(
                f"{path}: expected uint8 images (N, 32, 32, 3), got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{root / 'labels.npy'}: {labels.shape} labels for {len(images)} images"
            )
        if len(images) % 5:
            raise DataError(f"{path}: {len(images)} rows do not split into 5 severities")
        per = len(images) // 5
        rows = slice(per * (severity - 1), per * severity)
        super().__init__(images[rows], np.asarray(labels[rows], dtype=np.int64), resolution)
        self.corruption = corruption
        self.severity = severity

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            # No pickle: object arrays are refused, not executed.
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from e


# ---------------------------------------------------------------------- Office-31


class Office31(Dataset):
    """One Office-31 domain: ``<root>/<domain>/images/<class>/*.jpg``, classes sorted."""

    def __init__(self, root: str | Path, domain: str, *, resolution: int = 224) -> None:
        _check_resolution(resolution)
        root = _need(Path(root), "Office-31 folder")
        images_dir = root / domain / "images"
        if not images_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
            raise DataError(f"{images_dir}: missing; domains here: {', '.join(present) or 'none'}")
        self.classes = tuple(sorted(p.name for p in images_dir.iterdir() if p.is_dir()))
        self.samples: list[tuple[Path, int]] = [
            (f, c)
            for c, name in enumerate(self.classes)
            for f in sorted((images_dir / name).iterdir())
            if f.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise DataError(f"{images_dir}: no class folders with images")
        self.domain = domain
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        x = _resize(_to_tensor(_open_image(path)), (self.resolution, self.resolution))
        return x, torch.tensor(label, dtype=torch.int64)


# ---------------------------------------------------------------------------- COCO


class CocoDetection(Dataset):
    """COCO-format instances: boxes (xyxy), contiguous labels, masks, class map.

    ``labels`` index :attr:`categories` (the file's categories sorted by id);
    ``semantic`` is 0 for background and ``label + 1`` elsewhere, later
    instances on top. With ``resolution`` the image is stretched to ``R × R`` and
    boxes and masks follow.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        *,
        resolution: int | None = None,
    ) -> None:
        from pycocotools.coco import COCO

        _check_resolution(resolution)
        path = Path(annotation_file)
        data = _load_json(path)
        self._validate(path, data)
        self.image_dir = _need(Path(image_dir), "COCO image folder")
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        cat_ids = sorted(c["id"] for c in data["categories"])
        self.cat_to_label = {c: k for k, c in enumerate(cat_ids)}
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.categories = tuple(names[c] for c in cat_ids)
        self.image_ids = sorted(self.coco.imgs)
        self.resolution = resolution
        self.path = path

    @staticmethod
    def _validate(path: Path, data: Any) -> None:
        if not isinstance(data, dict):
            raise DataError(f"{path}: not a COCO instances file (top level is not an object)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{path}: not a COCO instances file: lacks a {key!r} list")
        image_ids = set()
        for k, img in enumerate(data["images"]):
            missing = [f for f in ("id", "file_name", "height", "width") if f not in img]
            if missing:
                raise DataError(f"{path}: images[{k}] lacks {', '.join(missing)}")
            image_ids.add(img["id"])
        cat_ids = {c.get("id") for c in data["categories"]}
        for k, ann in enumerate(data["annotations"]):
            missing = [f for f in ("id", "image_id", "category_id", "bbox") if f not in ann]
            if missing:
                raise DataError(f"{path}: annotations[{k}] lacks {', '.join(missing)}")
            if ann["image_id"] not in image_ids:
                raise DataError(f"{path}: annotations[{k}] names unknown image {ann['image_id']}")
            if ann["category_id"] not in cat_ids:
                raise DataError(
                    f"{path}: annotations[{k}] names unknown category {ann['category_id']}"
                )
            if len(ann["bbox"]) != 4:
                raise DataError(f"{path}: annotations[{k}] bbox must be [x, y, w, h]")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        x = _to_tensor(_open_image(self.image_dir / info["file_name"]))
        h, w = x.shape[-2:]
        if (h, w) != (info["height"], info["width"]):
            raise DataError(
                f"{self.image_dir / info['file_name']}: image is {w}×{h} but {self.path.name} "
                f"says {info['width']}×{info['height']}"
            )
        anns = [
            a
            for a in self.coco.imgToAnns.get(image_id, [])
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns])
        masks = torch.zeros((len(anns), h, w), dtype=torch.uint8)
        for k, a in enumerate(anns):
            if a.get("segmentation"):
                try:
                    with warnings.catch_warnings():
                        # pycocotools' decoder predates numpy 2's copy keyword and says so.
                        warnings.simplefilter("ignore", DeprecationWarning)
                        mask = self.coco.annToMask(a)
                    masks[k] = torch.from_numpy(mask)
                except (TypeError, ValueError, KeyError, IndexError) as e:
                    raise DataError(
                        f"{self.path}: annotation {a['id']} has a malformed segmentation ({e})"
                    ) from e
            else:  # a box-only annotation: its mask is its box
                x0, y0, x1, y1 = boxes[k].round().long().tolist()
                masks[k, y0:y1, x0:x1] = 1
        if self.resolution is not None:
            r = self.resolution
            x = _resize(x, (r, r))
            boxes = boxes * torch.tensor([r / w, r / h, r / w, r / h])
            if len(anns):
                masks = F.interpolate(masks[None].float(), size=(r, r), mode="nearest")[0]
                masks = masks.to(torch.uint8)
            else:
                masks = torch.zeros((0, r, r), dtype=torch.uint8)
        semantic = torch.zeros(masks.shape[-2:], dtype=torch.int64)
        for m, c in zip(masks, labels.tolist(), strict=True):
            semantic[m.bool()] = c + 1
        target = {
            "boxes": boxes,
            "labels": labels.to(torch.int64),
            "masks": masks,
            "semantic": semantic,
            "image_id": int(image_id),
        }
        return x, target


# ---------------------------------------------------------------------------- pose


def _letterbox(img: Image.Image, kp: np.ndarray, r: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pad an image to a square (top-left aligned) and resize to ``r``; keypoints follow."""
    w, h = img.size
    side = max(w, h)
    x = torch.zeros(3, side, side)
    x[:, :h, :w] = _to_tensor(img)
    scale = r / side
    # Pixel centres at integers: x' = (x + 0.5) · s − 0.5.
    return _resize(x, (r, r)), (kp + 0.5) * scale - 0.5


def _pose_target(kp: np.ndarray, visible: np.ndarray, r: int, image_id: int) -> dict[str, Any]:
    inside = (kp >= 0).all(axis=1) & (kp <= r - 1).all(axis=1)
    vis = visible & inside
    pts = kp[vis] if vis.any() else kp
    box = np.clip(np.concatenate([pts.min(axis=0), pts.max(axis=0)]), 0, r)
    return {
        "keypoints": torch.from_numpy(kp.astype(np.float32)),
        "visible": torch.from_numpy(vis),
        "bbox": torch.from_numpy(box.astype(np.float32)),
        "image_id": image_id,
    }


class LSP(Dataset):
    """Leeds Sports Pose (or LSP-extended): ``joints.mat`` and ``images/``.

    ``visibility`` says what the third joint value means: ``"auto"`` follows the
    layout (``3 × 14 × N``: LSP, 1 = occluded; ``14 × 3 × N``: LSP-extended,
    1 = visible), ``"occluded"`` or ``"visible"`` force one reading. Images are
    padded to a square and resized to ``R``; keypoints follow.
    """

    def __init__(self, root: str | Path, *, resolution: int = 64, visibility: str = "auto") -> None:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        _check_resolution(resolution)
        if visibility not in ("auto", "occluded", "visible"):
            raise DataError(f"visibility must be auto, occluded or visible, got {visibility!r}")
        root = _need(Path(root), "LSP folder")
        path = _need(root / "joints.mat", "LSP joint annotations")
        try:
            mat = loadmat(path)
        except (MatReadError, ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable MATLAB file ({e})") from e
        if "joints" not in mat:
            raise DataError(f"{path}: lacks a 'joints' array")
        j = np.asarray(mat["joints"], dtype=np.float64)
        if j.ndim == 2:  # a single image saved without its trailing axis
            j = j[..., None]
        if j.ndim != 3:
            raise DataError(f"{path}: joints must be 3 × 14 × N or 14 × 3 × N, got {j.shape}")
        if j.shape[:2] == (3, NUM_KEYPOINTS):
            layout, j = "lsp", j.transpose(2, 1, 0)  # → (N, 14, 3)
        elif j.shape[:2] == (NUM_KEYPOINTS, 3):
            layout, j = "lspet", j.transpose(2, 0, 1)
        else:
            raise DataError(f"{path}: joints must be 3 × 14 × N or 14 × 3 × N, got {j.shape}")
        flag = j[:, :, 2] > 0.5
        occluded_flag = visibility == "occluded" or (visibility == "auto" and layout == "lsp")
        self.visible = ~flag if occluded_flag else flag
        self.keypoints = j[:, :, :2]
        images_dir = _need(root / "images", "LSP image folder")
        self.images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if len(self.images) != len(j):
            raise DataError(
                f"{images_dir}: {len(self.images)} images for {len(j)} annotated poses in "
                f"{path.name}"
            )
        self.layout = layout
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x, kp = _letterbox(_open_image(self.images[i]), self.keypoints[i], self.resolution)
        return x, _pose_target(kp, self.visible[i].copy(), self.resolution, i)


class MPII(Dataset):
    """MPII single persons from the common JSON conversion, as LSP's 14 joints.

    Each record is cropped around its person as HRNet does (centre moved down by
    15·scale px, box side 1.25 · 200 · scale px, MATLAB's 1-based coordinates
    made 0-based) and resized to ``R``.
    """

    FIELDS = ("image", "joints", "joints_vis", "center", "scale")

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path, *, resolution: int = 64
    ) -> None:
        _check_resolution(resolution)
        path = Path(annotation_file)
        data = _load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of person records")
        self.records: list[dict[str, Any]] = []
        for k, rec in enumerate(data):
            self.records.append(self._parse(path, k, rec))
        if not self.records:
            raise DataError(f"{path}: no person records")
        self.image_dir = _need(Path(image_dir), "MPII image folder")
        self.resolution = resolution
        self.path = path

    def _parse(self, path: Path, k: int, rec: Any) -> dict[str, Any]:
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {k} is not an object")
        missing = [f for f in self.FIELDS if f not in rec]
        if missing:
            raise DataError(f"{path}: record {k} lacks {', '.join(missing)}")
        try:
            joints = np.asarray(rec["joints"], dtype=np.float64)
            vis = np.asarray(rec["joints_vis"], dtype=np.float64)
            center = np.asarray(rec["center"], dtype=np.float64)
            scale = float(rec["scale"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: record {k} has non-numeric joints/center/scale") from e
        if joints.shape != (16, 2) or vis.shape != (16,) or center.shape != (2,):
            raise DataError(
                f"{path}: record {k} needs 16 joints [x, y], 16 joints_vis and a 2-d center; "
                f"got {joints.shape}, {vis.shape}, {center.shape}"
            )
        if not scale > 0:
            raise DataError(f"{path}: record {k} has scale {scale}; must be positive")
        # HRNet's MPII recipe: centre down by 15·scale, box 1.25× larger, 0-based pixels.
        center = center + np.array([0.0, 15.0 * scale]) - 1.0
        side = 200.0 * scale * 1.25
        return {
            "image": str(rec["image"]),
            "joints": joints[list(MPII_TO_LSP)] - 1.0,
            "visible": vis[list(MPII_TO_LSP)] > 0,
            "box": (*(center - side / 2), *(center + side / 2)),
        }

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rec = self.records[i]
        r = self.resolution
        img = _open_image(self.image_dir / rec["image"])
        x0, y0, x1, _ = rec["box"]
        # A whole-pixel square: start at the nearest pixel edge, keep the side exact.
        ix0, iy0 = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
        side = max(1, round(x1 - x0))
        # Pillow pads a crop beyond the image with black.
        crop = img.crop((ix0, iy0, ix0 + side, iy0 + side))
        x = _resize(_to_tensor(crop), (r, r))
        kp = (rec["joints"] - [ix0, iy0] + 0.5) * (r / side) - 0.5
        return x, _pose_target(kp, rec["visible"].copy(), r, i)


# Name → (loader, the task its items serve).
LOADERS: dict[str, tuple[type[Dataset], str]] = {
    "cifar10": (Cifar10, "classification"),
    "cifar10c": (Cifar10C, "classification"),
    "office31": (Office31, "classification"),
    "coco": (CocoDetection, "instance"),
    "lsp": (LSP, "pose"),
    "mpii": (MPII, "pose"),
}


def open_dataset(name: str, *args: Any, **kwargs: Any) -> Dataset:
    """The on-disk data set ``name`` (a key of :data:`LOADERS`), built with the
    loader's own arguments, e.g. ``open_dataset("cifar10c", root, "fog", 3)``."""
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name][0](*args, **kwargs)
