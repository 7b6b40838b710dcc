"""MPOptimizer against its baselines: budget violations, planning time, accuracy.

    .venv/bin/python benchmarks/mpopt.py [--parts violations timing accuracy]
        [--models zoo:mobilenet_v2 zoo:resnet18 zoo:proxylessnas_mobile] [--budgets 30]
        [--timing-candidates 48] [--accuracy-model zoo:mobilenet_v2] [--accuracy-budgets ...]
        [--stream digits-c] [--steps-per-domain 8]

Three parts, each written to ``benchmarks/results/mpopt.json`` and ``.md``
(a part that is not run keeps its earlier result):

* ``violations``: for every model, random budgets (log-uniform between the
  smallest planned peak and 1.2× full fine-tuning's); the planner (shipped
  predictor, default MPOptimizer grid, batch 32 at 32 px, 10 classes) picks a
  configuration; its true peak is measured with the profiler (meta mode, equal
  byte for byte to a real CPU step); a violation is a measured peak above the
  budget.
* ``timing``: the same candidate list planned two ways, side by side in one
  process: by the predictor (cold cache), and by a profiling-based planner that
  measures every candidate (meta mode — faster than the real steps a device
  would run, so the ratio is conservative) and ranks with the same rules.
* ``accuracy``: supervised online retraining on a drifting stream under each
  budget. Fixed baselines (full fine-tuning, TinyTL-B, TinyTL-L+B: batch 32, no
  micro-batching or checkpointing) count where their measured peak fits; the
  exhaustive oracle trains every configuration of the grid for the whole
  stream and takes the best that fits (checkpointing does not change the maths,
  so a setting fits when any of its checkpoint variants does); the
  profiling-based planner takes the rule engine's choice on measured peaks;
  MPOptimizer is the real loop (planning, ``Aco`` probes, re-planning) on the
  same grid. Accuracy: mean over the stream's domains of the test accuracy
  after adapting to each.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from aiop.cg import from_torch
from aiop.cli import load_predictor
from aiop.mconfig import MConfig
from aiop.models import build
from aiop.mpopt.loop import RetrainLoop, RetrainSettings
from aiop.mpopt.planner import (
    MB,
    Candidate,
    PlanError,
    accuracy_prior,
    clear_cache,
    default_space,
    plan,
    step_gflops,
)
from aiop.profiler.memory import measure_memory

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "mpopt.json"
log = logging.getLogger("mpopt-bench")

RES, CLASSES, BATCH = 32, 10, 32


def factory(spec: str) -> Any:
    def make() -> torch.nn.Module:
        return build(spec, num_classes=CLASSES, resolution=RES)

    return make


def graph(spec: str) -> Any:
    return from_torch(factory(spec)(), (1, 3, RES, RES), name=spec)


def measured_peak(spec: str, config: MConfig) -> int:
    return measure_memory(factory(spec), config, "meta", resolution=RES).peak_bytes


# -- part 1: violations ---------------------------------------------------------------


def part_violations(models: list[str], n_budgets: int, predictor: Any, seed: int) -> dict:
    from tqdm import tqdm

    rng = random.Random(seed)
    rows, per_model = [], {}
    for spec in models:
        cg = graph(spec)
        space = default_space(cg, BATCH)
        full = MConfig(batch_size=BATCH)
        full_peak = measured_peak(spec, full)
        t0 = time.perf_counter()
        probe = plan(cg, 1e6, predictor, space=space)
        cold = time.perf_counter() - t0
        low = probe.smallest.peak_bytes * (1 + probe.margin) / MB
        high = 1.2 * full_peak / MB
        n_viol, n_plans, n_infeasible, warm_times = 0, 0, 0, []
        for _ in tqdm(range(n_budgets), desc=f"violations {spec}", leave=False):
            budget = math.exp(rng.uniform(math.log(low), math.log(high)))
            t0 = time.perf_counter()
            try:
                r = plan(cg, budget, predictor, space=space, top_k=1)
            except PlanError:
                n_infeasible += 1
                continue
            warm_times.append(time.perf_counter() - t0)
            c = r.chosen
            assert c is not None
            real = measured_peak(spec, c.config)
            violated = real > budget * MB
            n_viol += violated
            n_plans += 1
            rows.append(
                {
                    "model": spec,
                    "budget_mb": round(budget, 3),
                    "chosen": c.spec,
                    "predicted_peak_bytes": c.peak_bytes,
                    "measured_peak_bytes": real,
                    "prediction_error": real / c.peak_bytes - 1,
                    "budget_used": real / (budget * MB),
                    "violation": violated,
                }
            )
        per_model[spec] = {
            "candidates": len(space),
            "full_finetune_peak_bytes": full_peak,
            "budget_range_mb": [round(low, 2), round(high, 2)],
            "plans": n_plans,
            "violations": n_viol,
            "infeasible": n_infeasible,
            "cold_planning_seconds": round(cold, 3),
            "warm_planning_seconds_median": round(sorted(warm_times)[len(warm_times) // 2], 4)
            if warm_times
            else None,
        }
    used = [r["budget_used"] for r in rows]
    return {
        "per_model": per_model,
        "rows": rows,
        "total_plans": len(rows),
        "total_violations": sum(r["violation"] for r in rows),
        "budget_used_median": sorted(used)[len(used) // 2] if used else None,
        "budget_used_max": max(used) if used else None,
    }


# -- part 2: planning time side by side --------------------------------------------------


def rank_measured(cg: Any, peaks: dict[MConfig, int], budget_mb: float) -> Candidate | None:
    """The rule engine on measured peaks (no margin): what a profiling planner would choose."""
    has_bn = any(n.op == "BatchNormalization" for n in cg.nodes)
    pool = [
        Candidate(
            config=c,
            peak_bytes=p,
            latency_s=None,
            step_gflops=step_gflops(cg, c, None),
            accuracy=accuracy_prior(c, has_bn),
            accuracy_source="prior",
            fits=p <= budget_mb * MB,
        )
        for c, p in peaks.items()
    ]
    feasible = sorted((c for c in pool if c.fits), key=Candidate.sort_key)
    return feasible[0] if feasible else None


def part_timing(models: list[str], n_candidates: int, predictor: Any, seed: int) -> dict:
    from tqdm import tqdm

    out = {}
    for spec in models:
        cg = graph(spec)
        space = default_space(cg, BATCH)
        cands = space.sample(n_candidates, seed=seed)
        budget = measured_peak(spec, MConfig(batch_size=BATCH)) * 0.5 / MB
        clear_cache()
        t0 = time.perf_counter()
        r = plan(cg, budget, predictor, candidates=cands, strict=False)
        t_pred = time.perf_counter() - t0
        clear_cache()
        t0 = time.perf_counter()
        r_full = plan(cg, budget, predictor, space=space, strict=False)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        peaks, failed = {}, 0
        for c in tqdm(cands, desc=f"profiling {spec}", leave=False):
            try:
                peaks[c] = measured_peak(spec, c)
            except (RuntimeError, ValueError):  # e.g. BatchNorm over one value per channel
                failed += 1
        chosen = rank_measured(cg, peaks, budget)
        t_prof = time.perf_counter() - t0
        out[spec] = {
            "candidates": len(cands),
            "candidates_that_cannot_train": failed,
            "budget_mb": round(budget, 2),
            "predictor_planner_seconds": round(t_pred, 4),
            "profiling_planner_seconds": round(t_prof, 2),
            "speedup": round(t_prof / t_pred, 1),
            "same_choice": bool(r.chosen and chosen and r.chosen.config == chosen.config),
            "predictor_choice": r.chosen.spec if r.chosen else None,
            "profiling_choice": chosen.spec if chosen else None,
            "full_space_candidates": len(space),
            "full_space_predictor_seconds": round(t_full, 3),
            "full_space_profiling_estimate_seconds": round(t_prof / len(cands) * len(space), 0),
            "full_space_feasible": r_full.n_feasible,
        }
    return out


# -- part 3: accuracy --------------------------------------------------------------------


def accuracy_grid(
    batch: int, methods: list[str], freezes: list[float], micro_batches: list[int]
) -> list[MConfig]:
    """Accuracy-relevant settings (checkpointing excluded: it does not change the maths)."""
    return [
        MConfig(batch_size=batch, micro_batch=mb, freeze=f, method=m)
        for m in methods
        for f in freezes
        for mb in micro_batches
    ]


SEGMENTS = (0, 2, 4)


def run_stream(spec: str, settings_kw: dict, space: dict, out: Path, predictor: Any, **kw: Any):
    """One retraining run; a finished run with the same settings in ``out`` is reused."""
    s = RetrainSettings(model=spec, space=space, **settings_kw, **kw)
    done = out / "report.json"
    if done.is_file() and (out / "state.json").is_file():
        state = json.loads((out / "state.json").read_text())
        report = json.loads(done.read_text())
        if state.get("settings_key") == s.key() and report.get("mean_accuracy_after") is not None:
            return report
    return RetrainLoop(s, predictor, out, progress=False).run()


def part_accuracy(
    spec: str,
    budgets: list[float],
    stream: str,
    steps: int,
    predictor: Any,
    workdir: Path,
    axes: dict[str, list],
) -> dict:
    from tqdm import tqdm

    grid = accuracy_grid(BATCH, axes["methods"], axes["freezes"], axes["micro_batches"])
    base_kw = dict(stream=stream, steps_per_domain=steps, batch_size=BATCH, resolution=RES,
                   eval_size=200, probe_size=100)  # fmt: skip
    # measured peaks of every setting and its checkpoint variants (meta mode)
    peaks: dict[MConfig, int] = {}
    for c in tqdm(grid, desc="peaks", leave=False):
        for k in SEGMENTS:
            v = MConfig(batch_size=c.batch_size, micro_batch=c.mb, freeze=c.freeze, ckpt=k,
                        method=c.method)  # fmt: skip
            peaks[v] = measured_peak(spec, v)
    # every setting trained for the whole stream with a fixed config (no budget)
    fixed: dict[str, dict] = {}
    for c in tqdm(grid, desc="fixed runs", leave=False):
        space = {"methods": (c.method,), "freezes": (c.freeze,), "segments": (0,),
                 "micro_batches": (c.mb,), "precisions": ("fp32",)}  # fmt: skip
        tag = c.format().replace(",", "_").replace("=", "").replace("+", "")
        rep = run_stream(spec, base_kw, space, workdir / f"fixed-{tag}", predictor,
                         budget_mb=1e6, top_k=1, probe_steps=0, enforce_budget=False)  # fmt: skip
        fixed[c.format()] = {
            "accuracy": rep["mean_accuracy_after"],
            "per_domain": [d["acc_after"] for d in rep["domains"]],
            "min_peak_bytes": min(
                p
                for v, p in peaks.items()
                if (v.method, v.freeze, v.mb) == (c.method, c.freeze, c.mb)
            ),
            "peak_no_ckpt_bytes": peaks[c],
            "train_seconds": rep["train_seconds"],
        }
    # MPOptimizer plans over exactly the grid (times checkpoint segments) the oracle searched
    loop_space = {"methods": tuple(axes["methods"]), "freezes": tuple(axes["freezes"]),
                  "segments": SEGMENTS, "micro_batches": tuple(axes["micro_batches"]),
                  "precisions": ("fp32",)}  # fmt: skip
    rows = []
    for budget in budgets:
        row: dict[str, Any] = {"budget_mb": budget}
        for name, c in (
            ("fixed_full", MConfig(batch_size=BATCH)),
            ("fixed_tinytl_b", MConfig(batch_size=BATCH, method="bias")),
            ("fixed_tinytl_lb", MConfig(batch_size=BATCH, method="lite+bias")),
        ):
            f = fixed.get(c.format())
            fits = f is not None and f["peak_no_ckpt_bytes"] <= budget * MB
            row[name] = f["accuracy"] if fits else None
        fits = {k: v for k, v in fixed.items() if v["min_peak_bytes"] <= budget * MB}
        best = max(fits.items(), key=lambda kv: kv[1]["accuracy"]) if fits else None
        row["oracle"] = best[1]["accuracy"] if best else None
        row["oracle_config"] = best[0] if best else None
        prof = rank_measured(graph(spec), peaks, budget)
        if prof is not None:
            key = MConfig(batch_size=BATCH, micro_batch=prof.config.mb, freeze=prof.config.freeze,
                          method=prof.config.method).format()  # fmt: skip
            row["profiling_planner"] = fixed[key]["accuracy"]
            row["profiling_planner_config"] = prof.spec
        else:
            row["profiling_planner"] = None
        try:
            rep = run_stream(spec, base_kw, loop_space, workdir / f"mpopt-{budget:g}", predictor,
                             budget_mb=budget, top_k=3, probe_steps=2)  # fmt: skip
            row["mpopt"] = rep["mean_accuracy_after"]
            row["mpopt_configs"] = rep["configs_chosen"]
            row["mpopt_violations"] = rep["budget_violations"]
            row["mpopt_oom_fallbacks"] = rep["out_of_memory_fallbacks"]
            row["mpopt_max_peak_over_budget"] = rep["max_peak_over_budget"]
            row["mpopt_planning_seconds"] = rep["planning_seconds"]
        except ValueError as exc:
            row["mpopt"] = None
            row["mpopt_error"] = str(exc)
        fixed_ok = [row[k] for k in ("fixed_full", "fixed_tinytl_b", "fixed_tinytl_lb")
                    if row[k] is not None]  # fmt: skip
        row["best_fixed"] = max(fixed_ok) if fixed_ok else None
        if row["mpopt"] is not None:
            row["mpopt_minus_best_fixed"] = (
                row["mpopt"] - row["best_fixed"] if row["best_fixed"] is not None else None
            )
            row["mpopt_minus_oracle"] = row["mpopt"] - row["oracle"] if row["oracle"] else None
        rows.append(row)
        log.info("budget %s: %s", budget, row)
    return {"model": spec, "stream": stream, "steps_per_domain": steps, "grid": len(grid),
            "fixed": fixed, "rows": rows}  # fmt: skip


# -- output ---------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = ["# MPOptimizer benchmark", "", f"Command: `{result.get('command', '')}`", ""]
    v = result.get("violations")
    if v:
        lines += ["## Budget violations (planner's choice, true peak measured)", "",
                  "| model | candidates | plans | violations | infeasible | budget range MB | "
                  "cold plan s | warm plan s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in v["per_model"].items():
            lines.append(
                f"| {m} | {r['candidates']} | {r['plans']} | {r['violations']} | "
                f"{r['infeasible']} | {r['budget_range_mb'][0]}–{r['budget_range_mb'][1]} | "
                f"{r['cold_planning_seconds']} | {r['warm_planning_seconds_median']} |"
            )
        lines += ["", f"Total: {v['total_violations']} violations in {v['total_plans']} plans; "
                  f"measured peak / budget: median {v['budget_used_median']:.2f}, "
                  f"max {v['budget_used_max']:.2f}.", ""]  # fmt: skip
    t = result.get("timing")
    if t:
        lines += ["## Planning time, side by side", "",
                  "| model | candidates | predictor planner s | profiling planner s | speed-up | "
                  "same choice | full grid: candidates, predictor s, profiling s (est.) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in t.items():
            lines.append(
                f"| {m} | {r['candidates']} | {r['predictor_planner_seconds']} | "
                f"{r['profiling_planner_seconds']} | {r['speedup']}× | {r['same_choice']} | "
                f"{r['full_space_candidates']}, {r['full_space_predictor_seconds']}, "
                f"{r['full_space_profiling_estimate_seconds']:.0f} |"
            )
        lines.append("")
    a = result.get("accuracy")
    if a:
        lines += [f"## Accuracy: {a['model']} on {a['stream']} ({a['steps_per_domain']} steps per "
                  "domain), mean test accuracy after adapting", "",
                  "| budget MB | full | TinyTL-B | TinyTL-L+B | profiling planner | oracle | "
                  "MPOptimizer | − best fixed | − oracle | violations |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

        def f(x: Any) -> str:
            return "—" if x is None else f"{x:.3f}"

        for r in a["rows"]:
            lines.append(
                f"| {r['budget_mb']:g} | {f(r['fixed_full'])} | {f(r['fixed_tinytl_b'])} | "
                f"{f(r['fixed_tinytl_lb'])} | {f(r['profiling_planner'])} | {f(r['oracle'])} | "
                f"{f(r['mpopt'])} | {f(r.get('mpopt_minus_best_fixed'))} | "
                f"{f(r.get('mpopt_minus_oracle'))} | {r.get('mpopt_violations', '—')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["violations", "timing", "accuracy"],
                        choices=["violations", "timing", "accuracy"])  # fmt: skip
    parser.add_argument(
        "--models",
        nargs="+",
        default=["zoo:mobilenet_v2", "zoo:resnet18", "zoo:proxylessnas_mobile"],
    )
    parser.add_argument("--budgets", type=int, default=30, help="random budgets per model")
    parser.add_argument("--timing-candidates", type=int, default=48)
    parser.add_argument("--accuracy-model", default="zoo:mobilenet_v2")
    parser.add_argument("--accuracy-budgets", type=float, nargs="+", default=[200, 45, 30, 22])
    parser.add_argument(
        "--accuracy-methods", nargs="+", default=["full", "lite+bias", "bias", "last"]
    )
    parser.add_argument("--accuracy-freezes", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--accuracy-micro-batches", type=int, nargs="+", default=[BATCH])
    parser.add_argument("--stream", default="digits-c-short")
    parser.add_argument("--steps-per-domain", type=int, default=8)
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--workdir", default="out/mpopt-bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    predictor = load_predictor(args.predictor)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result["command"] = "python benchmarks/mpopt.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None
    )
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(OUT)
        (RESULTS / "mpopt.md").write_text(markdown(result))

    if "violations" in args.parts:
        t0 = time.perf_counter()
        result["violations"] = part_violations(args.models, args.budgets, predictor, args.seed)
        result["violations"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    if "timing" in args.parts:
        result["timing"] = part_timing(args.models, args.timing_candidates, predictor, args.seed)
        save()
    if "accuracy" in args.parts:
        t0 = time.perf_counter()
        result["accuracy"] = part_accuracy(
            args.accuracy_model,
            args.accuracy_budgets,
            args.stream,
            args.steps_per_domain,
            predictor,
            Path(args.workdir),
            {
                "methods": args.accuracy_methods,
                "freezes": args.accuracy_freezes,
                "micro_batches": args.accuracy_micro_batches,
            },
        )
        result["accuracy"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    print(markdown(result))


if __name__ == "__main__":
    main()
