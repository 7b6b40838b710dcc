"""Once-for-All weight sharing: one supernet per family, every architecture inherits from it.

AIO-P's architectures were subnets of OFA's ImageNet supernets: each one started
from weights it inherited, so its task label measured the architecture rather
than the luck of one random initialisation. Nothing is downloaded here, so
this module trains the supernet itself, on the classification digits:

* the supernet is the family's largest architecture (every stage at its
  deepest, every kernel and expand ratio and width at its largest) with the
  classification head;
* :func:`train_supernet` uses OFA's *sandwich rule*: every step back-propagates
  the largest, the smallest and ``n_random`` random architectures of the family
  into the one set of weights. A subnet's weights are views of the supernet's
  (leading channels, the centre of each kernel, the first blocks of each stage),
  passed through :func:`torch.func.functional_call`, so its gradients land in
  the supernet's slices;
* :func:`inherit` copies an architecture's slices into a built task model
  (backbone only by default: the task head is trained by the label recipe).

A label recipe with ``init="supernet"`` (:class:`aiop.tasks.train.TrainConfig`)
starts every architecture from its inherited backbone; :func:`ensure_supernet`
trains the family's supernet on first use into the cache directory (a few
minutes on one core, once) and reuses it afterwards.

The same config trained on another machine is another supernet: floating-point sums
run in another order, the weights drift apart, and the subnets' labels rank
differently (26 ofa_mbv3 classification labels: Spearman 0.18 between two instances).
:func:`supernet_identity` hashes the weights; every inherited label records it, and
a label set refuses a family's labels from a second instance
(:func:`aiop.tasks.labels.check_supernet`).

Checkpoints are one ``.safetensors`` file with JSON metadata (format, config,
steps, accuracy of the largest and smallest architecture); a run saves after
every epoch, with the optimizer's moments, and resumes from there when killed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aiop.tasks.checkpoints import load_checkpoint, save_checkpoint
from aiop.tasks.heads import DEFAULT_WIDTH, HeadError, TaskModel

log = logging.getLogger(__name__)

FORMAT = "aiop.supernet/1"
MB_FAMILIES = ("ofa_mbv3", "ofa_pn")
# ofa_resnet's base depths per stage; the elastic depth adds 0-2 blocks to each
_RESNET_BASE = (2, 2, 4, 2)


class SupernetError(ValueError):
    """A supernet checkpoint is missing, malformed, or of another family or config."""


# --------------------------------------------------------------------------- architectures
def _n_stages(family: str) -> int:
    return 5 if family == "ofa_mbv3" else 6


def _extreme_arch(family: str, pick: Any, seed: int, resolution: int) -> dict[str, Any]:
    """Every elastic choice of ``family`` at ``pick`` (max or min) of its options."""
    from aiop.models.families import (
        DEPTHS,
        EXPANDS,
        KERNELS,
        MB_WIDTHS,
        RESNET_DEPTHS,
        RESNET_EXPANDS,
        RESNET_WIDTHS,
        sample_arch,
    )

    arch = sample_arch(family, 0)
    arch.update(seed=seed, resolution=resolution)
    if family in MB_FAMILIES:
        depths = [pick(DEPTHS)] * 5 + [1] * (_n_stages(family) - 5)
        arch.update(
            width_mult=pick(MB_WIDTHS),
            d=depths[:5],
            ks=[[pick(KERNELS)] * n for n in depths],
            e=[[pick(EXPANDS)] * n for n in depths],
        )
    else:
        d = pick(RESNET_DEPTHS)
        arch.update(
            d=[d] * 5,
            w=[pick(RESNET_WIDTHS)] * 5,
            e=[[pick(RESNET_EXPANDS)] * (b + d) for b in _RESNET_BASE],
        )
    return arch


def largest_arch(family: str, resolution: int = 32) -> dict[str, Any]:
    """The family's largest architecture: the supernet."""
    return _extreme_arch(family, max, -1, resolution)


def smallest_arch(family: str, resolution: int = 32) -> dict[str, Any]:
    """The family's smallest architecture (the sandwich rule's lower bread)."""
    return _extreme_arch(family, min, -2, resolution)


def _block_map(arch: dict[str, Any]) -> list[int]:
    """The supernet block index of each of ``arch``'s blocks (stage by stage, first blocks)."""
    from aiop.models.families import DEPTHS, RESNET_DEPTHS

    family = arch["family"]
    if family in MB_FAMILIES:
        deepest = max(DEPTHS)
        out = [0]  # the fixed first block
        for s, d in enumerate(arch["d"]):
            out += [1 + deepest * s + j for j in range(d)]
        if family == "ofa_pn":  # the single 320-wide block
            out.append(1 + deepest * 5)
        return out
    deepest, out, base = max(RESNET_DEPTHS), [], 0
    for i, b in enumerate(_RESNET_BASE):
        out += [base + j for j in range(b + arch["d"][i + 1])]
        base += b + deepest
    return out


def supernet_key(arch: dict[str, Any], name: str, blocks: list[int] | None = None) -> str:
    """The supernet state-dict name that ``arch``'s tensor ``name`` is a slice of."""
    from aiop.models.families import RESNET_DEPTHS

    parts = name.split(".")
    if parts[0] == "blocks":
        parts[1] = str((blocks or _block_map(arch))[int(parts[1])])
    elif (
        parts[0] == "stem"
        and arch["family"] == "ofa_resnet"
        and arch["d"][0] != max(RESNET_DEPTHS)
        and parts[1] in ("1", "2")
    ):
        # without the stem's residual conv, stem.1 is the supernet's stem.2 (and the pool)
        parts[1] = str(int(parts[1]) + 1)
    return ".".join(parts)


def slice_like(t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The view of ``t`` a tensor of ``shape`` inherits: leading channels, centred kernels."""
    if t.dim() != len(shape):
        raise SupernetError(f"cannot slice a {tuple(t.shape)} tensor to {tuple(shape)}")
    index: list[slice] = []
    for dim, (big, small) in enumerate(zip(t.shape, shape, strict=True)):
        if small > big:
            raise SupernetError(f"cannot slice a {tuple(t.shape)} tensor to {tuple(shape)}")
        if t.dim() == 4 and dim >= 2:  # a conv kernel: OFA keeps the centre
            start = (big - small) // 2
            index.append(slice(start, start + small))
        else:
            index.append(slice(0, small))
    return t[tuple(index)]


def subnet_tensors(
    model: nn.Module,
    supernet: dict[str, torch.Tensor],
    arch: dict[str, Any],
    *,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: view of the supernet tensor}`` for ``names`` (default: ``model``'s parameters)."""
    blocks = _block_map(arch)
    names = names if names is not None else [n for n, _ in model.named_parameters()]
    shapes = {**{n: p.shape for n, p in model.named_parameters()}, **_buffer_shapes(model)}
    out = {}
    for n in names:
        key = supernet_key(arch, n, blocks)
        if key not in supernet:
            raise SupernetError(f"{arch['family']}: the supernet has no {key} (for {n})")
        out[n] = slice_like(supernet[key], shapes[n])
    return out


def _buffer_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: b.shape for n, b in model.named_buffers()}


def inherit(
    model: TaskModel, supernet: dict[str, torch.Tensor], arch: dict[str, Any], *, head: bool = False
) -> TaskModel:
    """Copy ``arch``'s slices of the supernet into ``model`` (stem and blocks; the head too
    when ``head``), parameters and BatchNorm statistics alike; returns ``model``."""
    if arch.get("family") not in (*MB_FAMILIES, "ofa_resnet"):
        raise SupernetError(f"{model.backbone_name}: only family architectures have a supernet")
    names = [
        n
        for n, _ in model.state_dict().items()
        if (head or not n.startswith("head.")) and not n.endswith("num_batches_tracked")
    ]
    views = subnet_tensors(model, supernet, arch, names=names)
    state = model.state_dict()
    with torch.no_grad():
        for n, v in views.items():
            state[n].copy_(v)
    return model


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SupernetConfig:
    """How a family's supernet is trained (every field changes the weights it gives)."""

    family: str
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-5
    warmup: float = 0.1  # share of the steps with a linear learning-rate warm-up
    n_random: int = 1  # random architectures per step besides the largest and the smallest
    resolution: int = 32
    n_train: int | None = None  # None: every training digit
    n_val: int | None = None  # validation digits the checkpoint's accuracy is measured on
    data_seed: int = 0
    seed: int = 0
    width: int = DEFAULT_WIDTH

    def __post_init__(self) -> None:
        from aiop.models.families import FAMILY_NAMES

        if self.family not in FAMILY_NAMES:
            raise SupernetError(f"unknown family {self.family!r}; valid: {', '.join(FAMILY_NAMES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.n_random < 0 or self.lr <= 0:
            raise SupernetError(
                "a supernet needs epochs >= 1, batch_size >= 1, n_random >= 0, lr > 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _hash(self, *leave_out: str) -> str:
        d = {k: v for k, v in self.to_dict().items() if k not in leave_out}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def key(self) -> str:
        """A short hash of what shapes the weights (the checkpoint's name in the cache)."""
        return self._hash("n_val")  # n_val only changes the accuracy the checkpoint reports

    def settings_key(self) -> str:
        """:meth:`key` without the family: what a label recipe that inherits records."""
        return self._hash("n_val", "family")


def supernet_config(family: str) -> SupernetConfig:
    """The supernet a ``init="supernet"`` label recipe inherits from, for ``family``."""
    return SupernetConfig(family)


def cache_path(cfg: SupernetConfig, root: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/supernets/<family>-<key>.safetensors`` (cache: ``$AIOP_CACHE_DIR`` or
    ``~/.cache/aiop``)."""
    from aiop.cache import cache_dir

    return Path(root or cache_dir()) / "supernets" / f"{cfg.family}-{cfg.key()}.safetensors"


# --------------------------------------------------------------------------- training
def build_supernet(cfg: SupernetConfig) -> TaskModel:
    """The family's largest architecture with the classification head (fresh weights)."""
    from aiop.models.families import build_arch

    torch.manual_seed(cfg.seed)
    arch = largest_arch(cfg.family, cfg.resolution)
    backbone = build_arch(arch, resolution=cfg.resolution)
    return TaskModel(
        backbone,
        "classification",
        resolution=cfg.resolution,
        width=cfg.width,
        name=f"supernet {cfg.family}",
    )


def _subnet(arch: dict[str, Any], cfg: SupernetConfig) -> TaskModel:
    from aiop.models.families import build_arch

    backbone = build_arch(arch, resolution=cfg.resolution)
    return TaskModel(backbone, "classification", resolution=cfg.resolution, width=cfg.width)


def _lr_at(step: int, total: int, cfg: SupernetConfig) -> float:
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _loader(cfg: SupernetConfig, epoch: int) -> Any:
    from aiop.tasks.train import TrainConfig, make_loader

    tcfg = TrainConfig(
        batch_size=cfg.batch_size,
        resolution=cfg.resolution,
        n_train=cfg.n_train,
        data_seed=cfg.data_seed,
        seed=cfg.seed * 1000 + epoch,  # a fresh, reproducible order every epoch (resumable)
    )
    return make_loader("classification", "train", tcfg, shuffle=True, n=cfg.n_train)


def _evaluate(model: TaskModel, cfg: SupernetConfig) -> float:
    from aiop.tasks.train import TrainConfig, evaluate, make_loader

    tcfg = TrainConfig(batch_size=100, resolution=cfg.resolution, data_seed=cfg.data_seed)
    loader = make_loader("classification", "val", tcfg, shuffle=False, n=cfg.n_val)
    return evaluate(model, loader)["top1"]


def train_supernet(
    cfg: SupernetConfig,
    path: str | os.PathLike[str],
    *,
    progress: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.family``'s supernet with the sandwich rule and write it to ``path``.

    Saves after every epoch (weights, Adam moments, the step) and, with ``resume``,
    continues a partial checkpoint of the same config; returns the metadata written.
    """
    from tqdm import tqdm

    from aiop.models.families import sample_arch

    path = Path(path)
    model = build_supernet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step, seconds = 0, 0, 0.0
    if resume and path.is_file():
        state, meta = load_supernet(path, cfg)
        if meta.get("complete"):
            return meta
        start_epoch, step, seconds = meta["epochs_done"], meta["steps"], meta["seconds"]
        _restore(model, opt, state)
        log.info("resuming %s after epoch %d", path, start_epoch)
    steps_per_epoch = len(_loader(cfg, 0))
    total = cfg.epochs * steps_per_epoch
    largest = largest_arch(cfg.family, cfg.resolution)
    smallest = smallest_arch(cfg.family, cfg.resolution)
    params = dict(model.named_parameters())  # the views of every subnet slice these
    bar = tqdm(total=total, initial=step, desc=f"supernet {cfg.family}", disable=not progress)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = random.Random(f"supernet:{cfg.family}:{cfg.seed}:{epoch}")
        model.train()
        for images, targets in _loader(cfg, epoch):
            labels = torch.as_tensor(targets, dtype=torch.int64)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            archs = [largest, smallest] + [
                sample_arch(cfg.family, rng.randrange(2**31)) for _ in range(cfg.n_random)
            ]
            loss_sum = 0.0
            for arch in archs:
                if arch is largest:
                    out = model(images)
                else:
                    arch = {**arch, "resolution": cfg.resolution}
                    sub = _subnet(arch, cfg).train()
                    out = torch.func.functional_call(
                        sub, subnet_tensors(sub, params, arch), (images,)
                    )
                loss = nn.functional.cross_entropy(out, labels)
                loss.backward()
                loss_sum += loss.item()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / len(archs):.3f}", epoch=epoch + 1)
        seconds += time.perf_counter() - t0
        meta = {
            "format": FORMAT,
            "config": cfg.to_dict(),
            "key": cfg.key(),
            "epochs_done": epoch + 1,
            "steps": step,
            "seconds": round(seconds, 1),
            "complete": epoch + 1 == cfg.epochs,
        }
        if meta["complete"]:
            model.eval()
            meta["top1_largest"] = round(_evaluate(model, cfg), 4)
            small = inherit(_subnet(smallest, cfg), dict(model.state_dict()), smallest, head=True)
            recalibrate_bn(small, cfg)
            meta["top1_smallest"] = round(_evaluate(small, cfg), 4)
        save_supernet(model, meta, path, opt=None if meta["complete"] else opt)
    bar.close()
    return meta


def recalibrate_bn(model: TaskModel, cfg: SupernetConfig, n: int = 500) -> TaskModel:
    """Re-estimate BatchNorm statistics on ``n`` training digits (OFA's step before it
    evaluates an inherited architecture: the supernet's statistics are the largest one's)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for i, (images, _) in enumerate(_loader(cfg, 0)):
            if i * cfg.batch_size >= n:
                break
            model(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def _restore(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("adam.")})
    named = dict(model.named_parameters())
    for name, p in named.items():
        if f"adam.exp_avg.{name}" in state:
            opt.state[p] = {
                "step": state[f"adam.step.{name}"].clone(),
                "exp_avg": state[f"adam.exp_avg.{name}"].clone(),
                "exp_avg_sq": state[f"adam.exp_avg_sq.{name}"].clone(),
            }


# --------------------------------------------------------------------------- checkpoints
def save_supernet(
    model: nn.Module,
    meta: dict[str, Any],
    path: str | os.PathLike[str],
    opt: torch.optim.Optimizer | None = None,
) -> Path:
    """Write weights (and Adam's moments, for a partial run) as one safetensors file,
    atomically: temporary file, then rename."""
    tensors = dict(model.state_dict())
    if opt is not None:
        for name, p in model.named_parameters():
            st = opt.state.get(p)
            if st:
                tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"]).reshape(1).float()
                tensors[f"adam.exp_avg.{name}"] = st["exp_avg"]
                tensors[f"adam.exp_avg_sq.{name}"] = st["exp_avg_sq"]
    return save_checkpoint(tensors, meta, path)


def load_supernet(
    path: str | os.PathLike[str], cfg: SupernetConfig | None = None, *, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a supernet checkpoint; :class:`SupernetError` when it is not
    one, or (given ``cfg``) was trained under another config. ``tensors=False``: the
    metadata only (the state dict comes back empty)."""
    state, meta = load_checkpoint(path, FORMAT, "supernet", SupernetError, tensors=tensors)
    if cfg is not None and meta.get("key") != cfg.key():
        raise SupernetError(
            f"{path}: trained under another config ({meta.get('config')}); "
            "delete it or give its config"
        )
    return state, meta


@lru_cache(maxsize=4)
def _cached(path: str, mtime: float) -> dict[str, torch.Tensor]:
    state, meta = load_supernet(path)
    if not meta.get("complete"):
        raise SupernetError(f"{path}: an unfinished supernet (run it again to finish)")
    return {k: v for k, v in state.items() if not k.startswith("adam.")}


def ensure_supernet(
    cfg: SupernetConfig, root: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> Path:
    """The path of ``cfg``'s finished supernet in the cache, training (or finishing) it first
    when needed."""
    import fcntl

    path = cache_path(cfg, root)
    if _complete(path, cfg):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # one trainer per checkpoint: a second labelling process waits for the first one's
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish training %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(path, cfg):
            log.warning(
                "training the %s supernet once (%d epochs) into %s", cfg.family, cfg.epochs, path
            )
            train_supernet(cfg, path, progress=progress)
    return path


def _complete(path: Path, cfg: SupernetConfig) -> bool:
    # the header only: this runs before every inherited label, the tensors are cached apart
    return path.is_file() and bool(load_supernet(path, cfg, tensors=False)[1].get("complete"))


def supernet_state(
    cfg: SupernetConfig, root: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The finished supernet's tensors (trained on first use, read once per process)."""
    path = ensure_supernet(cfg, root, progress=progress)
    return _cached(str(path), path.stat().st_mtime)


@lru_cache(maxsize=4)
def _identity(path: str, mtime: float) -> dict[str, Any]:
    state = _cached(path, mtime)
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    meta = load_supernet(path, tensors=False)[1]
    return {
        "key": meta.get("key"),
        "weights_sha256": h.hexdigest()[:16],
        "top1_largest": meta.get("top1_largest"),
        "top1_smallest": meta.get("top1_smallest"),
    }


def checkpoint_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A finished supernet checkpoint's config key, a hash of its weights (names and bytes,
    not the file: the metadata holds training seconds) and its checkpoint accuracies."""
    path = Path(path)
    return dict(_identity(str(path), path.stat().st_mtime))


def label_supernet(extra: Mapping[str, Any]) -> str | None:
    """The weights hash of the supernet a stored label's backbone inherited from, read from
    the label's ``extra`` as :func:`aiop.tasks.labels.label_archs` writes it: None for a label
    trained from scratch, ``"?"`` for an inherited one made before the hash was recorded."""
    if (extra.get("train") or {}).get("init") != "supernet":
        return None
    return (extra.get("supernet") or {}).get("weights_sha256") or "?"


def supernet_identity(
    cfg: SupernetConfig, root: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """:func:`checkpoint_identity` of the cache's supernet for ``cfg``: which trained
    instance a label inherits from.

    The same config trained on another CPU gives other weights (floating-point sums run
    in another order), so one family's labels made with different caches can come from
    different supernets; the hash, stored with every inherited label, tells them apart."""
    return checkpoint_identity(ensure_supernet(cfg, root))


def inherit_spec(model: TaskModel, cfg: SupernetConfig, *, progress: bool = False) -> TaskModel:
    """Start a family architecture's task model from its slice of the family's supernet."""
    arch = model.arch
    if not arch or arch.get("family") != cfg.family:
        raise HeadError(
            f"{model.backbone_name}: a supernet init needs an architecture of {cfg.family}"
        )
    return inherit(model, supernet_state(cfg, progress=progress), arch)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m aiop.tasks.supernet -family ofa_mbv3 ofa_pn``: train (or finish) the
    families' supernets into the cache ahead of labelling, and print their metadata."""
    import sys

    from aiop.tasks.labels import OneLineParser

    p = OneLineParser(prog="python -m aiop.tasks.supernet", description=main.__doc__)
    p.add_argument("-family", nargs="+", required=True, help="ofa_mbv3, ofa_pn, ofa_resnet")
    p.add_argument("-epochs", type=int, default=None, help="default: the label recipes'")
    p.add_argument("-n_train", type=int, default=None, help="training digits (default: all)")
    p.add_argument("-cache_dir", default=None, help="default: $AIOP_CACHE_DIR or ~/.cache/aiop")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON lines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        for family in args.family:
            cfg = supernet_config(family)  # validates the family too
            overrides = {k: getattr(args, k) for k in ("epochs", "n_train")}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            if overrides:
                cfg = SupernetConfig(**{**cfg.to_dict(), **overrides})
            path = ensure_supernet(cfg, args.cache_dir, progress=not args.quiet)
            meta = load_supernet(path, cfg, tensors=False)[1]
            if args.json:
                print(json.dumps({"path": str(path), **meta}))
            else:
                print(
                    f"{family}: {path} ({meta['steps']} steps, {meta['seconds']} s; top-1 "
                    f"largest {meta['top1_largest']}, smallest {meta['top1_smallest']})"
                )
    except KeyboardInterrupt:
        print("interrupted: finished epochs are kept; run again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"{p.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
