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


def _profile_rows(name: str, factory: Any, cg: Any, predictor: Any) -> list[dict[str, Any]]:
    """Meta-mode profiles of the demo configs, with the predictor's answer beside each."""
    from aiop.profiler import profile

    rows = []
    predicted: dict[str, Any] = {}
    if predictor is not None:
        for spec in DEMO_CONFIGS:
            try:
                predicted[spec] = predictor.predict(cg, [spec])[0]
            except ValueError:  # a config this graph cannot take; the profile says why
                continue
    for spec in DEMO_CONFIGS:
        t0 = time.perf_counter()
        try:
            result = profile(factory, spec, mode="meta", flops=False).to_dict()
        except ValueError as exc:
            rows.append({"model": name, "config": spec, "error": str(exc).splitlines()[0]})
            continue
        row = {
            "model": name,
            "config": spec,
            "peak_memory_bytes": result["peak_memory_bytes"],
            "activations": result["breakdown"].get("activations"),
            "profile_s": round(time.perf_counter() - t0, 3),
        }
        if spec in predicted:
            row["predicted_bytes"] = predicted[spec]["peak_memory_bytes"]
            row["analytic_bytes"] = predicted[spec]["peak_memory_bytes_analytic"]
        rows.append(row)
    return rows


def _load_default_predictor() -> Any:
    from aiop.cli import default_predictor_path
    from aiop.predictor.api import Predictor, PredictorError

    path = default_predictor_path()
    if not path.is_file():
        log.warning("no packaged predictor at %s: showing profiles only", path)
        return None
    try:
        return Predictor.load(path)
    except PredictorError as exc:
        log.warning("packaged predictor unusable: %s", exc)
        return None


def run_demo(out_dir: Path, as_json: bool = False) -> int:
    from aiop.cg import ComputeGraph, draw, from_torch, to_pyg
    from aiop.cli import format_table
    from aiop.units import human_flops

    out_dir.mkdir(parents=True, exist_ok=True)
    can_draw = shutil.which("dot") is not None
    graphs, memory = [], []
    predictor = _load_default_predictor()
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
        memory.extend(_profile_rows(name, factory, cg, predictor))
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
                    "FLOPs": human_flops(g["flops"]),
                    "PyG x": "x".join(map(str, g["features"])),
                    "build": f"{g['build_s']:.2f} s",
                    "fingerprint": g["fingerprint"],
                }
                for g in graphs
            ]
        )
    )
    if memory:
        print("\nPeak training memory: meta-mode profile of one optimizer step vs prediction\n")
        print(
            format_table(
                [
                    {
                        "model": r["model"],
                        "config": r["config"],
                        "measured": _fmt(r, "peak_memory_bytes"),
                        "predicted": _fmt(r, "predicted_bytes"),
                        "error": _err(r),
                        "analytic": _fmt(r, "analytic_bytes"),
                        "profile": f"{r['profile_s']:.1f} s" if "profile_s" in r else "",
                        "note": r.get("error", ""),
                    }
                    for r in memory
                ]
            )
        )
    print(f"\nGraphs, drawings and demo.json written to {out_dir}/")
    return 0


def _fmt(row: dict[str, Any], key: str) -> str:
    from aiop.units import human_bytes

    return human_bytes(row[key]) if row.get(key) else ""


def _err(row: dict[str, Any]) -> str:
    if not row.get("predicted_bytes") or not row.get("peak_memory_bytes"):
        return ""
    return f"{100 * (row['predicted_bytes'] / row['peak_memory_bytes'] - 1):+.1f}%"
