"""Turn a ``MODEL`` argument (DESIGN.md) into a computational graph.

``MODEL`` is a path to ``.onnx``, ``.pb`` or a CG ``.json``/``.json.gz``, ``zoo:NAME``
or ``family:FAMILY:SEED``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aiop.cg.graph import CGError, ComputeGraph


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``; ``None``/empty → ``None``."""
    if not text:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise CGError(
            f"--input-shape must be comma-separated integers like 1,3,224,224, not {text!r}"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise CGError(f"--input-shape must be positive integers, not {text!r}")
    return dims


def is_model_name(model: str) -> bool:
    return model.startswith(("zoo:", "family:"))


def graph_for_model(model: str, input_shape: Sequence[int] | None = None) -> ComputeGraph:
    """The training CG of ``model`` (any MODEL form), at batch 1 unless ``input_shape`` is given."""
    if is_model_name(model):
        from aiop.cg.torch_import import from_torch
        from aiop.models import build

        try:
            module = build(model)
        except ValueError as exc:
            raise CGError(str(exc)) from None
        cg = from_torch(module, input_shape, name=model)
        cg.meta["model"] = model
        return cg
    path = Path(model)
    if not path.exists():
        raise CGError(
            f"no such file: {model} (MODEL: a .onnx/.pb/.json path, zoo:NAME or family:FAMILY:SEED)"
        )
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".onnx":
        from aiop.cg.onnx_import import from_onnx

        return from_onnx(path, input_shape)
    if path.suffix.lower() == ".pb":
        from aiop.cg.tf_import import from_tf_pb

        return from_tf_pb(path, input_shape=input_shape)
    if suffixes.endswith((".json", ".json.gz")):
        return ComputeGraph.load(path)
    raise CGError(f"{model}: unknown model file type (expected .onnx, .pb, .json or .json.gz)")
