"""Generation and loading speed of the task data sets (items per second).

For each kind of data (classification digits, digit scenes for the four scene
tasks, pose figures) and each resolution, measures

* generation: building the in-memory data set from scratch (caches bypassed),
  after one warm-up so the digit sources are already loaded;
* iteration: one pass of a ``DataLoader`` (batch 64, no workers) over the built
  data set, i.e. ``__getitem__`` plus ``collate_fn``, what training pays.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tasks_data.py [--n 1000] [--repeats 3]
        [--resolutions 32,64,128]

Writes ``benchmarks/results/tasks_data.json`` and ``.md`` (atomically). The
contract asks for at least 1,000 scenes per second at R = 64; the machine's load
average is recorded beside the figures, since other work shares the cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from aiop.tasks.data import _classification, build_dataset, collate_fn
from aiop.tasks.pose import PoseConfig, generate_figures
from aiop.tasks.scenes import SceneConfig, generate_scenes

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"
TARGET_SCENES_PER_S = 1000.0
log = logging.getLogger("tasks_data")


def _generators(n: int, r: int) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Per kind: the task whose DataLoader is timed, and a cache-free generator."""
    return {
        "classification": (
            "classification",
            lambda: _classification.__wrapped__("train", r, None, 0, "mnist"),
        ),
        "scenes": (
            "instance",
            lambda: generate_scenes("train", n, config=SceneConfig(resolution=r)),
        ),
        "pose": ("pose", lambda: generate_figures("train", n, config=PoseConfig(resolution=r))),
    }


def _items_per_s(
    fn: Callable[[], Any], count: Callable[[Any], int], repeats: int
) -> tuple[float, float]:
    """Median items per wall-clock second and per CPU second of this process.

    The CPU-time rate is what the code achieves on an idle core; the wall-clock
    rate also pays for whatever else shares the machine.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        c1, t1 = time.process_time(), time.perf_counter()
        wall.append(count(out) / (t1 - t0))
        cpu.append(count(out) / max(c1 - c0, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def _loader_pass(ds: Dataset, task: str) -> int:
    seen = 0
    for images, _ in DataLoader(ds, batch_size=64, collate_fn=collate_fn(task)):
        seen += len(images)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="scenes / figures per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolutions", default="32,64,128")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    resolutions = [int(r) for r in args.resolutions.split(",")]

    rows: list[dict[str, Any]] = []
    for r in resolutions:
        for kind, (task, gen) in _generators(args.n, r).items():
            gen()  # warm-up: loads the digits, fills resize caches
            gen_wall, gen_cpu = _items_per_s(gen, len, args.repeats)
            n = None if kind == "classification" else args.n
            ds = build_dataset(task, "train", resolution=r, n=n)
            it_wall, it_cpu = _items_per_s(
                lambda ds=ds, task=task: _loader_pass(ds, task), int, args.repeats
            )
            rows.append(
                {
                    "kind": kind,
                    "resolution": r,
                    "items": len(ds),
                    "generate_items_per_s": round(gen_wall, 1),
                    "generate_items_per_cpu_s": round(gen_cpu, 1),
                    "iterate_items_per_s": round(it_wall, 1),
                    "iterate_items_per_cpu_s": round(it_cpu, 1),
                }
            )
            log.info(
                "%-14s R=%-4d generate %7.0f/s (%7.0f/cpu-s)  iterate %7.0f/s (%7.0f/cpu-s)",
                kind,
                r,
                gen_wall,
                gen_cpu,
                it_wall,
                it_cpu,
            )

    result = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tasks_data.py "
        f"--n {args.n} --repeats {args.repeats} --resolutions {args.resolutions}",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "target_scenes_per_s_at_64": TARGET_SCENES_PER_S,
        "rows": rows,
    }
    lines = [
        f"Command: `{result['command']}`; 1-min load average at the end: "
        f"{result['machine']['load_average_1min_at_end']:.2f} on {os.cpu_count()} CPUs.",
        "",
        "| data | R | items | generate: items/s (per CPU-s) | DataLoader pass: items/s "
        "(per CPU-s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kind']} | {row['resolution']} | {row['items']} "
            f"| {row['generate_items_per_s']:.0f} ({row['generate_items_per_cpu_s']:.0f}) "
            f"| {row['iterate_items_per_s']:.0f} ({row['iterate_items_per_cpu_s']:.0f}) |"
        )
    lines.append("")
    lines.append(f"Target: ≥ {TARGET_SCENES_PER_S:.0f} scenes/s generated at R = 64.")
    md = "\n".join(lines) + "\n"
    write_results(args.out, "tasks_data", result, md)
    print(md)


if __name__ == "__main__":
    main()
