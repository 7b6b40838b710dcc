"""The ``aiop`` command.

Every subcommand prints a readable table, or JSON with ``--json``. Bad input
exits with code 2 and one line on stderr (set ``AIOP_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiop import __version__
from aiop.units import human_bytes, human_flops

log = logging.getLogger("aiop")


# Subcommands owned by higher layers (plan/retrain, serve): each module has
# register(subparsers, model_help) and imports only argparse at module level.
COMMAND_MODULES: tuple[str, ...] = ("aiop.mpopt.cli", "aiop.service.cli")


class UsageError(ValueError):
    """Bad command-line input."""


# -- output helpers ------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain text table with a header row; columns default to the first row's keys."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text())


# -- subcommands ---------------------------------------------------------------


def cmd_cg(args: argparse.Namespace) -> int:
    from aiop.cg import graph_for_model, parse_input_shape

    cg = graph_for_model(args.model, parse_input_shape(args.input_shape))
    written: dict[str, str] = {}
    if args.out:
        written["graph"] = str(cg.save(args.out))
    if args.draw:
        from aiop.cg import draw

        written["drawing"] = str(draw(cg, args.draw))
    summary = cg.summary()
    summary["written"] = written

    def text() -> str:
        rows = [
            {"field": "model", "value": args.model},
            {"field": "fingerprint", "value": summary["fingerprint"]},
            {"field": "nodes / edges", "value": f"{cg.num_nodes} / {cg.num_edges}"},
            {
                "field": "inputs",
                "value": ", ".join("x".join(map(str, s)) for s in summary["inputs"]),
            },
            {"field": "params", "value": f"{cg.total_params:,}"},
            {"field": "FLOPs (forward)", "value": human_flops(cg.total_flops)},
            {"field": "activations", "value": human_bytes(cg.total_activation_bytes)},
            {
                "field": "ops",
                "value": ", ".join(f"{k}×{v}" for k, v in list(summary["ops"].items())[:8]),
            },
        ]
        rows += [{"field": f"wrote {k}", "value": v} for k, v in written.items()]
        return format_table(rows)

    emit(args, summary, text)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from aiop.models import zoo_table

    rows = zoo_table()

    def text() -> str:
        shown = [
            {
                "model": r["name"],
                "kind": r.get("kind", ""),
                "input": "x".join(map(str, r.get("input_size", ()))),
                "params": f"{r['params']:,}"
                if isinstance(r.get("params"), int)
                else r.get("params", ""),
                "FLOPs": human_flops(r["flops"])
                if isinstance(r.get("flops"), (int, float))
                else "",
                "notes": r.get("description", ""),
            }
            for r in rows
        ]
        return format_table(shown)

    emit(args, rows, text)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from aiop.profiler import profile

    result = profile(args.model, args.config, mode=args.mode, latency=args.latency)
    data = result.to_dict()

    def text() -> str:
        rows = [
            {"field": "model", "value": args.model},
            {"field": "config", "value": data.get("config")},
        ]
        rows.append({"field": "mode", "value": data.get("mode")})
        rows.append({"field": "peak memory", "value": human_bytes(data["peak_memory_bytes"])})
        for key, value in data.get("breakdown", {}).items():
            rows.append({"field": f"  {key}", "value": human_bytes(value)})
        for key in ("flops", "params", "trainable_params", "latency_s"):
            if data.get(key) is not None:
                rows.append({"field": key, "value": data[key]})
        return format_table(rows)

    emit(args, data, text)
    return 0


def default_predictor_path() -> Path:
    """The predictor shipped in the package (``aiop/data/default_predictor.safetensors``)."""
    return Path(__file__).parent / "data" / "default_predictor.safetensors"


def load_predictor(path: str | None) -> Any:
    from aiop.predictor.api import Predictor, PredictorError

    chosen = Path(path) if path else default_predictor_path()
    if not chosen.is_file():
        hint = "" if path else " (the packaged default is missing: train one, see README)"
        raise PredictorError(f"no predictor file at {chosen}{hint}")
    return Predictor.load(chosen)


def cmd_predict(args: argparse.Namespace) -> int:
    from aiop.cg import graph_for_model, parse_input_shape

    predictor = load_predictor(args.predictor)
    cg = graph_for_model(args.model, parse_input_shape(args.input_shape))
    results = predictor.predict(cg, args.config)
    for r in results:
        r["model"] = args.model
    data: Any = results[0] if len(results) == 1 else results

    def text() -> str:
        rows = []
        for r in results:
            rows.append(
                {
                    "config": r["config"],
                    "peak memory": human_bytes(r["peak_memory_bytes"]),
                    "analytic": human_bytes(r["peak_memory_bytes_analytic"]),
                    "latency": f"{r['latency_s'] * 1000:.1f} ms" if "latency_s" in r else "",
                    "FLOPs/sample": human_flops(r["flops"]),
                    "trainable": f"{r['trainable_params']:,}",
                }
            )
        return format_table(rows)

    emit(args, data, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aiop.demo import run_demo

    return run_demo(Path(args.out), as_json=args.json)


# -- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiop",
        description="Graph-based performance predictor for training under a memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"aiop {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    model_help = "a .onnx/.pb/.json path, zoo:NAME or family:FAMILY:SEED"

    p = sub.add_parser("cg", help="build the computational graph of a model")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--input-shape", help="N,C,H,W (required when the file has no static shape)")
    p.add_argument("--out", help="write the graph as JSON (.json or .json.gz)")
    p.add_argument("--draw", help="draw the graph (.svg, .png, .pdf or .dot)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cg)

    p = sub.add_parser("zoo", help="the model zoo and architecture families")
    p.add_argument("action", choices=["list"], help="what to do")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("profile", help="measure peak training memory, FLOPs and latency")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--config", required=True, metavar="SPEC", help="e.g. bs=32,mb=8,freeze=0.5")
    p.add_argument("--mode", choices=["meta", "real", "cuda"], default="meta")
    p.add_argument("--latency", action="store_true", help="also time training steps")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("predict", help="predict memory, latency and FLOPs without profiling")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--config", required=True, action="append", metavar="SPEC", help="repeat for several"
    )
    p.add_argument("--predictor", help="predictor file (default: the one shipped with aiop)")
    p.add_argument("--input-shape", help="N,C,H,W (required when the file has no static shape)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="run the main job end to end on built-in models")
    p.add_argument("--out", default="out/demo", help="folder for graphs, drawings and results")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, model_help)
    return parser


# What a command that stopped because its output's reader went away (``aiop … | head``)
# exits with: 128 + SIGPIPE, the status a shell reports for a Unix tool that SIGPIPE killed,
# so ``set -o pipefail`` scripts see the same as with ``cat``/``yes``, and it stays
# distinct from 0 (all output delivered), 1 (a crash) and 2 (bad input).
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point file descriptor 1 at ``os.devnull``: what is still buffered in ``sys.stdout``
    then goes nowhere at the interpreter's final flush instead of raising
    ``BrokenPipeError`` again (the idiom in Python's ``signal`` module documentation)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing will flush into a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``aiop`` command; returns its exit status.

    A closed standard output (``aiop predict … --json | head -1``) ends the command
    quietly with :data:`EXIT_BROKEN_PIPE`, without a traceback.
    """
    try:
        try:
            status = _main(argv)
        except SystemExit:
            # argparse's --help, --version and usage errors: their output is still in
            # the buffer; flush it here, where a closed pipe can be caught
            sys.stdout.flush()
            raise
        # the output usually reaches the pipe only now (a pipe is block-buffered)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("aiop: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        # Our error classes (CGError, ConfigError, CacheError, ...) derive from ValueError.
        if os.environ.get("AIOP_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"aiop: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
