"""Like-for-like arms: optimizer state across re-plans and the baselines' drift information."""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from mpopt_helpers import tiny_retrain_settings
from script_helpers import load_script

from aiop.cli import load_predictor, main
from aiop.mconfig import MConfig
from aiop.models import build
from aiop.mpopt.loop import (
    RetrainError,
    RetrainLoop,
    RetrainSettings,
    Trainer,
    carry_optimizer_state,
)

MB = 1 << 20


def tiny_trainer(method: str, model: torch.nn.Module | None = None) -> Trainer:
    if model is None:
        torch.manual_seed(0)
        model = build("zoo:mobilenet_v2", num_classes=10, resolution=16, width_mult=0.25)
    config = MConfig(batch_size=8, method=method)
    return Trainer.make(model, config, "supervised", 0.01, None)


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((8, 3, 16, 16), dtype=np.float32), rng.integers(0, 10, 8)


def momenta(trainer: Trainer) -> list[torch.Tensor]:
    assert trainer.optimizer is not None
    return [trainer.optimizer.state[p]["momentum_buffer"] for p in trainer.optimizer.state]


def test_carry_copies_momentum_of_the_same_trainable_set_only() -> None:
    old = tiny_trainer("bias")
    old.step(*batch(0), None)
    before = [m.clone() for m in momenta(old)]
    assert before and any(float(m.abs().sum()) > 0 for m in before)
    # a probe: a copy of the model, the same trainable set
    probe = tiny_trainer("bias", copy.deepcopy(old.model))
    assert carry_optimizer_state(old, probe)
    assert all(torch.equal(a, b) for a, b in zip(before, momenta(probe)))
    probe.step(*batch(1), None)  # the probe's steps never move the incumbent's buffers
    assert all(torch.equal(a, b) for a, b in zip(before, momenta(old)))
    assert not all(torch.equal(a, b) for a, b in zip(before, momenta(probe)))
    # another trainable set (every weight): nothing to carry, the optimizer starts fresh
    full = tiny_trainer("full", copy.deepcopy(old.model))
    assert not carry_optimizer_state(old, full)
    assert full.optimizer is not None and not full.optimizer.state


def test_optimizer_state_setting_keys_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RetrainError, match="unknown optimizer state"):
        RetrainSettings(optimizer_state="forget")
    # "reset" is what every run before the option did: its key (and cached runs) stay
    s = RetrainSettings()
    assert s.optimizer_state == "reset"
    assert RetrainSettings(optimizer_state="keep").key() != s.key()
    with pytest.raises(SystemExit) as info:
        main(["retrain", "--budget-mb", "100", "--optimizer-state", "forget"])
    assert info.value.code == 2 and "--optimizer-state" in capsys.readouterr().err


@pytest.mark.slow
def test_keep_makes_a_fixed_run_independent_of_when_it_replans(
    tmp_path: Path, aiop_cache: Path
) -> None:
    """One fixed configuration: re-planning at the true boundaries or on detected drift
    changes nothing when the optimizer keeps its state (same losses, same accuracy)."""
    predictor = load_predictor(None)
    reports = {}
    for drift in ("metadata", "detect"):
        s = tiny_retrain_settings(
            budget_mb=1e4, steps_per_domain=4, batch_size=8, top_k=1, probe_steps=0,
            space={"freezes": (0.0,), "segments": (0,), "precisions": ("fp32",),
                   "methods": ("bias",)}, drift=drift, optimizer_state="keep",
            enforce_budget=False,
        )  # fmt: skip
        reports[drift] = RetrainLoop(s, predictor, tmp_path / drift, progress=False).run()
    meta, det = reports["metadata"], reports["detect"]
    assert len(meta["plans"]) == 3  # the first plan and two boundaries
    assert all(p["probed"][0]["optimizer_state_kept"] for p in meta["plans"][1:])
    assert not meta["plans"][0]["probed"][0]["optimizer_state_kept"]  # nothing to keep yet
    assert [p["step"] for p in meta["plans"]] != [p["step"] for p in det["plans"]]
    assert [r["loss"] for r in meta["steps"]] == [r["loss"] for r in det["steps"]]
    assert meta["mean_accuracy_after"] == det["mean_accuracy_after"]


# -- the benchmark: every arm gets the same drift information and optimizer state ----------


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("benchmarks/mpopt.py", "mpopt_bench_optstate")


@pytest.mark.parametrize(
    ("baseline_drift", "optimizer_state", "fixed_drift", "suffix"),
    [("same", "reset", "detect", "-detect"), ("metadata", "reset", "metadata", ""),
     ("same", "keep", "detect", "-detect-optkeep")],
)  # fmt: skip
def test_fixed_runs_get_the_loops_drift_information(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    baseline_drift: str, optimizer_state: str, fixed_drift: str, suffix: str,
) -> None:  # fmt: skip
    calls: list[tuple[str, dict]] = []

    def fake_run_stream(spec: str, base: dict, space: dict, out: Path, pred: Any, **kw: Any):
        calls.append((out.name, kw))
        acc = 0.9 if kw["top_k"] == 1 else 0.8
        return {"mean_accuracy_after": acc, "domains": [{"acc_after": acc}],
                "train_seconds": 1.0, "plans": [{"step": 0, "reason": "x"}],
                "configs_chosen": [], "budget_violations": 0, "out_of_memory_fallbacks": 0,
                "max_peak_over_budget": None, "planning_seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(bench, "run_stream", fake_run_stream)
    monkeypatch.setattr(bench, "measured_peak", lambda spec, c: 10 * MB)
    monkeypatch.setattr(bench, "graph", lambda spec: None)
    monkeypatch.setattr(bench, "rank_measured", lambda cg, peaks, budget: None)
    out = bench.part_accuracy(
        "zoo:m", [100.0], "s", 8, None, tmp_path,
        {"methods": ["full", "bias"], "freezes": [0.0], "micro_batches": [32]},
        drift="detect", baseline_drift=baseline_drift, optimizer_state=optimizer_state,
    )  # fmt: skip
    fixed = [(name, kw) for name, kw in calls if kw["top_k"] == 1]
    loop = [(name, kw) for name, kw in calls if kw["top_k"] != 1]
    assert len(fixed) == 2 and len(loop) == 1
    assert all(kw["drift"] == fixed_drift and name.endswith(suffix) for name, kw in fixed)
    assert loop[0][1]["drift"] == "detect"
    assert all(kw["optimizer_state"] == optimizer_state for _, kw in calls)
    assert out["baseline_drift"] == fixed_drift and out["optimizer_state"] == optimizer_state
    assert out["rows"][0]["mpopt_minus_best_fixed"] == pytest.approx(-0.1)


def test_tables_of_other_drift_information_stay_side_by_side(bench: ModuleType) -> None:
    old = {"model": "m", "stream": "s", "drift": "detect"}  # before the option: metadata
    new = {**old, "baseline_drift": "detect", "optimizer_state": "reset"}
    assert bench.run_key(old) != bench.run_key(new)
    assert bench.run_key(old) == bench.run_key({**old, "baseline_drift": "metadata"})
    assert bench.run_key(new) != bench.run_key({**new, "optimizer_state": "keep"})


def test_a_fresh_pretrained_model_carries_no_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that pretrains must start like the runs that load the cached model: a
    last pretraining gradient would be added to its first step (train_step clears after)."""
    from aiop.mpopt.loop import pretrained

    monkeypatch.setenv("AIOP_CACHE_DIR", str(tmp_path))
    kw: dict[str, Any] = dict(epochs=1, seed=0, progress=False, samples=64,
                              model_kwargs={"width_mult": 0.25})  # fmt: skip
    fresh, meta = pretrained("zoo:mobilenet_v2", 16, **kw)
    assert not meta["cached"]
    assert all(p.grad is None for p in fresh.parameters())
    cached, meta = pretrained("zoo:mobilenet_v2", 16, **kw)
    assert meta["cached"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 cached.state_dict().values()))  # fmt: skip


def test_markdown_puts_the_like_for_like_table_first(bench: ModuleType) -> None:
    from test_mpopt_bench import run

    old = run(0, 0.90, 0.93, 0.93)  # before the option: fixed runs knew the boundaries
    new = {**run(0, 0.90, 0.92, 0.93), "baseline_drift": "detect", "optimizer_state": "reset"}
    md = bench.markdown({"accuracy": {"runs": [old, new]}})
    same, knew = md.index("same drift information (detect)"), md.index("true domain boundaries")
    assert same < knew and md.count("### zoo:m on s") == 2
