#!/usr/bin/env python3
"""Draw computational graphs with graphviz, as AIO-P's ``visualize_cgs.py`` does.

    python scripts/visualize_cgs.py -input graphs/ -output_dir figs -format svg
    python scripts/visualize_cgs.py -input cache.db -output_dir figs -format png -limit 20

``-input`` takes graph files (``.json``/``.json.gz``), folders of them, or aiop
cache stores (``.db``); several may be given. One picture per graph lands in
``-output_dir``. A graph that cannot be read or drawn is reported and skipped:
the exit code is then 1. Bad arguments exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from aiop.cg.draw import DEFAULT_MAX_NODES, FORMATS, RANKDIRS, draw_many
    from aiop.cg.graph import CGError
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aiop.cg.draw import DEFAULT_MAX_NODES, FORMATS, RANKDIRS, draw_many
    from aiop.cg.graph import CGError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="visualize_cgs.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "-input",
        "--input",
        nargs="+",
        type=Path,
        required=True,
        help="graph .json/.json.gz files, folders of them, or aiop cache .db stores",
    )
    p.add_argument("-output_dir", "--output-dir", type=Path, required=True, help="where to draw")
    p.add_argument("-format", "--format", default="svg", choices=FORMATS, help="picture format")
    p.add_argument("-limit", "--limit", type=_positive, help="draw at most N graphs")
    p.add_argument(
        "-max_nodes",
        "--max-nodes",
        type=_positive,
        default=DEFAULT_MAX_NODES,
        help=f"skip graphs with more nodes than this (default {DEFAULT_MAX_NODES})",
    )
    p.add_argument("-rankdir", "--rankdir", default="TB", choices=RANKDIRS, help="layout direction")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log each skipped graph as it fails"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Failures are listed once at the end; -v also logs them as they happen.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s"
    )
    missing = [str(p) for p in args.input if not p.exists()]
    if missing:
        print(f"visualize_cgs.py: error: no such input: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        drawn = draw_many(
            args.input,
            args.output_dir,
            args.format,
            limit=args.limit,
            max_nodes=args.max_nodes,
            rankdir=args.rankdir,
            progress=not args.quiet,
        )
    except CGError as exc:
        print(f"visualize_cgs.py: error: {exc}", file=sys.stderr)
        return 2
    for source, reason in drawn.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(f"drew {len(drawn)} graph(s) to {args.output_dir}, {len(drawn.failed)} failed")
    return 1 if drawn.failed else 0


if __name__ == "__main__":
    sys.exit(main())
