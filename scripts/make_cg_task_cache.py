#!/usr/bin/env python3
"""Merge cache files into one store or file, as AIO-P's ``make_cg_task_cache.py`` does.

    python scripts/make_cg_task_cache.py -inputs a.db b.db runs/c.pkl -output all.db --trust-pickle
    python scripts/make_cg_task_cache.py -cache_dir cache -family ofa_mbv3 -suffix v1 \\
        -test_metric val_PCK --trust-pickle     # AIO-P's flags: writes gpi_..._comp_graph_cache.pkl

Inputs are aiop stores (``.db``), their JSON exports (``.json``) or AIO-P pickles
(``.pkl``, read only with ``--trust-pickle``). The output is a store unless it
ends in ``.pkl`` or ``.json``. Bad input exits 2 with one line on stderr and
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

try:
    from aiop.cache import CacheError, merge_stores
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aiop.cache import CacheError, merge_stores

# AIO-P's short test-metric names for its detectron2 tasks.
DETECTRON2_METRICS = {
    "obj_det": "obj_det_AP",
    "inst_seg": "inst_seg_AP",
    "sem_seg": "sem_seg_mIoU",
    "pan_seg": "pan_seg_PQ",
}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="make_cg_task_cache.py", description=__doc__.split("\n")[0])
    p.add_argument("-inputs", "--inputs", nargs="+", type=Path, help="stores, .json or .pkl")
    p.add_argument("-output", "--output", type=Path, help="OUT.db (added to), OUT.pkl or OUT.json")
    p.add_argument("-cache_dir", "--cache-dir", type=Path, help="AIO-P: merge files found here")
    p.add_argument("-family", "--family", help="AIO-P: only files whose name starts with this")
    p.add_argument("-suffix", "--suffix", default="merged", help="AIO-P: output name suffix")
    p.add_argument("-test_metric", "--test-metric", help="AIO-P: label to export as 'acc'")
    p.add_argument("-task", "--task", default="classification", help="task of AIO-P's 'acc'")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading .pkl inputs")
    p.add_argument("--replace", action="store_true", help="later inputs overwrite labels")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def resolve_io(args: argparse.Namespace) -> tuple[list[Path], Path, str]:
    """Inputs, output and exported metric from either flag style."""
    metric = DETECTRON2_METRICS.get(args.test_metric or "acc", args.test_metric or "acc")
    inputs = list(args.inputs or [])
    if args.cache_dir is not None:
        if not args.cache_dir.is_dir():
            raise CacheError(f"{args.cache_dir}: no such directory")
        prefix = args.family or ""
        inputs += sorted(
            f
            for f in args.cache_dir.iterdir()
            if f.suffix in (".pkl", ".db")
            and f.name.startswith(prefix)
            and not f.name.startswith("gpi_")
        )
    output = args.output
    if output is None:
        if args.cache_dir is None or not args.family or not args.test_metric:
            raise CacheError("give -output, or -cache_dir with -family and -test_metric")
        name = f"gpi_{args.family}_{args.test_metric}_{args.suffix}_comp_graph_cache.pkl"
        output = args.cache_dir / name
    if not inputs:
        raise CacheError("no input caches given or found")
    return inputs, output, metric


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        inputs, output, metric = resolve_io(args)
        report = merge_stores(
            inputs,
            output,
            trust_pickle=args.trust_pickle,
            task=args.task,
            metric=metric,
            replace=args.replace,
        )
    except CacheError as exc:
        print(f"make_cg_task_cache.py: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps({"output": report.output, "inputs": report.inputs, "totals": report.totals})
        )
    else:
        for row in report.inputs:
            added = ", ".join(f"{k} {v}" for k, v in row.items() if k != "path")
            print(f"{row['path']}: {added}")
        print(f"{report.output}: " + ", ".join(f"{k} {v}" for k, v in report.totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
