#!/usr/bin/env python
"""Fill a store with profiler labels (AIO-P's run_profiler.py, crash-safe and resumable).

    python scripts/run_profiler.py -cache_file store.db -models family:ofa_mbv3:0 zoo:resnet18 \
        -profiler memory flops params -mode meta -configs random:16

Without ``-reprofile`` labels already in the store are kept and skipped, so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys

from aiop.cache import CacheError, Store
from aiop.cache.runner import PROFILERS, add_models, configs_for_graph, profile_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-cache_file", required=True, help="SQLite store (created if missing)")
    parser.add_argument("-models", nargs="*", default=[], help="MODELs to add before profiling")
    parser.add_argument(
        "-family_samples",
        nargs="*",
        default=[],
        metavar="FAMILY:N",
        help="add N deterministic samples of a family, e.g. ofa_mbv3:40",
    )
    parser.add_argument(
        "-profiler", nargs="+", default=["memory", "flops", "params"], choices=PROFILERS
    )
    parser.add_argument("-mode", default="meta", choices=["meta", "real", "cuda"])
    parser.add_argument("-configs", default="random:16", help="grid, random:N or 'spec;spec'")
    parser.add_argument("-reprofile", action="store_true", help="measure existing labels again")
    parser.add_argument("-latency_steps", type=int, default=5, help="timed steps per config")
    parser.add_argument("-latency_warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "-batch_sizes",
        type=int,
        nargs="+",
        default=[16, 64, 256],
        help="batch sizes the -configs grid or random draw takes",
    )
    parser.add_argument(
        "-select",
        nargs="*",
        default=None,
        metavar="GLOB",
        help="profile only the store's graphs whose name matches one of these globs, "
        "e.g. 'family:*' (default: every graph)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if any(b < 1 for b in args.batch_sizes):
            raise CacheError("-batch_sizes must be positive integers")
        configs_for_graph(
            "0", args.configs, 1, batch_sizes=args.batch_sizes
        )  # bad -configs fail before anything is written
        models = list(args.models)
        for item in args.family_samples:
            family, _, n = item.partition(":")
            if not n.isdigit():
                raise CacheError(f"-family_samples wants FAMILY:N, not {item!r}")
            models += [f"family:{family}:{seed}" for seed in range(int(n))]
        if models:
            with Store(args.cache_file) as store:
                add_models(store, models, progress=not args.quiet)
        graphs = None
        if args.select is not None:
            with Store(args.cache_file) as store:
                graphs = [
                    i.fingerprint
                    for i in store.graphs()
                    if any(fnmatch.fnmatchcase(i.name, g) for g in args.select)
                ]
            if not graphs:
                raise CacheError(f"-select {' '.join(args.select)} matches no graph of the store")
        report = profile_store(
            args.cache_file,
            args.profiler,
            mode=args.mode,
            configs=args.configs,
            reprofile=args.reprofile,
            graphs=graphs,
            latency_steps=args.latency_steps,
            latency_warmup=args.latency_warmup,
            batch_sizes=args.batch_sizes,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; run again to resume", file=sys.stderr)
        return 130
    except (CacheError, ValueError) as exc:
        print(f"run_profiler: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    summary = {"measured": report.measured, "skipped": report.skipped, "failed": len(report.failed)}
    print(
        json.dumps(summary)
        if args.json
        else f"measured {report.measured}, skipped {report.skipped} (already labelled), "
        f"failed {len(report.failed)}"
    )
    for fp, spec, reason in report.failed[:10]:
        print(f"  failed {fp} {spec}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
