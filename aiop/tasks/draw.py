"""A PNG grid of task samples with their targets drawn over them (matplotlib, Agg).

Boxes and labels for detection, coloured instance masks for instance and
panoptic segmentation, the class map for semantic segmentation, the skeleton
for pose (invisible joints hollow). Used to eyeball generated data and loaders.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from aiop.tasks.data import check_task
from aiop.tasks.digits import DataError
from aiop.tasks.pose import SKELETON

log = logging.getLogger(__name__)


def _show_target(ax: Any, task: str, image: np.ndarray, target: Any) -> None:
    import matplotlib.patches as patches
    from matplotlib import colormaps

    ax.imshow(image, interpolation="nearest")
    if task == "classification":
        ax.set_title(str(int(target)), fontsize=8)
        return
    if task == "pose":
        kp = torch.as_tensor(target["keypoints"]).numpy()
        vis = torch.as_tensor(target["visible"]).numpy().astype(bool)
        for a, b in SKELETON:
            ax.plot(kp[[a, b], 0], kp[[a, b], 1], "-", color="yellow", lw=0.8)
        ax.scatter(kp[vis, 0], kp[vis, 1], s=8, c="lime", zorder=3)
        ax.scatter(kp[~vis, 0], kp[~vis, 1], s=8, facecolors="none", edgecolors="red", zorder=3)
        x0, y0, x1, y1 = torch.as_tensor(target["bbox"]).tolist()
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=0.6))
        return
    cmap = colormaps["tab10"]
    labels = torch.as_tensor(target["labels"]).tolist()
    if task == "semantic":
        sem = torch.as_tensor(target["semantic"]).numpy()
        overlay = np.zeros((*sem.shape, 4))
        fg = sem > 0
        overlay[fg] = cmap((sem[fg] - 1) % 10)
        overlay[fg, 3] = 0.6
        ax.imshow(overlay, interpolation="nearest")
        return
    if task in ("instance", "panoptic"):
        masks = torch.as_tensor(target["masks"]).numpy()
        overlay = np.zeros((*masks.shape[1:], 4))
        for k, m in enumerate(masks):
            overlay[m > 0] = cmap(k % 10)
        overlay[..., 3] = np.where(masks.any(axis=0), 0.6, 0.0) if len(masks) else 0.0
        ax.imshow(overlay, interpolation="nearest")
    for box, label in zip(torch.as_tensor(target["boxes"]).tolist(), labels, strict=True):
        x0, y0, x1, y1 = box
        # Boxes are pixel-edge xyxy; imshow puts pixel centres at integers.
        ax.add_patch(
            patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=0.8)
        )
        ax.text(x0, y0 - 1, str(label), color="lime", fontsize=6, va="bottom")


def save_samples(
    dataset: Dataset, task: str, path: str | Path, *, n: int = 16, cols: int = 4
) -> Path:
    """Draw the first ``n`` items of ``dataset`` as a ``cols``-wide grid into ``path`` (PNG).

    The file is written to a temporary name and renamed, so an existing file is
    never left half-written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_task(task)
    n = min(n, len(dataset))
    if n < 1:
        raise DataError("no samples to draw: the data set is empty")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(f"sample grids are PNG files; got {path.name!r}")
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            image, target = dataset[i]
            img = torch.as_tensor(image).permute(1, 2, 0).clamp(0, 1).numpy()
            _show_target(axes.flat[i], task, img, target)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100, format="png")
            # mkstemp makes the file private; give it the permissions a plain open would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    log.info("wrote %d %s samples to %s", n, task, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m aiop.tasks.draw TASK OUT.png``: draw generated samples of a task."""
    import argparse
    import sys

    from aiop.tasks.data import TASKS, build_dataset

    parser = argparse.ArgumentParser(description="Draw generated samples of a task as a PNG grid.")
    parser.add_argument("task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--split", default="val")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--n", type=int, default=16, help="samples to draw")
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        ds = build_dataset(
            args.task, args.split, resolution=args.resolution, n=args.n, seed=args.seed
        )
        path = save_samples(ds, args.task, args.out, n=args.n, cols=args.cols)
    except ValueError as e:  # DataError: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
