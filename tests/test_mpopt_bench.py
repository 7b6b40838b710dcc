"""benchmarks/mpopt.py: the accuracy part over several seeds (mean ± std, paired differences)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from script_helpers import load_script

MB = 1 << 20


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("benchmarks/mpopt.py", "mpopt_bench")


FULL = "bs=32,mb=32,freeze=0,ckpt=0,method=full,prec=fp32,opt=sgd"
BIAS = "bs=32,mb=32,freeze=0,ckpt=0,method=bias,prec=fp32,opt=sgd"


def run(seed: int, full: float, bias: float, mpopt: float) -> dict[str, Any]:
    """One seed's result: a budget where both baselines fit, one where only bias does."""
    fixed = {FULL: {"accuracy": full, "min_peak_bytes": 100 * MB},
             BIAS: {"accuracy": bias, "min_peak_bytes": 40 * MB}}  # fmt: skip
    rows = []
    for budget in (200.0, 50.0):
        fits = budget >= 100
        row = {"budget_mb": budget, "budget_fraction_of_full": budget / 100,
               "fixed_full": full if fits else None, "fixed_tinytl_b": bias,
               "fixed_tinytl_lb": None, "profiling_planner": full if fits else bias,
               "oracle": max(full, bias) if fits else bias, "mpopt": mpopt,
               "mpopt_violations": 0, "mpopt_configs": [BIAS]}  # fmt: skip
        rows.append(row)
    return {"model": "zoo:m", "stream": "s", "steps_per_domain": 8, "grid": 2,
            "drift": "detect", "seed": seed, "full_finetune_peak_bytes": 100 * MB,
            "fixed": fixed, "rows": rows}  # fmt: skip


def test_aggregate_seeds_means_and_paired_differences(bench: ModuleType) -> None:
    runs = [run(0, 0.90, 0.93, 0.93), run(1, 0.94, 0.92, 0.925), run(2, 0.92, 0.91, 0.915)]
    agg = bench.aggregate_seeds(runs)
    assert agg["seeds"] == [0, 1, 2] and agg["per_seed_runs"] == runs
    both, bias_only = agg["rows"]
    assert both["fixed_full"] == pytest.approx(0.92) and both["fixed_full_std"] == pytest.approx(
        0.02
    )
    assert both["fixed_tinytl_b"] == pytest.approx(0.92)
    assert both["fixed_tinytl_lb"] is None and both["fixed_tinytl_lb_std"] is None
    # the best fixed baseline by mean (a tie at 0.92: either), paired per seed
    name = both["best_fixed_name"]
    col = {"fixed_full": [0.90, 0.94, 0.92], "fixed_tinytl_b": [0.93, 0.92, 0.91]}[name]
    diffs = [m - c for m, c in zip([0.93, 0.925, 0.915], col)]
    mean, sd = bench._mean_std(diffs)
    assert both["mpopt_minus_best_fixed"] == pytest.approx(mean)
    assert both["mpopt_minus_best_fixed_std"] == pytest.approx(sd)
    # the per-seed oracle (0.93, 0.94, 0.92) against the best single setting on average
    assert both["oracle"] == pytest.approx(0.93)
    assert both["oracle_setting"] == pytest.approx(0.92)
    assert bias_only["best_fixed_name"] == "fixed_tinytl_b"
    assert bias_only["oracle_setting_config"] == BIAS  # full does not fit 50 MB
    assert bias_only["mpopt_minus_oracle_setting"] == pytest.approx(0.01 / 3)
    md = "\n".join(bench.accuracy_table(agg))
    assert "mean ± std over seeds 0, 1, 2" in md and "0.920 ± 0.020" in md
    assert "Best single setting on average" in md


def test_one_seed_keeps_the_plain_table(bench: ModuleType) -> None:
    md = "\n".join(bench.accuracy_table(run(0, 0.90, 0.93, 0.93)))
    assert "±" not in md and "| 200 (2.00×) | 0.900 | 0.930 |" in md


def test_markdown_renders_the_committed_results(bench: ModuleType) -> None:
    import json

    result = json.loads((Path(__file__).parents[1] / "benchmarks/results/mpopt.json").read_text())
    md = bench.markdown(result)
    assert md.startswith("# MPOptimizer benchmark") and "## Accuracy" in md
    assert md.count("Command: `") >= 3  # every part and every accuracy table says how it was made
