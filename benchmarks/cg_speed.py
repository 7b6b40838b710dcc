"""How fast graphs are built and featurised.

* CG of a ResNet-50-sized network at 224 px, end to end (training-mode ONNX
  export in memory + import), and the import alone. Target: under 2 s.
* ``to_pyg`` of a 1,000-node CG. Target: under 50 ms.

Writes ``cg_speed.json`` and ``.md`` in ``--out`` (default ``benchmarks/results``).
Run: ``.venv/bin/python benchmarks/cg_speed.py [--repeats 5] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from aiop.cg import export_onnx_bytes, from_onnx, from_torch, to_pyg

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"


def resnet50() -> nn.Module:
    try:
        from aiop.models import build

        return build("zoo:resnet50")
    except ImportError:  # the zoo is optional for this benchmark
        raise SystemExit("aiop.models is needed for the ResNet-50 benchmark") from None


def deep_chain(n_nodes: int = 1000) -> nn.Module:
    """A conv-BN-ReLU chain whose CG has ``n_nodes`` nodes (three per block, plus the input)."""
    blocks = [
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        for _ in range((n_nodes - 1) // 3)
    ]
    return nn.Sequential(*blocks)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = resnet50()
    x = (torch.randn(1, 3, 224, 224),)
    from_torch(model, (1, 3, 224, 224))  # warm-up (imports, first export)
    end_to_end = timed(lambda: from_torch(model, (1, 3, 224, 224)), args.repeats)
    data = export_onnx_bytes(model, x)
    import_only = timed(lambda: from_onnx(data), args.repeats)
    cg50 = from_onnx(data)

    chain = deep_chain()
    big = from_torch(chain, (1, 16, 8, 8))
    to_pyg(big)  # warm-up: the first call imports torch_geometric
    pyg_times = timed(lambda: to_pyg(big), max(args.repeats, 20))

    result = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "resnet50": {
            "nodes": cg50.num_nodes,
            "params": cg50.total_params,
            "flops": cg50.total_flops,
            "onnx_bytes": len(data),
            "end_to_end_s_median": statistics.median(end_to_end),
            "end_to_end_s_all": end_to_end,
            "import_only_s_median": statistics.median(import_only),
            "target_s": 2.0,
        },
        "to_pyg": {
            "nodes": big.num_nodes,
            "edges": big.num_edges,
            "median_ms": 1000 * statistics.median(pyg_times),
            "target_ms": 50.0,
        },
    }
    r, p = result["resnet50"], result["to_pyg"]
    md = "\n".join(
        [
            "| measurement | median | target |",
            "|---|---|---|",
            f"| ResNet-50 CG, export + import ({r['nodes']} nodes) "
            f"| {r['end_to_end_s_median']:.2f} s | < 2 s |",
            f"| ResNet-50 CG, import of the ONNX bytes only "
            f"| {r['import_only_s_median']:.2f} s | |",
            f"| `to_pyg` of a {p['nodes']}-node CG | {p['median_ms']:.1f} ms | < 50 ms |",
        ]
    )
    write_results(args.out, "cg_speed", result, md)
    print(md)


if __name__ == "__main__":
    main()
