"""The retraining loop: budgets, the memory guard, Tent, checkpoints, resume, fallback, CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mpopt_helpers import tiny_retrain_settings

from aiop.cli import load_predictor, main
from aiop.mconfig import MConfig
from aiop.models import build
from aiop.mpopt import loop as loop_mod
from aiop.mpopt.cli import resolve_predictor
from aiop.mpopt.loop import (
    MB,
    BudgetGuard,
    DeviceOutOfMemory,
    RetrainError,
    RetrainLoop,
    RetrainSettings,
    Trainer,
    budget_at,
    configure_tent,
    entropy,
    load_state,
    parse_budget_schedule,
    prepare_for,
    save_state_atomic,
)


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("zoo:mobilenet_v2", num_classes=10, resolution=16, width_mult=0.25)


def batch(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 3, 16, 16), dtype=np.float32), rng.integers(0, 10, n)


def test_budget_schedule() -> None:
    assert parse_budget_schedule(None, 300) == [(0, 300.0)]
    sched = parse_budget_schedule("0:300, 40:150,80:75.5", 500)
    assert sched == [(0, 300.0), (40, 150.0), (80, 75.5)]
    assert parse_budget_schedule("40:150", 300) == [(0, 300.0), (40, 150.0)]
    assert [budget_at(sched, t) for t in (0, 39, 40, 79, 80, 1000)] == [
        300,
        300,
        150,
        150,
        75.5,
        75.5,
    ]
    for bad in ("40", "x:3", "4:y", "-1:30", "5:0", "5:-3", "5:nan"):
        with pytest.raises(RetrainError, match="budget-schedule"):
            parse_budget_schedule(bad, 300)


def test_guard_stops_a_step_without_touching_weights() -> None:
    model = tiny()
    config = MConfig(batch_size=8)
    trainer = Trainer.make(model, config, "supervised", 0.01, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    with pytest.raises(DeviceOutOfMemory) as info:
        trainer.step(x, y, limit_bytes=2 * MB)
    assert info.value.live_bytes > 2 * MB and info.value.phase in ("forward", "backward", "inputs")
    assert all(p.grad is None for p in model.parameters())
    assert all(
        torch.equal(before[k], v)
        for k, v in model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    )
    loss, peak, secs = trainer.step(x, y, limit_bytes=None)
    assert np.isfinite(loss) and peak > 2 * MB and secs > 0


def test_measured_peak_matches_the_profiler() -> None:
    """The loop's per-step peak is the profiler's real-mode peak (same tracker, same step)."""
    from aiop.profiler.memory import measure_memory

    config = MConfig(batch_size=8, ckpt=2, freeze=0.3)
    trainer = Trainer.make(tiny(), config, "supervised", 0.01, None)
    x, y = batch()
    trainer.step(x, y, None)  # the first step creates the optimizer state
    _, peak, _ = trainer.step(x, y, None)
    ref = measure_memory(tiny, config, "real", resolution=16)
    assert abs(peak - ref.peak_bytes) / ref.peak_bytes < 0.02


def test_guard_counts_like_the_tracker() -> None:
    guard = BudgetGuard(None)
    with guard:
        a = torch.ones(1000)
        b = a * 2
    assert guard.peak >= a.nbytes + b.nbytes


def test_tent_trains_only_norm_affine_with_batch_stats() -> None:
    model = tiny()
    configure_tent(model)
    prepare_for(model, MConfig(batch_size=8, method="norm+last"), "tent")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bn." in n or "norm" in n or ".1." in n for n in trainable)
    assert not any(n.startswith("head.fc") for n in trainable)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None for m in bns)
    trainer = Trainer(
        model,
        MConfig(batch_size=8, method="norm+last"),
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01),
    )
    x, y = batch()
    loss, _, _ = trainer.step(x, y, None)
    assert 0 <= loss <= np.log(10) + 1e-4  # an entropy, not a cross-entropy
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    assert entropy(logits).item() == pytest.approx(np.log(2) / 2, abs=1e-3)


def test_atomic_state_roundtrip(tmp_path: Path) -> None:
    model = tiny()
    path = save_state_atomic(tmp_path / "ck.safetensors", model, {"step": 3, "config": "bs=8"})
    state, meta = load_state(path)
    assert meta == {"step": 3, "config": "bs=8"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "other.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(RetrainError, match="not a safetensors retraining checkpoint"):
        load_state(tmp_path / "other.safetensors")
    with pytest.raises(RetrainError, match="does not exist"):
        load_state(tmp_path / "missing.safetensors")


def test_resolve_predictor_fallback() -> None:
    local, source = resolve_predictor(None)
    assert hasattr(local, "predict") and "local" in source
    with pytest.raises(ValueError, match="unreachable"):
        resolve_predictor("http://127.0.0.1:9")
    pred, source = resolve_predictor("http://127.0.0.1:9", "default")
    assert hasattr(pred, "predict") and "unreachable" in source
    with pytest.raises(ValueError, match="only applies"):
        resolve_predictor(None, "default")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--stream", "cifar-c"], "valid streams: digits-c"),
        (["--budget-schedule", "0:abc"], "budget-schedule"),
        (["--model", "net.onnx"], "zoo:NAME or family"),
        (["--predictor", "http://127.0.0.1:9"], "unreachable"),
    ],
)
def test_cli_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], match: str) -> None:
    rc = main(["retrain", "--budget-mb", "100", "--out", "/nonexistent/never", *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


# -- whole runs (slow): a tiny model on a short stream ---------------------------------


def settings(**kw: Any) -> RetrainSettings:
    """Two steps per domain at batch 8, the budget halving from 12 MB at step 3, with
    checkpointing in the space."""
    kw = {
        "budget_mb": 12,
        "budget_schedule": [(0, 12.0), (3, 6.0)],
        "steps_per_domain": 2,
        "batch_size": 8,
        **kw,
    }
    return tiny_retrain_settings(segments=(0, 2), **kw)


@pytest.mark.slow
def test_run_interrupt_and_resume(
    tmp_path: Path, aiop_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings()
    predictor = load_predictor(None)
    real_step = Trainer.step
    calls = {"n": 0}

    def flaky(self: Trainer, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        RetrainLoop(s, predictor, tmp_path, progress=False).run()
    assert (tmp_path / "checkpoint.safetensors").is_file()
    partial = json.loads((tmp_path / "report.json").read_text())
    done = {r["step"] for r in partial["steps"]}
    assert done and max(done) < 5
    monkeypatch.setattr(Trainer, "step", real_step)
    report = RetrainLoop(s, predictor, tmp_path, progress=False, resume=True).run()
    steps = [r["step"] for r in report["steps"] if r["event"] != "oom-fallback"]
    assert sorted(steps) == list(range(6))  # every step once, none lost or repeated
    assert report["budget_violations"] == 0
    for r in report["steps"]:
        if r["event"] != "oom-fallback":
            assert r["measured_peak_bytes"] <= r["budget_mb"] * MB
    assert [d["domain"] for d in report["domains"]] == ["clean", "gaussian_noise-4", "fog-4"]
    assert all(0 <= d["acc_after"] <= 1 for d in report["domains"])
    assert report["plans"] and all(p["probed"] for p in report["plans"])
    assert any(
        p["reason"].startswith("budget 6") or "budget 6" in p["reason"] for p in report["plans"]
    )
    assert (tmp_path / "report.png").stat().st_size > 1000
    with pytest.raises(RetrainError, match="other settings"):
        RetrainLoop(settings(seed=1), predictor, tmp_path, progress=False, resume=True).run()


class UnderPredicting:
    """A predictor that claims 40 % of the real peak: the loop must fall back, not crash."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
        out = self.inner.predict(cg, configs)
        for r in out:
            r["peak_memory_bytes"] = int(r["peak_memory_bytes"] * 0.4)
        return out


@pytest.mark.slow
def test_out_of_memory_fallback(tmp_path: Path, aiop_cache: Path) -> None:
    s = settings(budget_schedule=[(0, 3.5)], budget_mb=3.5)
    report = RetrainLoop(s, UnderPredicting(load_predictor(None)), tmp_path, progress=False).run()
    assert report["out_of_memory_fallbacks"] >= 1
    assert report["budget_violations"] == 0
    done = [r for r in report["steps"] if r["event"] != "oom-fallback"]
    assert sorted(r["step"] for r in done) == list(range(6))
    assert all(r["measured_peak_bytes"] <= 3.5 * MB for r in done)
    assert any(p["probed"] and not all(x["ok"] for x in p["probed"]) for p in report["plans"]) or (
        any(r["event"] == "oom-fallback" for r in report["steps"])
    )


@pytest.mark.slow
def test_tent_run(tmp_path: Path, aiop_cache: Path) -> None:
    s = settings(mode="tent", budget_schedule=[(0, 6.0)], budget_mb=6, steps_per_domain=1)
    report = RetrainLoop(s, load_predictor(None), tmp_path, progress=False).run()
    assert all("norm+last" in c for c in report["configs_chosen"])
    assert report["budget_violations"] == 0 and len(report["domains"]) == 3
    for p in report["plans"]:  # Tent compares candidates by entropy removed, no labels
        assert all("gain" in x for x in p["probed"] if x["ok"])


def test_impossible_budget_fails_before_training(tmp_path: Path, aiop_cache: Path) -> None:
    s = settings(budget_schedule=[(0, 12.0), (2, 0.5)])
    with pytest.raises(RetrainError, match="smallest predicted peak"):
        RetrainLoop(s, load_predictor(None), tmp_path, progress=False).run()


def test_module_exports() -> None:
    assert loop_mod.MODES == ("supervised", "tent")


def test_fallback_predictor_switches_when_the_remote_fails() -> None:
    from aiop.mpopt.cli import FallbackPredictor

    class Flaky:
        def __init__(self) -> None:
            self.error_quantiles = {"memory": {"q99_under": 0.5}}

        def predict(self, cg: Any, configs: Any) -> list[dict[str, Any]]:
            raise ConnectionError("server gone")

    from aiop.cg import from_torch

    cg = from_torch(tiny(), (1, 3, 16, 16))
    fb = FallbackPredictor(Flaky(), "default")
    assert fb.error_quantiles == {"memory": {"q99_under": 0.5}}
    out = fb.predict(cg, ["bs=8"])
    assert out[0]["peak_memory_bytes"] > 0 and fb.local is not None
    assert fb.error_quantiles != {"memory": {"q99_under": 0.5}}
