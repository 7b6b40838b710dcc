"""``aiop demo`` / ``make demo``: the pipeline end to end on built-in models.

For each model: build the training CG, check its JSON round trip and
fingerprint, featurise it for PyG, draw it, and — where the profiler is
available — measure peak training memory under a few m-configurations.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

DEMO_CONFIGS = (
    "bs=32,mb=32",
    "bs=32,mb=8",
    "bs=32,mb=32,freeze=0.5",
    "bs=32,mb=32,ckpt=2",
    "bs=32,mb=8,method=lite+bias,opt=adam",
)


def demo_models() -> dict[str, Any]:
    """The demo's subjects: two networks defined outside the zoo, and zoo/family ones if present."""
    from aiop.models.examples import SmallCNN, TinyResNet

    models: dict[str, Any] = {"small_cnn": SmallCNN, "tiny_resnet": TinyResNet}
    try:
        from aiop.models import build

        for spec in ("zoo:mobilenet_v2", "family:ofa_mbv3:0"):
            models[spec] = lambda spec=spec: build(
                spec, **({"resolution": 64} if spec.startswith("zoo:") else {})
            )
    except ImportError:
        pass
    return models


def _profile_rows(name: str, factory: Any) -> list[dict[str, Any]]:
    try:
        from aiop.profiler import profile
    except ImportError:
        return []
    rows = []
    for spec in DEMO_CONFIGS:
        try:
            result = profile(factory, spec, mode="meta").to_dict()
        except ValueError as exc:  # a config the model cannot take
            rows.append({"model": name, "config": spec, "error": str(exc)})
            continue
        rows.append(
            {
                "model": name,
                "config": spec,
                "peak_memory_bytes": result["peak_memory_bytes"],
                "activations": result["breakdown"].get("activations"),
            }
        )
    return rows


def run_demo(out_dir: Path, as_json: bool = False) -> int:
    from aiop.cg import ComputeGraph, draw, from_torch, to_pyg
    from aiop.cli import format_table, human_bytes, human_count

    out_dir.mkdir(parents=True, exist_ok=True)
    can_draw = shutil.which("dot") is not None
    graphs, memory = [], []
    for name, factory in demo_models().items():
        t0 = time.perf_counter()
        model: nn.Module = factory()
        cg = from_torch(model, name=name)
        build_s = time.perf_counter() - t0
        safe = name.replace(":", "_")
        path = cg.save(out_dir / f"{safe}.json")
        assert ComputeGraph.load(path).fingerprint == cg.fingerprint
        data = to_pyg(cg)
        drawing = str(draw(cg, out_dir / f"{safe}.svg")) if can_draw else "(graphviz missing)"
        graphs.append(
            {
                "model": name,
                "nodes": cg.num_nodes,
                "edges": cg.num_edges,
                "params": cg.total_params,
                "flops": cg.total_flops,
                "features": list(data.x.shape),
                "build_s": round(build_s, 3),
                "fingerprint": cg.fingerprint,
                "graph": str(path),
                "drawing": drawing,
            }
        )
        memory.extend(_profile_rows(name, factory))
    report = {"graphs": graphs, "memory": memory}
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print("Computational graphs (training-mode export, batch 1)\n")
    print(
        format_table(
            [
                {
                    "model": g["model"],
                    "nodes": g["nodes"],
                    "params": f"{g['params']:,}",
                    "FLOPs": human_count(g["flops"]),
                    "PyG x": "x".join(map(str, g["features"])),
                    "build": f"{g['build_s']:.2f} s",
                    "fingerprint": g["fingerprint"],
                }
                for g in graphs
            ]
        )
    )
    if memory:
        print("\nPeak training memory (meta-mode profile of one optimizer step)\n")
        print(
            format_table(
                [
                    {
                        "model": r["model"],
                        "config": r["config"],
                        "peak": human_bytes(r["peak_memory_bytes"])
                        if "peak_memory_bytes" in r
                        else "",
                        "activations": human_bytes(r["activations"])
                        if r.get("activations")
                        else "",
                        "note": r.get("error", ""),
                    }
                    for r in memory
                ]
            )
        )
    print(f"\nGraphs, drawings and demo.json written to {out_dir}/")
    return 0
