"""Predictions per second for one MobileNetV2-sized graph over many configurations,
against the meta-mode profiler on the same machine, in one run.

    .venv/bin/python benchmarks/predictor_speed.py [--predictor FILE] [--configs 4096 16384]
        [--out DIR]

Writes ``predictor_speed.json`` and ``.md`` in ``--out`` (default
``benchmarks/results``). Without a predictor file it fits a tiny one on analytic
labels (speed does not depend on the weights). ``--acc_forest`` gives that predictor an
accuracy forest too (``acc_head="forest"``), fitted on labels that vary with the
configuration, so its splits read the configuration vector: every configuration is a row
of its own, the forest's slowest case. Result stem: ``predictor_speed_forest``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from aiop.cg import graph_for_model
from aiop.mconfig import MSpace
from aiop.predictor.analytic import estimate_memory
from aiop.predictor.api import Predictor, Sample
from aiop.predictor.model import GNNSpec
from aiop.profiler import profile

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"


def _predictor(path: str | None, cg, acc_forest: bool = False) -> Predictor:
    if path:
        return Predictor.load(path)
    configs = MSpace(batch_sizes=(8, 32), segments=(0, 1)).sample(16, seed=0)
    samples = []
    for c in configs:
        labels = {"memory": float(estimate_memory(cg, c).peak_memory_bytes)}
        if acc_forest:  # a synthetic accuracy that moves with the configuration
            labels["acc:cls"] = 0.9 - 0.1 * c.freeze - 0.001 * c.batch_size
        samples.append(Sample(cg, c, labels))
    targets = ["memory", "acc:cls"] if acc_forest else ["memory"]
    head = "forest" if acc_forest else "gnn"
    p = Predictor(spec=GNNSpec(), targets=targets, epochs=1, progress=False, acc_head=head)
    p.fit(samples)
    if acc_forest and p.acc_readouts["acc:cls"].max_feature_used < 0:
        raise RuntimeError("the synthetic accuracy forest did not split")
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mobilenet_v2")
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--configs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--profiles", type=int, default=5, help="meta-mode profiles to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per grid (median)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    parser.add_argument(
        "--acc_forest", action="store_true", help="time a predictor with an accuracy forest"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cg = graph_for_model(args.model)
    predictor = _predictor(args.predictor, cg, args.acc_forest)
    n_blocks = 17
    space = MSpace.for_model(n_blocks, batch_size=256, optimizers=("sgd", "adam", "adamw"))
    rows = []
    profile_times = []
    for c in space.sample(args.profiles, seed=2):
        t0 = time.perf_counter()
        profile(args.model, c, mode="meta", flops=False)
        profile_times.append(time.perf_counter() - t0)
    per_profile = statistics.median(profile_times)
    for n in args.configs:
        configs = space.sample(min(n, len(space)), seed=1)
        predictor.predict(cg, configs[:8])  # warm-up
        runs, cpu_runs = [], []
        for _ in range(args.repeats):
            # a fresh predictor cache each run: nothing is carried over between runs
            predictor.clear_caches()
            t0, c0 = time.perf_counter(), time.process_time()
            predictor.predict(cg, configs)
            runs.append(time.perf_counter() - t0)
            cpu_runs.append(time.process_time() - c0)
        predict_s = statistics.median(runs)
        # CPU seconds of this process: what the wall time would be on an idle core (the
        # wall time also counts time other processes held this core)
        cpu_s = statistics.median(cpu_runs)
        rows.append(
            {
                "configs": len(configs),
                "structural_keys": len({(c.freeze, c.ckpt, c.method) for c in configs}),
                "predict_s": predict_s,
                "predictions_per_s": len(configs) / predict_s,
                "predict_cpu_s": cpu_s,
                "predictions_per_cpu_s": len(configs) / cpu_s,
                "speedup": per_profile / (predict_s / len(configs)),
            }
        )
    result = {
        "model": args.model,
        "nodes": cg.num_nodes,
        "meta_profile_s_median": per_profile,
        "threads": torch.get_num_threads(),
        "runs": rows,
    }
    md = "| graph | configs (distinct freeze/ckpt/method) | predictions/s (wall) "
    md += "| predictions per CPU-second | meta profile | speed-up (wall) |\n"
    md += "|---|---|---|---|---|---|\n"
    for r in rows:
        md += (
            f"| {args.model} ({cg.num_nodes} nodes) | {r['configs']} ({r['structural_keys']}) | "
            f"{r['predictions_per_s']:,.0f} | {r['predictions_per_cpu_s']:,.0f} | "
            f"{per_profile:.2f} s | {r['speedup']:,.0f}× |\n"
        )
    result["acc_forest"] = bool(predictor.acc_readouts)
    stem = "predictor_speed_forest" if args.acc_forest else "predictor_speed"
    write_results(args.out, stem, result, md)
    print(md)


if __name__ == "__main__":
    main()
