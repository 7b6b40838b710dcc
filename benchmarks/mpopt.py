"""MPOptimizer against its baselines: budget violations, planning time, accuracy.

    .venv/bin/python benchmarks/mpopt.py [--parts violations timing accuracy]
        [--models zoo:mobilenet_v2 zoo:resnet18 zoo:proxylessnas_mobile] [--budgets 30]
        [--timing-candidates 48] [--accuracy-models zoo:mobilenet_v2 zoo:resnet18]
        [--streams digits-c-short digits-c] [--accuracy-budgets ...] [--budget-unit mb|full]
        [--steps-per-domain 8] [--seeds 0 1 2] [--out benchmarks/results/mpopt.json]

Four parts, each written to ``benchmarks/results/mpopt.json`` and ``.md``
with the command that produced it (a part that is not run keeps its earlier
result and command):

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
* ``precision``: the real step time of bf16/fp16 autocast relative to fp32 on
  this CPU, interleaved so that shared load falls on every precision alike
  (the ``cpu`` device's ``precision_time``, :mod:`aiop.mpopt.device`).
* ``accuracy``: supervised online retraining on a drifting stream under each
  budget. Fixed baselines (full fine-tuning, TinyTL-B, TinyTL-L+B: batch 32, no
  micro-batching or checkpointing) count where their measured peak fits; the
  exhaustive oracle trains every configuration of the grid for the whole
  stream and takes the best that fits (checkpointing does not change the maths,
  so a setting fits when any of its checkpoint variants does); the
  profiling-based planner takes the rule engine's choice on measured peaks;
  MPOptimizer is the real loop (planning, ``Aco`` probes, re-planning) on the
  same grid. Accuracy: mean over the stream's domains of the test accuracy
  after adapting to each. Every model in ``--accuracy-models`` runs on every
  stream in ``--streams``; budgets are MB, or with ``--budget-unit full``
  fractions of the model's measured full fine-tuning peak (so one list fits
  models of different sizes). Finished runs in ``--workdir`` are reused.
  With several ``--seeds`` (each draws the stream's splits, corruption noise and
  batch order, and the pretrained model) every column is a mean ± standard
  deviation over seeds and MPOptimizer's differences are paired per seed
  (:func:`aggregate_seeds`): one test image of 600 is 0.17 points, so one seed
  cannot tell a method from noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
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
    frozen_shares,
    plan,
    step_gflops,
)
from aiop.profiler.memory import measure_memory

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

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
    shares = frozen_shares(cg, [c.freeze for c in peaks])
    pool = [
        Candidate(
            config=c,
            peak_bytes=p,
            latency_s=None,
            step_gflops=step_gflops(cg, c, None),
            accuracy=accuracy_prior(c, has_bn, frozen_share=shares[c.freeze]),
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
    budget_unit: str = "mb",
    drift: str = "both",
    seed: int = 0,
    selection: str = "evidence",
    baseline_drift: str = "same",
    optimizer_state: str = "reset",
) -> dict:
    """One model on one stream over every budget: fixed baselines, oracle, profiling
    planner and MPOptimizer.

    ``baseline_drift="same"`` gives the fixed runs (hence the baselines, the oracle and
    the profiling planner, which are read off them) the drift information MPOptimizer
    has (``drift``): a fixed run re-plans its one configuration where MPOptimizer would
    re-plan, and with ``optimizer_state="reset"`` that re-plan starts a fresh optimizer.
    ``"metadata"`` re-plans them at the stream's true boundaries, which a device does not
    know (the comparison of session 13 and before). ``optimizer_state`` is the same for
    every arm (:attr:`aiop.mpopt.loop.RetrainSettings.optimizer_state`).
    """
    from tqdm import tqdm

    grid = accuracy_grid(BATCH, axes["methods"], axes["freezes"], axes["micro_batches"])
    # one folder per model × stream (× seed: seed 0 keeps the layout of earlier results)
    workdir = workdir / (f"{spec.replace(':', '_')}-{stream}" + (f"-s{seed}" if seed else ""))
    # the seed draws the stream (splits, corruption noise, batch order) and the pretrained model
    base_kw = dict(stream=stream, steps_per_domain=steps, batch_size=BATCH, resolution=RES,
                   eval_size=200, probe_size=100, seed=seed)  # fmt: skip
    # measured peaks of every setting and its checkpoint variants (meta mode)
    peaks: dict[MConfig, int] = {}
    for c in tqdm(grid, desc="peaks", leave=False):
        for k in SEGMENTS:
            v = MConfig(batch_size=c.batch_size, micro_batch=c.mb, freeze=c.freeze, ckpt=k,
                        method=c.method)  # fmt: skip
            peaks[v] = measured_peak(spec, v)
    fixed_drift = drift if baseline_drift == "same" else baseline_drift
    # folders of runs made before these options existed keep their names (reused)
    suffix = ("" if fixed_drift == "metadata" else f"-{fixed_drift}") + (
        "" if optimizer_state == "reset" else f"-opt{optimizer_state}"
    )
    mp_suffix = "" if optimizer_state == "reset" else f"-opt{optimizer_state}"
    # every setting trained for the whole stream with a fixed config (no budget)
    fixed: dict[str, dict] = {}
    for c in tqdm(grid, desc="fixed runs", leave=False):
        space = {"methods": (c.method,), "freezes": (c.freeze,), "segments": (0,),
                 "micro_batches": (c.mb,), "precisions": ("fp32",)}  # fmt: skip
        tag = c.format().replace(",", "_").replace("=", "").replace("+", "")
        rep = run_stream(spec, base_kw, space, workdir / f"fixed-{tag}{suffix}", predictor,
                         budget_mb=1e6, top_k=1, probe_steps=0, enforce_budget=False,
                         drift=fixed_drift, optimizer_state=optimizer_state)  # fmt: skip
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
            "replans": [p["step"] for p in rep["plans"]],
        }
    # MPOptimizer plans over exactly the grid (times checkpoint segments) the oracle searched
    loop_space = {"methods": tuple(axes["methods"]), "freezes": tuple(axes["freezes"]),
                  "segments": SEGMENTS, "micro_batches": tuple(axes["micro_batches"]),
                  "precisions": ("fp32",)}  # fmt: skip
    full_peak = peaks.get(MConfig(batch_size=BATCH))
    if budget_unit == "full":
        if full_peak is None:
            raise SystemExit("--budget-unit full needs 'full' and 0.0 in the accuracy grid")
        budgets = [round(f * full_peak / MB, 2) for f in budgets]
    rows = []
    for budget in budgets:
        row: dict[str, Any] = {"budget_mb": budget}
        if full_peak:
            row["budget_fraction_of_full"] = round(budget * MB / full_peak, 3)
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
            rep = run_stream(spec, base_kw, loop_space, workdir / f"mpopt-{budget:g}{mp_suffix}",
                             predictor, budget_mb=budget, top_k=3, probe_steps=2, drift=drift,
                             selection=selection, optimizer_state=optimizer_state)  # fmt: skip
            row["mpopt"] = rep["mean_accuracy_after"]
            row["mpopt_configs"] = rep["configs_chosen"]
            row["mpopt_violations"] = rep["budget_violations"]
            row["mpopt_oom_fallbacks"] = rep["out_of_memory_fallbacks"]
            row["mpopt_max_peak_over_budget"] = rep["max_peak_over_budget"]
            row["mpopt_planning_seconds"] = rep["planning_seconds"]
            row["mpopt_replans"] = [p["reason"] for p in rep["plans"]]
            row["mpopt_drift_detection"] = rep.get("drift_detection")
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
            "drift": drift, "seed": seed, "selection": selection,
            "baseline_drift": fixed_drift, "optimizer_state": optimizer_state,
            "full_finetune_peak_bytes": full_peak, "fixed": fixed, "rows": rows}  # fmt: skip


_BASELINES = ("fixed_full", "fixed_tinytl_b", "fixed_tinytl_lb")
_ACCURACY_COLUMNS = (*_BASELINES, "profiling_planner", "oracle", "mpopt")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def run_key(run: dict) -> tuple[str, str, str, str, str]:
    """What makes one accuracy table: a new run replaces only the table with the same key.

    Runs of the same pair under other drift information or optimizer state stay beside it
    (a run from before these options re-planned its fixed runs at the true boundaries).
    """
    return (run["model"], run["stream"], str(run.get("drift")),
            run.get("baseline_drift", "metadata"), run.get("optimizer_state", "reset"))  # fmt: skip


def aggregate_seeds(runs: list[dict]) -> dict:
    """One model × stream over several seeds: each column's mean and standard deviation.

    "Best fixed" is the baseline with the best *mean* (the one setting a user would
    pick), and MPOptimizer's difference to it is paired per seed (same stream, same
    pretrained model), so its standard deviation is that of the paired differences.
    "Oracle" stays the per-seed best setting that fits (averaged: a bar no method
    can know in advance); ``oracle_setting`` is the single setting with the best mean.
    """
    first = runs[0]
    rows = []
    for i, r0 in enumerate(first["rows"]):
        per = [run["rows"][i] for run in runs]
        row: dict[str, Any] = {k: r0[k] for k in ("budget_mb", "budget_fraction_of_full")
                               if k in r0}  # fmt: skip
        for col in _ACCURACY_COLUMNS:
            vals = [r.get(col) for r in per]
            if any(v is None for v in vals):
                row[col], row[f"{col}_std"] = None, None
            else:
                row[col], row[f"{col}_std"] = _mean_std(vals)
        fixed = [(row[k], k) for k in _BASELINES if row[k] is not None]
        best = max(fixed) if fixed else None
        row["best_fixed"] = best[0] if best else None
        row["best_fixed_name"] = best[1] if best else None
        # the single setting with the best mean over seeds among those that fit every seed
        fits = [
            {k for k, v in run["fixed"].items() if v["min_peak_bytes"] <= r0["budget_mb"] * MB}
            for run in runs
        ]
        common = set.intersection(*fits) if fits else set()
        means = {k: _mean_std([run["fixed"][k]["accuracy"] for run in runs]) for k in common}
        if means:
            k_best = max(means, key=lambda k: means[k][0])
            row["oracle_setting"], row["oracle_setting_config"] = means[k_best][0], k_best
        else:
            row["oracle_setting"], row["oracle_setting_config"] = None, None
        if row["mpopt"] is not None:
            if best is not None:
                diffs = [r["mpopt"] - r[best[1]] for r in per]
                row["mpopt_minus_best_fixed"], row["mpopt_minus_best_fixed_std"] = _mean_std(diffs)
            else:
                row["mpopt_minus_best_fixed"] = None
            diffs = [r["mpopt"] - r["oracle"] for r in per]
            row["mpopt_minus_oracle"], row["mpopt_minus_oracle_std"] = _mean_std(diffs)
            if row["oracle_setting"] is not None:
                key = row["oracle_setting_config"]
                diffs = [r["mpopt"] - run["fixed"][key]["accuracy"] for r, run in zip(per, runs)]
                row["mpopt_minus_oracle_setting"] = _mean_std(diffs)[0]
        row["mpopt_violations"] = sum(r.get("mpopt_violations") or 0 for r in per)
        row["mpopt_configs"] = sorted({c for r in per for c in r.get("mpopt_configs") or []})
        row["per_seed"] = {col: [r.get(col) for r in per] for col in _ACCURACY_COLUMNS}
        rows.append(row)
    return {
        "model": first["model"],
        "stream": first["stream"],
        "steps_per_domain": first["steps_per_domain"],
        "grid": first["grid"],
        "drift": first.get("drift"),
        "selection": first.get("selection"),
        "baseline_drift": first.get("baseline_drift", "metadata"),
        "optimizer_state": first.get("optimizer_state", "reset"),
        "seeds": [run.get("seed", 0) for run in runs],
        "full_finetune_peak_bytes": first.get("full_finetune_peak_bytes"),
        "rows": rows,
        "per_seed_runs": runs,
    }


# -- part 4: step time per precision on this CPU (the cpu device's factors) -------------------


def part_precision(models: list[str], precisions: list[str], rounds: int, steps: int) -> dict:
    """Median real step time of each precision relative to fp32, interleaved A/B/C.

    Each round measures every precision once (``steps`` timed steps after one warm-up,
    a fresh model each time), so load from other processes on a shared machine falls
    on all precisions alike instead of biasing whichever ran during a busy minute.
    """
    import statistics

    from tqdm import tqdm

    from aiop.mconfig import prepare
    from aiop.profiler.latency import measure_latency

    out: dict[str, Any] = {"resolution": RES, "batch": BATCH, "rounds": rounds, "steps": steps}
    precisions = ["fp32", *[p for p in precisions if p != "fp32"]]
    for spec in models:
        samples: dict[str, list[float]] = {p: [] for p in precisions}
        for _ in tqdm(range(rounds), desc=f"precision {spec}", leave=False):
            for prec in precisions:
                torch.manual_seed(0)
                model = factory(spec)()
                config = MConfig.parse(f"bs={BATCH},prec={prec}")
                prepare(model, config)
                lat = measure_latency(model, config, steps=steps, warmup=1, resolution=RES)
                samples[prec].extend(lat.samples_s)
        median = {p: statistics.median(v) for p, v in samples.items()}
        out[spec] = {
            "median_step_s": median,
            "time_factor": {p: round(median[p] / median["fp32"], 2) for p in precisions},
            "samples_s": samples,
        }
    return out


# -- output ---------------------------------------------------------------------------------


def _command_line(part: dict, fallback: str) -> list[str]:
    return [f"Command: `{part.get('command') or fallback}`", ""]


def markdown(result: dict) -> str:
    lines = ["# MPOptimizer benchmark", ""]
    unknown = "not recorded (run before commands were kept per part)"
    v = result.get("violations")
    if v:
        lines += ["## Budget violations (planner's choice, true peak measured)", "",
                  *_command_line(v, unknown),
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
        t = {k: r for k, r in t.items() if k != "command"}
        lines += ["## Planning time, side by side", "",
                  *_command_line(result["timing"], unknown),
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
    pr = result.get("precision")
    if pr:
        models = {k: r for k, r in pr.items() if isinstance(r, dict) and "time_factor" in r}
        precs = list(next(iter(models.values()))["time_factor"]) if models else []
        lines += ["## Step time per precision on this CPU (the `cpu` device's factors)", "",
                  *_command_line(pr, unknown),
                  f"Batch {pr['batch']} at {pr['resolution']} px, {pr['rounds']} interleaved "
                  f"rounds of {pr['steps']} timed steps: median step time (ratio to fp32).", "",
                  "| model | " + " | ".join(precs) + " |",
                  "|---|" + "---|" * len(precs)]  # fmt: skip
        for spec, r in models.items():
            cells = [f"{r['median_step_s'][q]:.3f} s ({r['time_factor'][q]:g}×)" for q in precs]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        lines.append("")
    a = result.get("accuracy")
    if a:
        runs = a.get("runs") or [a]  # one run: the layout before several models and streams
        # the tables of one model × stream together, the like-for-like one (fixed runs with
        # the loop's drift information) before the one whose baselines knew the boundaries
        pairs = list(dict.fromkeys((r.get("model"), r.get("stream")) for r in runs))

        def order(r: dict) -> tuple[int, bool, bool]:
            knew = r.get("baseline_drift", "metadata") == "metadata" != r.get("drift")
            keep = r.get("optimizer_state", "reset") != "reset"
            return pairs.index((r.get("model"), r.get("stream"))), knew, keep

        runs = sorted(runs, key=order)
        lines += ["## Accuracy: mean test accuracy over the stream's domains after adapting", ""]
        if a.get("command"):  # the layout where one command ran every pair
            lines += _command_line(a, unknown)
            if a.get("seconds"):
                lines += [f"All runs: {a['seconds'] / 60:.1f} min wall.", ""]
        for run in runs:
            if run.get("command"):
                lines += _command_line(run, unknown)
                if run.get("seconds"):
                    lines += [f"Wall time of that command up to this table: "
                              f"{run['seconds'] / 60:.1f} min (core 1 shared).", ""]  # fmt: skip
            lines += accuracy_table(run)
    return "\n".join(lines)


def accuracy_table(a: dict) -> list[str]:
    """One model on one stream: the baselines and MPOptimizer under each budget."""

    def f(x: Any, sd: Any = None) -> str:
        if x is None:
            return "—"
        return f"{x:.3f}" if sd is None else f"{x:.3f} ± {sd:.3f}"

    def g(r: dict, key: str) -> str:
        return f(r.get(key), r.get(f"{key}_std"))

    full = a.get("full_finetune_peak_bytes")
    head = f"### {a['model']} on {a['stream']} ({a['steps_per_domain']} steps per domain"
    seeds = a.get("seeds")
    head += f"; mean ± std over seeds {', '.join(map(str, seeds))}" if seeds else ""
    head += f"; re-planning on drift: {a['drift']}" if a.get("drift") else ""
    head += f"; choice among probes: {a['selection']}" if a.get("selection") else ""
    if a.get("drift"):
        # runs from before the option re-planned their fixed runs at the true boundaries
        fixed_drift = a.get("baseline_drift", "metadata")
        head += "; fixed runs re-plan " + (
            "at the true domain boundaries (information MPOptimizer does not have)"
            if fixed_drift == "metadata" and a["drift"] != "metadata"
            else f"on the same drift information ({fixed_drift})"
        )
    head += f"; optimizer state on re-plan: {a.get('optimizer_state', 'reset')}"
    head += f"; full fine-tuning peak {full / MB:.1f} MB)" if full else ")"
    lines = [head, "",
             "| budget MB | full | TinyTL-B | TinyTL-L+B | profiling planner | oracle | "
             "MPOptimizer | − best fixed | − oracle | violations | MPOptimizer's configs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in a["rows"]:
        frac = r.get("budget_fraction_of_full")
        budget = f"{r['budget_mb']:g}" + (f" ({frac:.2f}×)" if frac else "")
        configs = sorted({_short_spec(c) for c in r.get("mpopt_configs") or []})
        lines.append(
            f"| {budget} | {g(r, 'fixed_full')} | {g(r, 'fixed_tinytl_b')} | "
            f"{g(r, 'fixed_tinytl_lb')} | {g(r, 'profiling_planner')} | {g(r, 'oracle')} | "
            f"{g(r, 'mpopt')} | {g(r, 'mpopt_minus_best_fixed')} | "
            f"{g(r, 'mpopt_minus_oracle')} | {r.get('mpopt_violations', '—')} | "
            f"{'; '.join(configs) or r.get('mpopt_error', '—')} |"
        )
    lines.append("")
    if seeds:
        lines += ["Oracle: the best setting per seed, averaged. Best single setting on average "
                  "(MPOptimizer − it): " + "; ".join(
                      f"{r['budget_mb']:g} MB: {_short_spec(r['oracle_setting_config'])} "
                      f"{f(r['oracle_setting'])} ({f(r.get('mpopt_minus_oracle_setting'))})"
                      for r in a["rows"] if r.get("oracle_setting_config")) + ".", ""]  # fmt: skip
    return lines


def _short_spec(spec: str) -> str:
    """``bs=32,mb=32,freeze=0.5,ckpt=4,method=full,...`` → ``full f0.5 ck4`` (what differs)."""
    c = MConfig.parse(spec)
    parts = [c.method]
    if c.mb != c.batch_size:
        parts.append(f"mb{c.mb}")
    if c.freeze:
        parts.append(f"f{c.freeze:g}")
    if c.ckpt:
        parts.append(f"ck{c.ckpt}")
    if c.prec != "fp32":
        parts.append(c.prec)
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["violations", "timing", "accuracy"],
                        choices=["violations", "timing", "accuracy", "precision"])  # fmt: skip
    parser.add_argument("--precision-models", nargs="+", default=["zoo:mobilenet_v2"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--precision-rounds", type=int, default=3)
    parser.add_argument("--precision-steps", type=int, default=3)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["zoo:mobilenet_v2", "zoo:resnet18", "zoo:proxylessnas_mobile"],
    )
    parser.add_argument("--budgets", type=int, default=30, help="random budgets per model")
    parser.add_argument("--timing-candidates", type=int, default=48)
    parser.add_argument(
        "--accuracy-models", "--accuracy-model", nargs="+", default=["zoo:mobilenet_v2"]
    )
    parser.add_argument("--accuracy-budgets", type=float, nargs="+", default=[200, 60, 45, 30])
    parser.add_argument(
        "--budget-unit",
        choices=["mb", "full"],
        default="mb",
        help="accuracy budgets in MB, or as fractions of full fine-tuning's measured peak",
    )
    parser.add_argument(
        "--accuracy-methods", nargs="+", default=["full", "lite+bias", "bias", "last"]
    )
    parser.add_argument("--accuracy-freezes", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--accuracy-micro-batches", type=int, nargs="+", default=[BATCH])
    parser.add_argument("--streams", "--stream", nargs="+", default=["digits-c-short"])
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="MODEL@STREAM",
        help="run these model × stream pairs instead of every model on every stream",
    )
    parser.add_argument("--steps-per-domain", type=int, default=8)
    parser.add_argument(
        "--drift",
        choices=["both", "detect", "metadata"],
        default="both",
        help="what makes MPOptimizer re-plan on a domain change (aiop retrain --drift)",
    )
    parser.add_argument(
        "--selection",
        choices=["evidence", "prior"],
        default="evidence",
        help="how MPOptimizer picks among its probes (aiop retrain --selection)",
    )
    parser.add_argument(
        "--baseline-drift",
        choices=["same", "metadata"],
        default="same",
        help="what re-plans the fixed runs (baselines, oracle, profiling planner): the same "
        "drift information as MPOptimizer (same), or the stream's true boundaries (metadata, "
        "the comparison before session 13)",
    )
    parser.add_argument(
        "--optimizer-state",
        choices=["reset", "keep"],
        default="reset",
        help="every arm: a re-plan to the same trainable set starts a fresh optimizer or "
        "keeps its momentum (aiop retrain --optimizer-state)",
    )
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--workdir", default="out/mpopt-bench")
    parser.add_argument(
        "--out", default=str(OUT), help="result JSON (the Markdown goes beside it, same stem)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random budgets")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="accuracy: stream and pretraining seeds; several give mean ± std per column",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    predictor = load_predictor(args.predictor)
    # --out names the JSON; the Markdown goes beside it with the same stem
    out_dir, stem = Path(args.out).parent, Path(args.out).with_suffix("").name
    out = out_dir / f"{stem}.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    # the command of the layout before per-part commands belonged to its violations part
    legacy = result.pop("command", None)
    if legacy and isinstance(result.get("violations"), dict):
        result["violations"].setdefault("command", legacy)
    command = "python benchmarks/mpopt.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k != "out"
    )

    def save() -> None:
        write_results(out_dir, stem, result, markdown(result), default=str)

    if "violations" in args.parts:
        t0 = time.perf_counter()
        result["violations"] = part_violations(args.models, args.budgets, predictor, args.seed)
        result["violations"]["seconds"] = round(time.perf_counter() - t0, 1)
        result["violations"]["command"] = command
        save()
    if "timing" in args.parts:
        result["timing"] = part_timing(args.models, args.timing_candidates, predictor, args.seed)
        result["timing"]["command"] = command
        save()
    if "precision" in args.parts:
        result["precision"] = part_precision(
            args.precision_models, args.precisions, args.precision_rounds, args.precision_steps
        )
        result["precision"]["command"] = command
        save()
    if "accuracy" in args.parts:
        t0 = time.perf_counter()
        # model × stream pairs not run now keep their earlier result, each with its command
        earlier = result.get("accuracy") or {}
        runs: list[dict] = [
            {**r, "command": r.get("command") or earlier.get("command")}
            for r in earlier.get("runs") or []
        ]
        result["accuracy"] = {"runs": runs}
        pairs = [(m, st) for m in args.accuracy_models for st in args.streams]
        if args.pairs:
            pairs = [tuple(x.split("@", 1)) for x in args.pairs]
            if any(len(x) != 2 or not all(x) for x in pairs):
                raise SystemExit("--pairs takes MODEL@STREAM, e.g. zoo:resnet18@digits-c-short")
        for spec, stream in pairs:
            per_seed = []
            for seed in args.seeds:
                per_seed.append(
                    part_accuracy(
                        spec,
                        list(args.accuracy_budgets),
                        stream,
                        args.steps_per_domain,
                        predictor,
                        Path(args.workdir),
                        {
                            "methods": args.accuracy_methods,
                            "freezes": args.accuracy_freezes,
                            "micro_batches": args.accuracy_micro_batches,
                        },
                        args.budget_unit,
                        args.drift,
                        seed,
                        args.selection,
                        args.baseline_drift,
                        args.optimizer_state,
                    )
                )
            run = per_seed[0] if len(per_seed) == 1 else aggregate_seeds(per_seed)
            run["command"] = command
            run["seconds"] = round(time.perf_counter() - t0, 1)  # since this command started
            runs[:] = [r for r in runs if run_key(r) != run_key(run)] + [run]
            save()  # each finished model × stream is kept
    print(markdown(result))


if __name__ == "__main__":
    main()
