"""Choosing among probed candidates: paired per-image evidence pooled across re-plans."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mpopt_helpers import tiny_retrain_settings

from aiop.cli import load_predictor, main
from aiop.mconfig import MConfig
from aiop.models import build
from aiop.mpopt.loop import (
    EVIDENCE_Z,
    RetrainError,
    RetrainLoop,
    RetrainSettings,
    entropy,
    paired_evidence,
    select_probe,
    setting_key,
)
from aiop.mpopt.planner import Candidate, PlanResult

FULL, BIAS, LITE = "full,freeze=0,fp32", "bias,freeze=0,fp32", "lite+bias,freeze=0,fp32"


def entry(
    scores: dict[str, np.ndarray],
    correct: dict[str, np.ndarray] | None = None,
    gains: dict[str, float] | None = None,
) -> dict:
    """One re-plan's evidence: setting → per-image scores (correctness, probe gain)."""
    return {
        k: {
            "scores": list(v),
            "correct": None if correct is None else list(correct[k]),
            "gain": (gains or {}).get(k, 0.0),
        }
        for k, v in scores.items()
    }


def result(setting: str, aco: float = 0.0) -> dict[str, Any]:
    return {"setting": setting, "aco_objective": aco, "config": setting}


# a per-image gain of 0.05 with spread 0.2: hidden in one re-plan of 20 images, clear in five
PATTERN = 0.05 + 0.2 * np.where(np.arange(20) % 2 == 0, 1.0, -1.0)


def test_paired_evidence_pools_replans() -> None:
    rng = np.random.default_rng(0)
    a1, b1, a2, b2 = (rng.normal(size=10) for _ in range(4))
    history = [
        entry({FULL: a1, BIAS: b1}),
        entry({FULL: a2, LITE: b2}),
        entry({FULL: a2, BIAS: b2}),
    ]
    ev = paired_evidence(history, FULL, BIAS)
    d = np.concatenate([b1 - a1, b2 - a2])
    assert ev.replans == 2 and ev.images == 20
    assert ev.mean_gain == pytest.approx(d.mean())
    assert ev.se == pytest.approx(d.std(ddof=1) / math.sqrt(20))
    # no common re-plan: no evidence, never significant
    none = paired_evidence(history, BIAS, LITE)
    assert none.images == 0 and math.isinf(none.se) and not none.significant()


def test_one_noisy_replan_keeps_the_planners_choice_and_pooled_evidence_switches() -> None:
    zeros = np.zeros(20)
    history: list[dict] = []
    for i in range(5):
        history.append(entry({FULL: zeros, BIAS: PATTERN}))
        ok = [result(FULL, aco=1.0), result(BIAS, aco=0.5)]
        chosen = select_probe(ok, history)
        ev = ok[1]["evidence"]
        assert ev["replans"] == i + 1 and ev["against"] == FULL
        if i == 0:  # 0.05 < 2 SE (0.092): one re-plan cannot tell the settings apart
            assert chosen["setting"] == FULL and not ev["significant"]
    # five re-plans: 0.05 > 2 SE (0.041); the evidence, not the prior, decides
    assert chosen["setting"] == BIAS and ev["significant"]
    assert ev["mean_gain"] > EVIDENCE_Z * ev["se"]


def test_a_clear_gain_on_the_new_domain_switches_against_older_evidence() -> None:
    zeros = np.zeros(20)
    history = [entry({FULL: zeros, BIAS: -0.15 + PATTERN}) for _ in range(3)]  # mean -0.1
    history.append(entry({FULL: zeros, BIAS: 0.1 + PATTERN}))  # mean 0.15, 3.3 SE
    ok = [result(FULL), result(BIAS)]
    assert select_probe(ok, history)["setting"] == BIAS
    ev = ok[1]["evidence"]
    assert ev["mean_gain"] < 0 < ev["now_mean_gain"] and ev["replans"] == 4
    # the same gain, but on the first of the domains: the later ones outweigh it
    ok = [result(FULL), result(BIAS)]
    assert select_probe(ok, history[::-1])["setting"] == FULL


def test_a_consistent_but_negligible_gain_does_not_switch() -> None:
    """Bias-only vs last layer after two steps: outputs differ by 1e-4 nats, consistently."""
    tiny = 5e-4 + 1e-4 * np.where(np.arange(20) % 2 == 0, 1.0, -1.0)  # 22 SE
    gains = {LITE: 0.12}  # what the planner's choice gained in the probe
    history = [entry({LITE: np.zeros(20), BIAS: tiny}, gains=gains)]
    ok = [result(LITE), result(BIAS, aco=5.0)]
    assert select_probe(ok, history)["setting"] == LITE
    ev = ok[1]["evidence"]
    assert ev["mean_gain"] > EVIDENCE_Z * ev["se"] and ev["min_gain"] == pytest.approx(0.006)
    # the same consistency at a gain that matters (6 % of the planner's choice's) switches
    history = [entry({LITE: np.zeros(20), BIAS: 0.0072 + 10 * (tiny - 5e-4)}, gains=gains)]
    ok = [result(LITE), result(BIAS, aco=5.0)]
    assert select_probe(ok, history)["setting"] == BIAS


def test_pooled_evidence_is_weighed_against_the_pooled_gain() -> None:
    """Two domains with little to learn, then one with much: pooled, the challenger's gain
    is compared with what the planner's choice gained over the same three probes."""
    noise = 0.02 * np.where(np.arange(20) % 2 == 0, 1.0, -1.0)
    gains = [0.002, 0.002, 0.3]
    history = [entry({FULL: np.zeros(20), BIAS: 0.003 + noise}, gains={FULL: g})
               for g in gains[:2]]  # fmt: skip
    history.append(entry({FULL: np.zeros(20), BIAS: -0.005 + noise}, gains={FULL: 0.3}))
    ok = [result(FULL), result(BIAS)]
    assert select_probe(ok, history)["setting"] == FULL  # pooled gain 0.0003: nothing
    history[-1] = entry({FULL: np.zeros(20), BIAS: 0.012 + noise}, gains={FULL: 0.3})
    ok = [result(FULL), result(BIAS)]
    assert select_probe(ok, history)["setting"] == BIAS
    ev = ok[1]["evidence"]
    # this re-plan alone: 0.012 is 2.6 SE but under 5 % of the 0.3 the planner's choice
    # gained; pooled: 0.006 passes 2 SE (0.0053) and 5 % of the pooled gain (0.0051)
    assert ev["now_min_gain"] == pytest.approx(0.015) and ev["now_mean_gain"] < 0.015
    assert ev["min_gain"] == pytest.approx(0.05 * np.mean(gains))
    assert ev["min_gain"] < ev["mean_gain"]


def test_a_loss_gain_that_costs_probe_accuracy_does_not_switch() -> None:
    zeros = np.zeros(20)
    right, wrong = np.ones(20, bool), np.r_[np.zeros(1, bool), np.ones(19, bool)]
    history = [
        entry({FULL: zeros, BIAS: np.full(20, 0.3)}, {FULL: right, BIAS: wrong}) for _ in range(3)
    ]
    ok = [result(FULL), result(BIAS)]
    assert select_probe(ok, history)["setting"] == FULL
    assert ok[1]["evidence"]["accuracy_gain"] < 0


def test_among_significant_challengers_the_highest_aco_wins() -> None:
    history = [entry({FULL: np.zeros(20), BIAS: np.full(20, 0.2) + PATTERN,
                      LITE: np.full(20, 0.1) + PATTERN})]  # fmt: skip
    ok = [result(FULL, aco=9.0), result(BIAS, aco=1.0), result(LITE, aco=2.0)]
    assert select_probe(ok, history)["setting"] == LITE
    assert all(r["evidence"]["significant"] for r in ok[1:])


def candidate(spec: str, accuracy: float) -> Candidate:
    return Candidate(config=MConfig.parse(spec), peak_bytes=1, latency_s=None, step_gflops=1.0,
                     accuracy=accuracy, accuracy_source="prior", fits=True)  # fmt: skip


def test_distinct_spreads_probes_over_train_methods() -> None:
    specs = ["bs=32", "bs=32,ckpt=2", "bs=32,freeze=0.5", "bs=32,freeze=0.25",
             "bs=32,method=lite+bias", "bs=32,method=bias",
             "bs=32,method=bias,freeze=0.5"]  # fmt: skip
    feasible = [candidate(s, 1.0 - i / 100) for i, s in enumerate(specs)]
    res = PlanResult(budget_mb=1.0, margin=0.0, margin_source="test", n_candidates=len(specs),
                     ranked=feasible, smallest=feasible[-1], planning_seconds=0.0,
                     feasible=feasible)  # fmt: skip
    plain = RetrainLoop.distinct(res, 3)
    assert [setting_key(c.config) for c in plain] == [FULL, "full,freeze=0.5,fp32",
                                                      "full,freeze=0.25,fp32"]  # fmt: skip
    spread = RetrainLoop.distinct(res, 3, spread_methods=True)
    assert [setting_key(c.config) for c in spread] == [FULL, LITE, BIAS]
    # fewer methods than k: variants fill the rest, in the planner's order
    four = RetrainLoop.distinct(res, 4, spread_methods=True)
    assert [setting_key(c.config) for c in four] == [FULL, "full,freeze=0.5,fp32", LITE, BIAS]
    excluded = RetrainLoop.distinct(res, 2, exclude={feasible[0].spec}, spread_methods=True)
    assert excluded[0].spec == feasible[1].spec and len(excluded) == 2


def test_selection_setting_and_run_keys() -> None:
    with pytest.raises(RetrainError, match="unknown selection"):
        RetrainSettings(selection="best")
    # a run that compares nothing keeps its key whatever the rule (fixed runs stay cached)
    fixed = dict(top_k=1, probe_steps=0)
    assert (RetrainSettings(selection="evidence", **fixed).key()
            == RetrainSettings(selection="prior", **fixed).key())  # fmt: skip
    assert RetrainSettings(selection="evidence").key() != RetrainSettings(selection="prior").key()


def test_cli_rejects_an_unknown_selection(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["retrain", "--budget-mb", "100", "--selection", "best"])
    assert info.value.code == 2 and "--selection" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["supervised", "tent"])
def test_probe_scores_are_per_image(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = build("zoo:mobilenet_v2", num_classes=10, resolution=16, width_mult=0.25)
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, 12)
    y.setflags(write=False)  # the stream's arrays are read-only
    loop = RetrainLoop(RetrainSettings(mode=mode, resolution=16), None, tmp_path, progress=False)
    out = loop._probe_scores(model, x, y)
    model.eval()
    with torch.no_grad():
        logits = model((torch.from_numpy(x) - 0.5) / 0.5)
    assert out["scores"].shape == (12,)
    if mode == "tent":
        assert out["correct"] is None
        assert out["metric"] == pytest.approx(-float(entropy(logits)), abs=1e-5)
    else:
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.copy()), reduction="none")
        assert np.allclose(out["scores"], -ce.numpy(), atol=1e-5)
        assert out["metric"] == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))


@pytest.mark.slow
def test_loop_records_evidence_and_resumes_it(tmp_path: Path, aiop_cache: Path) -> None:
    s = tiny_retrain_settings(
        budget_mb=1e4, steps_per_domain=3, batch_size=8, top_k=3, probe_steps=2,
        space={"freezes": (0.0, 0.5), "segments": (0,), "precisions": ("fp32",),
               "methods": ("full", "bias", "last")}, drift="metadata",
    )  # fmt: skip
    report = RetrainLoop(s, load_predictor(None), tmp_path, progress=False).run()
    assert len(report["plans"]) == 3
    for p in report["plans"]:
        probed = [r["setting"].split(",")[0] for r in p["probed"] if not r["beyond_margin"]]
        assert sorted(probed) == ["bias", "full", "last"]  # one of each method
        challengers = [r for r in p["probed"][1:] if r["ok"]]
        assert challengers and all("evidence" in r for r in challengers)
        assert all("scores" not in r for r in p["probed"])  # kept in the state, not the report
    # the last re-plan pooled the evidence of all three
    assert max(r["evidence"]["replans"] for r in report["plans"][-1]["probed"][1:]) == 3
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["evidence"]) == 3
    assert all(len(v["scores"]) == 30 for e in state["evidence"] for v in e.values())
    loop = RetrainLoop(s, load_predictor(None), tmp_path, progress=False, resume=True)
    again = loop.run()  # nothing left to train: the records come back as they were
    assert loop.evidence == state["evidence"]
    assert again["configs_chosen"] == report["configs_chosen"]
