"""Subcommands of ``aiop`` that this subpackage owns: ``plan`` and ``retrain``.

``aiop.cli`` calls :func:`register` while it builds its parser; keep imports at
module level light (argparse only) so ``aiop --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


class RetrainUsageError(ValueError):
    """Bad ``retrain``/``plan`` arguments."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def is_url(text: str | None) -> bool:
    return bool(text) and str(text).lower().startswith(("http://", "https://"))


class FallbackPredictor:
    """A remote predictor that switches to a local one for good once the remote fails.

    Used when ``--fallback-predictor`` is given: a server that goes away in the
    middle of a retraining run must not stop the run.
    """

    def __init__(self, remote: Any, fallback: str) -> None:
        self.remote = remote
        self.fallback = fallback
        self.local: Any = None

    def _active(self) -> Any:
        return self.local if self.local is not None else self.remote

    @property
    def error_quantiles(self) -> Any:
        return getattr(self._active(), "error_quantiles", None)

    def predict(self, cg: Any, configs: Any) -> list[dict[str, Any]]:
        if self.local is None:
            try:
                return self.remote.predict(cg, configs)
            except Exception as exc:  # the server went away: plan locally from now on
                import logging

                from aiop.cli import load_predictor

                logging.getLogger(__name__).warning(
                    "remote predictor failed (%s); using local %s from now on", exc, self.fallback
                )
                self.local = load_predictor(None if self.fallback == "default" else self.fallback)
        return self.local.predict(cg, configs)


def resolve_predictor(spec: str | None, fallback: str | None = None) -> tuple[Any, str]:
    """A predictor for ``--predictor FILE|URL`` and a line saying which one it is.

    A URL becomes the service's ``RemotePredictor`` (imported lazily); when it
    cannot be reached, ``fallback`` (a file, or ``"default"`` for the shipped
    predictor) is loaded instead, or a clear error is raised.
    """
    from aiop.cli import load_predictor

    if not is_url(spec):
        if fallback:
            raise RetrainUsageError("--fallback-predictor only applies when --predictor is a URL")
        return load_predictor(spec), f"local predictor {spec or '(shipped default)'}"
    assert spec is not None
    try:
        from aiop.service.client import RemotePredictor
    except ImportError as exc:
        remote_error: str = f"the HTTP client is not available ({exc})"
    else:
        try:
            remote = RemotePredictor(spec)
            check = getattr(remote, "health", None) or getattr(remote, "ping", None)
            if callable(check):
                check()
            if fallback:
                return FallbackPredictor(remote, fallback), (
                    f"remote predictor {spec} (local {fallback} if it fails)"
                )
            return remote, f"remote predictor {spec}"
        except Exception as exc:  # any transport failure means: unreachable
            remote_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if fallback:
        local = load_predictor(None if fallback == "default" else fallback)
        import logging

        logging.getLogger(__name__).warning(
            "remote predictor %s unreachable (%s); using local %s", spec, remote_error, fallback
        )
        return local, f"local predictor {fallback} (remote {spec} unreachable: {remote_error})"
    raise RetrainUsageError(
        f"remote predictor {spec} is unreachable ({remote_error}); "
        "give --fallback-predictor FILE (or 'default') to plan locally"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from aiop.cg import graph_for_model, parse_input_shape
    from aiop.cli import emit, format_table, human_bytes
    from aiop.mpopt.planner import plan

    predictor, source = resolve_predictor(args.predictor, args.fallback_predictor)
    cg = graph_for_model(args.model, parse_input_shape(args.input_shape))
    result = plan(
        cg,
        args.budget_mb,
        predictor,
        time_budget_s=args.time_budget_s,
        top_k=args.top_k,
        margin=args.margin,
        batch_size=args.batch_size,
        search=args.search,
        device=args.device,
    )
    data = result.to_dict()
    data["model"] = args.model
    data["predictor"] = source

    def text() -> str:
        rows = [
            {
                "#": i + 1,
                "config": r["config"],
                "predicted peak": human_bytes(r["predicted_peak_bytes"]),
                "with margin": human_bytes(r["predicted_peak_with_margin_bytes"]),
                "latency": f"{r['predicted_latency_s'] * 1000:.1f} ms"
                if r["predicted_latency_s"] is not None
                else f"~{r['estimated_step_gflops']:.1f} GFLOP",
                "accuracy": f"{r['predicted_accuracy']:.3f} ({r['accuracy_source']})",
                "rule": r["rule"],
            }
            for i, r in enumerate(data["ranked"])
        ]
        dev = data["device"] or {}
        where = (
            f"device {dev.get('name')}; budget {data['budget_mb']:g} MB ({data['budget_source']})"
        )
        return (
            format_table(rows)
            + f"\n\n{data['explanation']}\n{where}\n"
            + f"planned in {data['planning_seconds'] * 1000:.0f} ms"
        )

    emit(args, data, text)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from aiop.mpopt.loop import run_from_args

    return run_from_args(args)


def register(sub: Any, model_help: str) -> None:
    """Add ``plan`` and ``retrain`` to ``aiop``'s subparsers."""
    p = sub.add_parser("plan", help="plan m-hyperparameters under a memory budget")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--budget-mb",
        type=_positive_float,
        help="memory budget, MiB (default: the --device's memory)",
    )
    p.add_argument(
        "--device",
        metavar="NAME|FILE.json",
        default="cpu",
        help="the training device: cpu (this machine, default), cuda, edge, or a JSON file "
        "(name, memory_budget_mb, precision_time)",
    )
    p.add_argument("--predictor", help="predictor file or http(s) URL (default: the shipped one)")
    p.add_argument(
        "--fallback-predictor",
        metavar="FILE",
        help="local predictor when the --predictor URL is unreachable ('default': shipped one)",
    )
    p.add_argument("--time-budget-s", type=_positive_float, help="max predicted step latency")
    p.add_argument("--batch-size", type=_positive_int, help="training batch size (default 64)")
    p.add_argument("--margin", type=float, help="safety margin (default: predictor's quantiles)")
    p.add_argument("--top-k", type=_positive_int, default=10, help="ranked configs to show")
    p.add_argument(
        "--search",
        choices=["bounded", "exhaustive"],
        default="bounded",
        help="bounded: stop once no unasked group can enter the top-k (same ranking, fewer "
        "predictions); exhaustive: predict every candidate (full feasible count)",
    )
    p.add_argument("--input-shape", help="N,C,H,W (required when the file has no static shape)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "retrain", help="online retraining on a drifting stream under a memory budget"
    )
    p.add_argument("--model", default="zoo:mobilenet_v2", help="zoo:NAME or family:FAMILY:SEED")
    p.add_argument("--stream", default="digits-c", help="named domain stream (e.g. digits-c)")
    p.add_argument("--budget-mb", required=True, type=_positive_float, help="memory budget, MiB")
    p.add_argument(
        "--budget-schedule",
        metavar="STEP:MB,...",
        help="budget changes during the run, e.g. 0:300,40:150",
    )
    p.add_argument("--predictor", help="predictor file or http(s) URL (default: the shipped one)")
    p.add_argument(
        "--fallback-predictor",
        metavar="FILE",
        help="local predictor when the --predictor URL is unreachable ('default': shipped one)",
    )
    p.add_argument("--mode", choices=["supervised", "tent"], default="supervised")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="training batch size")
    p.add_argument("--resolution", type=_positive_int, default=32, help="input size, px")
    p.add_argument("--steps-per-domain", type=_positive_int, default=20)
    p.add_argument("--top-k", type=_positive_int, default=3, help="candidates compared by Aco")
    p.add_argument(
        "--drift",
        choices=["both", "detect", "metadata"],
        default="both",
        help="what re-plans on a domain change: the stream's boundaries (metadata), drift "
        "detected in the incoming batches' statistics without labels (detect), or both",
    )
    p.add_argument(
        "--selection",
        choices=["evidence", "prior"],
        default="evidence",
        help="how a probed challenger replaces the planner's choice: paired per-image probe "
        "evidence pooled across re-plans (evidence), or a gain of two probe images (prior)",
    )
    p.add_argument(
        "--optimizer-state",
        choices=["reset", "keep"],
        default="reset",
        help="a re-plan that keeps the trainable parameters and optimizer: start a fresh "
        "optimizer (reset) or keep its momentum (keep)",
    )
    p.add_argument(
        "--no-probe-beyond-margin",
        action="store_true",
        help="never probe a candidate that only the safety margin rules out (see README)",
    )
    p.add_argument(
        "--drift-threshold",
        type=_positive_float,
        default=1.0,
        help="input-statistics shift, in reference standard deviations, that counts as drift",
    )
    p.add_argument("--out", default="out/retrain", help="folder for report, plot, checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_retrain)
