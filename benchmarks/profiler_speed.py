"""Profiler speed and the memory each m-technique saves, on the zoo.

1. Seconds per (model, config) in ``meta`` mode for MobileNetV2 at 224 px and
   64 px, batch 8: aiop's tracker (cold first call and warm calls) against
   PyTorch's ``MemTracker`` on the same fake-tensor step.
2. Peak training memory and its breakdown for every zoo model under five
   configs (baseline, checkpointing, freezing, TinyTL, all together), and the
   reduction factor of each technique next to the published ones (MPOptimizer:
   checkpointing alone ×0.14–0.25 (≈4×), freezing alone ×0.57–0.65 (≈1.5×),
   everything ×0.03–0.05; TinyTL: up to 6.5× less than full fine-tuning).

Writes ``benchmarks/results/profiler_speed.json`` and ``.md``.

    python benchmarks/profiler_speed.py [--quick] [--resolution 224] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aiop.mconfig import MConfig, make_optimizer, prepare
from aiop.models import ZOO_NAMES, build
from aiop.profiler import profile, tool_version

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

log = logging.getLogger("profiler_speed")

SPEED_CONFIGS = [
    "bs=8",
    "bs=8,ckpt=4",
    "bs=8,freeze=0.5",
    "bs=8,mb=2,method=lite+bias,prec=bf16,opt=adam",
    "bs=8,mb=4,freeze=0.3,ckpt=2,method=bias,opt=adamw",
]
PUBLISHED = {
    "ckpt": "MPOptimizer ×0.14–0.25 (≈4×)",
    "freeze": "MPOptimizer ×0.57–0.65 (≈1.5×)",
    "tinytl": "TinyTL up to 6.5×",
    "all": "MPOptimizer ×0.03–0.05 (20–33×)",
}


def technique_configs(n_blocks: int, bs: int = 8) -> dict[str, str]:
    k = max(1, math.isqrt(n_blocks))  # MPOptimizer's √L segments
    return {
        "base": f"bs={bs}",
        "ckpt": f"bs={bs},ckpt={k}",
        "freeze": f"bs={bs},freeze=0.5",
        "tinytl": f"bs={bs},method=lite+bias",
        "all": f"bs={bs},mb=1,freeze=0.5,ckpt={k},method=lite+bias,prec=bf16",
    }


def memtracker_seconds(spec: str, resolution: int) -> float:
    """One MemTracker-tracked second step of MobileNetV2 on fake tensors (full training)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = MConfig.parse(spec)
    t0 = time.perf_counter()
    with FakeTensorMode():
        model = build("zoo:mobilenet_v2")
        prepare(model, cfg)
        opt = make_optimizer(model, cfg)
        assert opt is not None
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for step in range(2):
                (x,), y = model.make_batch(cfg.batch_size, resolution)
                model.loss(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
    return time.perf_counter() - t0


def speed(resolutions: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for res in resolutions:
        for spec in SPEED_CONFIGS:
            times = []
            for _ in range(repeats):
                r = profile("zoo:mobilenet_v2", spec, "meta", flops=False, resolution=res)
                times.append(r.timings_s["memory"])
            rows.append(
                {
                    "model": "zoo:mobilenet_v2",
                    "resolution": res,
                    "config": r.config,
                    "seconds_first": times[0],
                    "seconds_warm_median": statistics.median(times[1:] or times),
                    "peak_memory_bytes": r.peak_memory_bytes,
                }
            )
            log.info("speed %s", rows[-1])
        mt = [memtracker_seconds("bs=8", res) for _ in range(2)]
        rows.append(
            {
                "model": "zoo:mobilenet_v2",
                "resolution": res,
                "config": "bs=8 (PyTorch MemTracker, full training)",
                "seconds_first": mt[0],
                "seconds_warm_median": mt[1],
                "peak_memory_bytes": None,
            }
        )
    return rows


def zoo(names: list[str], resolution: int | None) -> list[dict[str, Any]]:
    rows = []
    for name in tqdm(names, desc="zoo"):
        with torch.device("meta"):
            n_blocks = len(build(f"zoo:{name}").blocks)
        for tech, spec in technique_configs(n_blocks).items():
            r = profile(f"zoo:{name}", spec, "meta", flops=False, resolution=resolution)
            rows.append(
                {
                    "model": name,
                    "technique": tech,
                    "config": r.config,
                    "resolution": r.resolution,
                    "peak_memory_bytes": r.peak_memory_bytes,
                    "breakdown": r.breakdown,
                    "trainable_params": r.trainable_params,
                    "seconds": r.timings_s["memory"],
                }
            )
    base = {r["model"]: r["peak_memory_bytes"] for r in rows if r["technique"] == "base"}
    for r in rows:
        r["reduction_vs_base"] = base[r["model"]] / r["peak_memory_bytes"]
    return rows


def _mib(x: int | None) -> str:
    return "" if x is None else f"{x / 2**20:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Profiler speed and memory savings",
        "",
        f"{result['tool_version']}; {result['when']}; meta mode (FakeTensorMode, no compute).",
        "",
        "## Seconds per (model, config), MobileNetV2, batch 8",
        "",
        "| resolution | config | first call s | warm s | MemTracker s / warm s | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    memtracker = {
        r["resolution"]: r["seconds_warm_median"]
        for r in result["speed"]
        if r["peak_memory_bytes"] is None
    }
    for r in result["speed"]:
        ratio = memtracker[r["resolution"]] / r["seconds_warm_median"]
        lines.append(
            f"| {r['resolution']} | {r['config']} | {r['seconds_first']:.2f} | "
            f"{r['seconds_warm_median']:.2f} | {ratio:.1f}× | {_mib(r['peak_memory_bytes'])} |"
        )
    lines += [
        "",
        "First call: includes FakeTensorMode's one-time warm-up in a fresh process. "
        "MemTracker: PyTorch's tracker on the same fake step (full training only: it "
        "cannot track frozen parameters).",
    ]
    lines += [
        "",
        "## Peak training memory on the zoo (MiB) and reduction vs. the baseline",
        "",
        "| model | technique | config | peak | params | grads | optimizer | activations "
        "| temporary | inputs | reduction |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["zoo"]:
        b = r["breakdown"]
        lines.append(
            f"| {r['model']} | {r['technique']} | {r['config']} | {_mib(r['peak_memory_bytes'])} "
            f"| {_mib(b['params'])} | {_mib(b['grads'])} | {_mib(b['optimizer'])} "
            f"| {_mib(b['activations'])} | {_mib(b['temporary'])} | {_mib(b['inputs'])} "
            f"| {r['reduction_vs_base']:.2f}× |"
        )
    lines += ["", "## Mean reduction per technique vs. published", ""]
    lines += ["| technique | ours (geometric mean over the zoo) | MobileNetV2 | published |"]
    lines += ["|---|---|---|---|"]
    for tech, pub in PUBLISHED.items():
        vals = [r["reduction_vs_base"] for r in result["zoo"] if r["technique"] == tech]
        mbv2 = [
            r["reduction_vs_base"]
            for r in result["zoo"]
            if r["technique"] == tech and r["model"] == "mobilenet_v2"
        ]
        if not vals:
            continue
        gmean = math.exp(sum(math.log(v) for v in vals) / len(vals))
        lines.append(
            f"| {tech} | {gmean:.2f}× | {mbv2[0]:.2f}× | {pub} |"
            if mbv2
            else f"| {tech} | {gmean:.2f}× | | {pub} |"
        )
    lines += [
        "",
        "Baseline: full fine-tuning, fp32, SGD with momentum, batch 8, no accumulation. "
        "Published ratios use other batch sizes and count whole-process memory (CUDA).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MobileNetV2 only, one repeat")
    ap.add_argument("--resolution", type=int, default=None, help="zoo resolution (default 224)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = ["mobilenet_v2"] if args.quick else list(ZOO_NAMES)
    result: dict[str, Any] = {
        "tool_version": tool_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
    }
    result["speed"] = speed([224, 64], 1 if args.quick else args.repeats + 1)
    result["zoo"] = zoo(names, args.resolution)
    write_results(args.out, "profiler_speed", result, markdown(result), indent=1)


if __name__ == "__main__":
    main()
