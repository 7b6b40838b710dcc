"""The model zoo, ``build(spec)`` for ``zoo:NAME`` / ``family:FAMILY:SEED``, and the zoo table."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from aiop.models.base import BlockNet, count_params
from aiop.models.clip import CLIPDualEncoder
from aiop.models.densenet import DenseNet
from aiop.models.errors import ModelSpecError
from aiop.models.families import (
    DEFAULT_NUM_CLASSES,
    FAMILY_NAMES,
    build_arch,
    describe_space,
    sample_arch,
)
from aiop.models.mobilenet import MobileNetV2, ProxylessNASMobile
from aiop.models.mobilevit import MobileViT
from aiop.models.resnet import ResNet

log = logging.getLogger(__name__)

_ZOO: dict[str, Callable[..., BlockNet]] = {
    "resnet18": lambda **kw: ResNet("resnet18", **kw),
    "resnet50": lambda **kw: ResNet("resnet50", **kw),
    "resnext50_32x4d": lambda **kw: ResNet("resnext50_32x4d", **kw),
    "mobilenet_v2": MobileNetV2,
    "proxylessnas_mobile": ProxylessNASMobile,
    "densenet121": DenseNet,
    "mobilevit_xxs": lambda **kw: MobileViT("xxs", **kw),
    "mobilevit_xs": lambda **kw: MobileViT("xs", **kw),
    "mobilevit_s": lambda **kw: MobileViT("s", **kw),
    "clip_vit": CLIPDualEncoder,
}
ZOO_NAMES: tuple[str, ...] = tuple(_ZOO)

_DESCRIPTIONS = {
    "resnet18": "torchvision ResNet-18",
    "resnet50": "torchvision ResNet-50",
    "resnext50_32x4d": "torchvision ResNeXt-50 32x4d",
    "mobilenet_v2": "torchvision MobileNetV2",
    "proxylessnas_mobile": "MIT-HAN-lab ProxylessNAS-Mobile",
    "densenet121": "torchvision DenseNet-121",
    "mobilevit_xxs": "timm MobileViT-XXS",
    "mobilevit_xs": "timm MobileViT-XS",
    "mobilevit_s": "timm MobileViT-S",
    "clip_vit": "CLIP-style ViT (6x192) + text (4x128) dual encoder, 128-d joint space",
}

# Published parameter counts at 1,000 classes (torchvision, timm, MIT-HAN-lab).
REFERENCE_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
    "mobilenet_v2": 3_504_872,
    "proxylessnas_mobile": 4_080_512,
    "densenet121": 7_978_856,
    "mobilevit_xxs": 1_272_024,
    "mobilevit_xs": 2_317_848,
    "mobilevit_s": 5_578_632,
}

_ZOO_KWARGS = ("num_classes", "in_chans", "width_mult", "resolution")
_FAMILY_KWARGS = ("num_classes", "in_chans", "resolution")


def _check_kwargs(spec: str, kwargs: dict[str, Any], allowed: Iterable[str]) -> None:
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ModelSpecError(
            f"{spec}: unknown option(s) {', '.join(bad)}; valid: {', '.join(allowed)}"
        )
    for k in ("num_classes", "in_chans", "resolution"):
        v = kwargs.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ModelSpecError(f"{spec}: {k} must be a positive integer, not {v!r}")
    wm = kwargs.get("width_mult")
    if wm is not None and (not isinstance(wm, int | float) or not 0 < wm <= 4):
        raise ModelSpecError(f"{spec}: width_mult must be a number in (0, 4], not {wm!r}")


def build(spec: str, **kwargs: Any) -> BlockNet:
    """Build ``zoo:NAME`` (options: num_classes, in_chans, width_mult, resolution) or
    ``family:FAMILY:SEED`` (options: num_classes (default 10), in_chans, resolution
    (default: the sample's, 28–64 px))."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not isinstance(spec, str):
        raise ModelSpecError(f"model spec must be a string, not {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    if kind == "zoo":
        if rest not in _ZOO:
            raise ModelSpecError(f"unknown zoo model {rest!r}; valid: {', '.join(ZOO_NAMES)}")
        _check_kwargs(spec, kwargs, _ZOO_KWARGS)
        try:
            return _ZOO[rest](**kwargs)
        except ValueError as exc:
            raise ModelSpecError(f"{spec}: {exc}") from None
    if kind == "family":
        family, _, seed = rest.partition(":")
        if family not in FAMILY_NAMES:
            raise ModelSpecError(f"unknown family {family!r}; valid: {', '.join(FAMILY_NAMES)}")
        if not seed.isdigit():
            raise ModelSpecError(f"{spec}: expected family:{family}:SEED with SEED a number >= 0")
        _check_kwargs(spec, kwargs, _FAMILY_KWARGS)
        return build_arch(
            sample_arch(family, int(seed)),
            num_classes=kwargs.get("num_classes", DEFAULT_NUM_CLASSES),
            in_chans=kwargs.get("in_chans", 3),
            resolution=kwargs.get("resolution"),
        )
    raise ModelSpecError(
        f"unknown model spec {spec!r}; use zoo:NAME ({', '.join(ZOO_NAMES)}) "
        f"or family:FAMILY:SEED ({', '.join(FAMILY_NAMES)})"
    )


def thop_flops(model: BlockNet, resolution: int | None = None) -> int:
    """2 × thop MACs of one eval-mode forward at batch 1 (attention matmuls included: they are
    :class:`~aiop.models.transformer.MatMul` modules, counted as prod(A) × N MACs)."""
    import thop

    from aiop.models.transformer import MatMul

    def count_matmul(
        m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        # prod(A) × N multiply-accumulates, the CG's rule for MatMul
        m.total_ops += torch.DoubleTensor([inputs[0].numel() * inputs[1].shape[-1]])

    was_training = model.training
    model.eval()
    inputs, _ = model.make_batch(1, resolution, generator=torch.Generator().manual_seed(0))
    try:
        # thop prints per-module notes on stdout; keep library output clean
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            macs, _ = thop.profile(
                model, inputs=inputs, custom_ops={MatMul: count_matmul}, verbose=False
            )
    finally:
        for m in model.modules():  # thop leaves its counters behind as buffers
            for name in ("total_ops", "total_params"):
                if name in getattr(m, "_buffers", {}):
                    del m._buffers[name]
        model.train(was_training)
    return round(2 * float(macs))


_ROW_CACHE: dict[str, dict[str, Any]] = {}


def zoo_table(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per zoo model and family: name, kind, params, flops (2 × thop MACs at the default
    resolution, batch 1, eval mode), input_size, and for families the space and its sample.

    ``names`` (``resnet18``/``zoo:resnet18``/``ofa_pn``/``family:ofa_pn``) picks rows; rows are
    cached per process (the whole table costs about 20 s of CPU)."""
    wanted = None if names is None else set(names)
    rows: list[dict[str, Any]] = []
    for name in ZOO_NAMES:
        spec = f"zoo:{name}"
        if wanted is not None and name not in wanted and spec not in wanted:
            continue
        if spec in _ROW_CACHE:
            rows.append(dict(_ROW_CACHE[spec]))
            continue
        model = build(spec)
        _ROW_CACHE[spec] = row = {
            "name": spec,
            "kind": "zoo",
            "params": count_params(model),
            "flops": thop_flops(model),
            "input_size": list(model.input_size),
            "num_classes": model.num_classes,
            "description": _DESCRIPTIONS[name],
        }
        rows.append(dict(row))
    for family in FAMILY_NAMES:
        spec = f"family:{family}"
        if wanted is not None and family not in wanted and spec not in wanted:
            continue
        if spec in _ROW_CACHE:
            rows.append(dict(_ROW_CACHE[spec]))
            continue
        model = build(f"{spec}:0")
        _ROW_CACHE[spec] = row = {
            "name": spec,
            "kind": "family",
            "params": count_params(model),
            "flops": thop_flops(model),
            "input_size": list(model.input_size),
            "num_classes": model.num_classes,
            "space": describe_space(family),
            "default_sample": f"{spec}:0",
            "description": f"{describe_space(family)}; row: sample {spec}:0",
        }
        rows.append(dict(row))
    return rows
