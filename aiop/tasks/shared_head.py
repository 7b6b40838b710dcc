"""AIO-P's shared head: one task head trained across many backbones of a family.

AIO-P labels detection, segmentation and pose cheaply: it trains ONE task
head over many sampled backbones of a family, then gives each architecture a
short fine-tune that starts from that head (a *pseudo-label*); a subset of
architectures is trained individually for the ground truth the pseudo-labels
are checked against (``run_train_head_on_task.py``, ``run_train_cgs_on_task.py
-chkpt``). AIO-P's backbones were ImageNet-pretrained OFA subnets; its two
ways of feeding the head were *latent sampling* (head trained on frozen
backbones' features, one backbone drawn per step) and *body swapping*.

Here no backbone is pretrained (nothing is downloaded), so:

* ``mode="swap"`` (default): each step draws one backbone of the pool and
  trains it together with the shared head, so the head learns to read features
  that are being learned, as every fine-tuned architecture's will be;
* ``mode="latent"``: AIO-P's latent sampling, the pool's backbones stay frozen
  at their (random) initialisation and only the head trains.

The pool is ``family:FAMILY:SEED`` for seeds ``pool_start … pool_start+P−1``
(disjoint from the labelled architectures by default), all built at the task
resolution. Backbones differ in width, so the head's lateral convolutions are
built for the family's widest backbone and read the leading channels of
narrower ones (:class:`~aiop.tasks.heads.ElasticConv2d`).

Checkpoints are one ``.safetensors`` file: the head's tensors and JSON
metadata (task, family, width, channels, resolution, steps); written to a
temporary file and renamed, so a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aiop.tasks.checkpoints import load_checkpoint, save_checkpoint
from aiop.tasks.heads import (
    DEFAULT_WIDTH,
    HeadError,
    TaskModel,
    build_head,
    check_task,
    load_head_state,
)
from aiop.tasks.train import (
    DEFAULT_RESOLUTION,
    TrainConfig,
    TrainResult,
    build_task_model,
    encode_targets,
    make_loader,
    train_task_model,
)

log = logging.getLogger(__name__)

MODES = ("swap", "latent")
FORMAT = "aiop.shared_head/1"
# Pool seeds start here unless told otherwise, far from the labelled architectures (0, 1, ...).
DEFAULT_POOL_START = 100_000


@dataclass
class SharedHeadConfig:
    """How the shared head is trained."""

    family: str
    task: str
    pool_size: int = 8
    pool_start: int = DEFAULT_POOL_START
    mode: str = "swap"
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    resolution: int | None = None  # None: the task's default (aiop.tasks.train)
    n_train: int | None = 1000
    data_seed: int = 0
    seed: int = 0
    width: int = DEFAULT_WIDTH
    # "supernet": the pool's backbones start from the family's supernet (aiop.tasks.supernet),
    # so latent sampling reads trained features, as AIO-P's did from OFA's
    init: str = "scratch"

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.mode not in MODES:
            raise HeadError(f"unknown shared-head mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.pool_size < 1 or self.steps < 1:
            raise HeadError("shared head needs pool_size >= 1 and steps >= 1")
        if self.resolution is None:
            self.resolution = DEFAULT_RESOLUTION[self.task]

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            resolution=self.resolution,
            n_train=self.n_train,
            data_seed=self.data_seed,
            seed=self.seed,
            init=self.init,
        )


def widest_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at the family's largest widths (its features are the widest any
    sample of the family can have at each tapped level)."""
    from aiop.models.families import MB_WIDTHS, RESNET_WIDTHS

    wide = copy.deepcopy(arch)
    if "width_mult" in wide:
        wide["width_mult"] = max(MB_WIDTHS)
    if "w" in wide:
        wide["w"] = [max(RESNET_WIDTHS)] * len(wide["w"])
    return wide


def family_channels(family: str, task: str, resolution: int, seed: int = 0) -> tuple[int, ...]:
    """Per-level feature channels of the family's widest backbone."""
    from aiop.models import build_arch, sample_arch

    backbone = build_arch(widest_arch(sample_arch(family, seed)), resolution=resolution)
    probe = TaskModel(backbone, task, resolution=resolution, name=f"widest {family}")
    return probe.info.channels


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def build_pool(cfg: SharedHeadConfig) -> list[TaskModel]:
    """The pool's task models, all sharing ONE head built for the family's widest backbone
    (in ``latent`` mode their backbones are frozen)."""
    torch.manual_seed(cfg.seed)
    channels = family_channels(cfg.family, cfg.task, cfg.resolution)
    head = build_head(cfg.task, channels, cfg.width)
    pool: list[TaskModel] = []
    for i in range(cfg.pool_size):
        spec = f"family:{cfg.family}:{cfg.pool_start + i}"
        member = build_task_model(
            spec, cfg.task, resolution=cfg.resolution, seed=cfg.seed + i, init=cfg.init
        )
        if len(member.info.channels) != len(channels):
            raise HeadError(
                f"{spec}: {len(member.info.channels)} feature levels, the shared head reads "
                f"{len(channels)}"
            )
        member.head = head  # the same module: every member trains the one head
        member.head_channels = channels
        if cfg.mode == "latent":
            for p in [*member.stem.parameters(), *member.blocks.parameters()]:
                p.requires_grad_(False)
        pool.append(member)
    return pool


def train_shared_head(
    cfg: SharedHeadConfig,
    *,
    progress: bool = False,
    loader: Any = None,
    pool: list[TaskModel] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one head over a pool of ``cfg.family`` backbones (:func:`build_pool` unless
    given); returns (head, metadata)."""
    from tqdm import tqdm

    pool = pool if pool is not None else build_pool(cfg)
    head = pool[0].head
    channels = pool[0].head_channels
    params: list[nn.Parameter] = list(head.parameters())
    if cfg.mode == "swap":
        params += [p for m in pool for p in [*m.stem.parameters(), *m.blocks.parameters()]]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    loader = loader or make_loader(
        cfg.task, "train", cfg.train_config(), shuffle=True, n=cfg.n_train
    )
    batches = _cycle(loader)
    rng = random.Random(f"shared-head:{cfg.family}:{cfg.task}:{cfg.seed}")
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for m in pool:
        m.train()
    for _ in tqdm(
        range(cfg.steps), desc=f"shared head {cfg.family}/{cfg.task}", disable=not progress
    ):
        if not order:  # each pass visits every backbone once, in a fresh random order
            order = list(range(len(pool)))
            rng.shuffle(order)
        member = pool[order.pop()]
        images, targets = next(batches)
        dense = encode_targets(cfg.task, targets, images.shape[-1], member.output_size)
        loss = member.loss(member(images), dense)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    meta = {
        "format": FORMAT,
        "family": cfg.family,
        "task": cfg.task,
        "channels": list(channels),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
    }
    return head, meta


def save_head(head: nn.Module, meta: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the head as one safetensors file (atomically: temporary file, then rename)."""
    return save_checkpoint(head.state_dict(), meta, path)


def load_head(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a shared-head checkpoint; :class:`HeadError` if it is not one."""
    return load_checkpoint(path, FORMAT, "shared-head", HeadError)


def pseudo_label(
    spec: str,
    task: str,
    head_state: dict[str, torch.Tensor],
    cfg: TrainConfig,
    *,
    width: int = DEFAULT_WIDTH,
    progress: bool = False,
) -> tuple[TaskModel, TrainResult]:
    """Fine-tune ``spec`` with the shared head as the head's starting point; its metric is the
    architecture's pseudo-label."""
    cfg = cfg.for_task(task)
    model = build_task_model(
        spec, task, resolution=cfg.resolution, seed=cfg.seed, width=width, init=cfg.init
    )
    load_head_state(model.head, head_state)
    result = train_task_model(model, cfg, progress=progress, desc=f"fine-tune {spec}")
    return model, result
