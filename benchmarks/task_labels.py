#!/usr/bin/env python
"""Seconds per architecture label, per task, on this machine (target: <= 60 s).

    nice -n 5 .venv/bin/python benchmarks/task_labels.py --models family:ofa_mbv3:0

Labels each (model, task) with the default recipe (``TrainConfig()``: the task's
default resolution, 2 epochs of 1,000 samples, batch 16) into the store through
:func:`aiop.tasks.labels.label_archs` — exactly what ``run_train_cgs_on_task.py``
does — and reports the wall seconds and CPU seconds (this process's CPU time:
one core's work, which is what the target is about when other jobs share the
cores) each label took, as recorded with the label. A (model, task) already in
the store is not trained again: its recorded timings are reported, marked
``reused``. Results: ``benchmarks/results/task_labels.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("detection", "instance", "panoptic", "classification", "semantic", "pose")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["family:ofa_mbv3:0"])
    p.add_argument("--tasks", nargs="+", default=list(ORDER))
    p.add_argument("--store", default=str(ROOT / "data" / "task_labels.db"))
    p.add_argument("--out", default="task_labels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from aiop.cache import Store
    from aiop.tasks.labels import label_archs
    from aiop.tasks.train import DEFAULT_RESOLUTION, PRIMARY_METRIC, TrainConfig

    rows: list[dict[str, Any]] = []
    for spec in args.models:
        for task in args.tasks:
            report = label_archs(
                args.store, [spec], [task], TrainConfig(), tag="individual", progress=False
            )
            with Store(args.store, readonly=True) as store:
                models = {i.fingerprint: i.meta.get("model") for i in store.graphs()}
                rec = next(
                    r
                    for r in store.labels(kind="acc", task=task, mode="individual")
                    if models.get(r.graph) == spec
                )
            rows.append(
                {
                    "model": spec,
                    "task": task,
                    "resolution": DEFAULT_RESOLUTION[task],
                    "metric": PRIMARY_METRIC[task],
                    "value": round(rec.value, 4),
                    "wall_s": rec.extra.get("seconds"),
                    "cpu_s": rec.extra.get("cpu_seconds"),
                    "steps": rec.extra.get("steps"),
                    "reused": not report.labelled,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "command": "python benchmarks/task_labels.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "target_s": 60,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Seconds per architecture label",
        "",
        f"Command: `{result['command']}` ({result['machine']}; "
        f"OMP_NUM_THREADS={result['omp_num_threads']})",
        "",
        "| model | task | px | metric | value | wall s | CPU s | steps | ≤ 60 s CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["cpu_s"] is not None and r["cpu_s"] <= 60 else "no"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['resolution']} | {r['metric']} | {r['value']} "
            f"| {r['wall_s']} | {r['cpu_s']} | {r['steps']} | {ok} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
