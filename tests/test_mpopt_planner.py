"""The planner: budgets, margins, ranking rules, caching, bad input, and ``aiop plan``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from aiop.cg import from_torch
from aiop.cli import load_predictor, main
from aiop.mconfig import MConfig, MSpace
from aiop.models import build
from aiop.mpopt import PlanError, plan
from aiop.mpopt.planner import MB, accuracy_prior, clear_cache, default_space, margin_from

SPACE = MSpace(
    batch_sizes=(16,),
    freezes=(0.0, 0.5),
    segments=(0, 2),
    methods=("full", "bias", "last"),
    precisions=("fp32", "bf16"),
)

# ofa_mbv3:3 at 32 px ends at 1x1 with BatchNorms: micro-batch 1 cannot train it.
N_TRAINABLE = sum(1 for c in SPACE if c.mb >= 2)


@pytest.fixture(scope="module")
def predictor() -> Any:
    return load_predictor(None)


@pytest.fixture(scope="module")
def cg() -> Any:
    return from_torch(build("family:ofa_mbv3:3", resolution=32), (1, 3, 32, 32), name="mbv3")


class Counting:
    """Wraps a predictor; counts configurations asked; can add latency/accuracy fields."""

    def __init__(self, inner: Any, extra: bool = False, quantiles: Any = None) -> None:
        self.inner, self.extra, self.asked = inner, extra, 0
        if quantiles is not None:
            self.error_quantiles = quantiles

    def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
        self.asked += len(configs)
        out = self.inner.predict(cg, configs)
        if self.extra:
            for r in out:
                c = MConfig.parse(r["config"])
                r["latency_s"] = 0.01 * c.accum_steps + 0.05 * c.ckpt
                # a made-up accuracy head that prefers bias training
                r["accuracy"] = {"cls": 0.9 if c.method == "bias" else 0.5}
        return out


def test_plan_fits_budget_and_ranks(cg: Any, predictor: Any) -> None:
    full = plan(cg, 1e6, predictor, space=SPACE, margin=0.0)
    peaks = sorted(c.peak_bytes for c in full.feasible)
    budget_mb = peaks[len(peaks) // 2] / MB  # half the candidates fit
    r = plan(cg, budget_mb, predictor, space=SPACE, top_k=5)
    assert r.n_candidates == N_TRAINABLE
    assert 0 < r.n_feasible < r.n_candidates
    assert len(r.ranked) == min(5, r.n_feasible)
    for c in r.feasible:
        assert c.peak_bytes * (1 + r.margin) <= budget_mb * MB
    scores = [c.sort_key() for c in r.feasible]
    assert scores == sorted(scores)
    d = r.to_dict()
    json.dumps(d)
    for key in (
        "budget_mb",
        "margin",
        "n_candidates",
        "n_feasible",
        "chosen",
        "ranked",
        "explanation",
        "smallest_predicted_peak_bytes",
        "planning_seconds",
    ):
        assert key in d
    assert d["chosen"]["config"] == d["ranked"][0]["config"]
    assert d["chosen"]["config"] in d["explanation"]
    assert d["smallest_predicted_peak_bytes"] == min(c.peak_bytes for c in full.feasible)


def test_generous_budget_picks_the_accuracy_optimum(cg: Any, predictor: Any) -> None:
    r = plan(cg, 1e5, predictor, space=SPACE)
    assert r.chosen is not None
    assert r.chosen.config == MConfig(batch_size=16, ckpt=0, method="full", prec="fp32")
    assert r.chosen.rule.startswith("accuracy optimum")


def test_infeasible_budget_names_smallest_peak(cg: Any, predictor: Any) -> None:
    with pytest.raises(PlanError, match=r"smallest predicted peak is [\d.]+ MB"):
        plan(cg, 0.5, predictor, space=SPACE)
    r = plan(cg, 0.5, predictor, space=SPACE, strict=False)
    assert r.chosen is None and r.n_feasible == 0
    assert r.to_dict()["chosen"] is None


def test_margin_comes_from_error_quantiles(cg: Any, predictor: Any) -> None:
    m, source = margin_from(Counting(predictor, quantiles={"memory": {"q99_under": 0.2, "n": 9}}))
    assert m == pytest.approx(0.25)
    assert "20.0%" in source
    m, source = margin_from(Counting(predictor))
    assert "default" in source and m > 0
    tight = plan(cg, 1e6, predictor, space=SPACE, margin=0.0)
    peak = tight.feasible[-1].peak_bytes / MB
    # a bigger margin can only remove candidates
    a = plan(cg, peak, predictor, space=SPACE, margin=0.0, strict=False)
    b = plan(cg, peak, predictor, space=SPACE, margin=0.5, strict=False)
    assert b.n_feasible < a.n_feasible


def test_predictions_are_cached_per_graph(cg: Any, predictor: Any) -> None:
    clear_cache()
    wrapped = Counting(predictor)
    plan(cg, 50, wrapped, space=SPACE, strict=False)
    assert wrapped.asked == N_TRAINABLE
    r = plan(cg, 10, wrapped, space=SPACE, strict=False)
    assert wrapped.asked == N_TRAINABLE and r.cached


def test_predicted_accuracy_and_time_budget(cg: Any, predictor: Any) -> None:
    wrapped = Counting(predictor, extra=True)
    r = plan(cg, 1e5, wrapped, space=SPACE, candidates=None)
    assert r.chosen is not None and r.chosen.config.method == "bias"
    assert r.chosen.accuracy_source == "predicted"
    r = plan(cg, 1e5, wrapped, space=SPACE, time_budget_s=0.05)
    assert all(c.latency_s is not None and c.latency_s <= 0.05 for c in r.feasible)

    class MemoryOnly:  # a predictor without a latency head (the shipped one now has one)
        def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
            out = predictor.predict(cg, configs)
            return [{k: v for k, v in r.items() if k != "latency_s"} for r in out]

    with pytest.raises(PlanError, match="latency"):
        plan(cg, 1e5, MemoryOnly(), space=SPACE, time_budget_s=1.0)


@pytest.mark.parametrize("budget", [0, -3, float("nan"), float("inf")])
def test_bad_budgets(cg: Any, predictor: Any, budget: float) -> None:
    with pytest.raises(PlanError, match="budget"):
        plan(cg, budget, predictor, space=SPACE)


def test_prior_orders_memory_techniques() -> None:
    base = MConfig(batch_size=64)
    assert accuracy_prior(base) == accuracy_prior(MConfig(batch_size=64, micro_batch=16, ckpt=3))
    assert accuracy_prior(base) > accuracy_prior(MConfig(batch_size=64, method="lite+bias"))
    assert accuracy_prior(MConfig(batch_size=64, method="bias")) > accuracy_prior(
        MConfig(batch_size=64, method="last")
    )
    assert accuracy_prior(base) > accuracy_prior(MConfig(batch_size=64, freeze=0.3))
    assert accuracy_prior(base) > accuracy_prior(MConfig(batch_size=64, micro_batch=2))


def test_default_space_is_mpoptimizers_grid(cg: Any) -> None:
    space = default_space(cg, 32)
    assert space.batch_sizes == (32,)
    assert max(space.freezes) == 0.9 and 0.0 in space.freezes
    assert len(space) >= 1000


def test_cli_plan_json_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "plan",
            "family:ofa_mbv3:3",
            "--budget-mb",
            "500",
            "--batch-size",
            "8",
            "--top-k",
            "3",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert data["chosen"] and len(data["ranked"]) == 3 and data["model"] == "family:ofa_mbv3:3"
    rc = main(["plan", "family:ofa_mbv3:3", "--budget-mb", "1", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "smallest predicted peak" in err and len(err.strip().splitlines()) == 1
    rc = main(
        ["plan", "family:ofa_mbv3:3", "--budget-mb", "50", "--predictor", "http://127.0.0.1:9"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unreachable" in err


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2])
def test_bounded_search_ranks_like_exhaustive(cg: Any, predictor: Any, fraction: float) -> None:
    space = MSpace(batch_sizes=(16,), freezes=(0.0, 0.3, 0.6, 0.9), segments=(0, 2))
    full = plan(cg, 1e6, predictor, space=space, margin=0.0)
    budget = max(c.peak_bytes for c in full.feasible) * fraction / MB
    a = plan(cg, budget, predictor, space=space, top_k=5, strict=False)
    clear_cache()
    b = plan(cg, budget, predictor, space=space, top_k=5, search="bounded", strict=False)
    assert [c.spec for c in a.ranked] == [c.spec for c in b.ranked]
    trainable = sum(1 for c in space if c.mb >= 2)  # see N_TRAINABLE
    assert b.n_evaluated <= a.n_evaluated == trainable
    if fraction == 1.0:
        assert b.n_evaluated < trainable / 4
    with pytest.raises(PlanError, match="unknown search"):
        plan(cg, budget, predictor, space=space, search="greedy")


def test_micro_batches_a_batchnorm_cannot_train_on_are_never_planned(predictor: Any) -> None:
    import torch
    from torch import nn

    from aiop.cg import from_torch
    from aiop.mpopt.planner import min_micro_batch

    class PooledBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.bn = nn.BatchNorm2d(8)  # one value per channel and sample
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.bn(self.pool(self.conv(x))), 1))

    from aiop.models.examples import SmallCNN

    assert min_micro_batch(from_torch(SmallCNN(), (1, *SmallCNN().input_size))) == 1
    cg = from_torch(PooledBN(), (1, 3, 16, 16))
    assert min_micro_batch(cg) == 2
    # PyTorch indeed refuses micro-batch 1 there.
    model = PooledBN().train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, 16, 16))
    space = MSpace(batch_sizes=(4,), freezes=(0.0,), segments=(0,), precisions=("fp32",))
    result = plan(cg, 1e6, predictor, space=space, top_k=100)
    assert result.ranked and all(c.config.mb >= 2 for c in result.ranked)
    with pytest.raises(PlanError, match="one value per channel"):
        plan(cg, 1e6, predictor, candidates=["bs=4,mb=1"])


def test_freezing_costs_its_share_of_parameters(cg: Any, predictor: Any) -> None:
    """Freezing counts layers from the input, which hold few parameters: full fine-tuning
    of the later half ranks above bias-only training of every layer (measured so on
    MobileNetV2, benchmarks/results/mpopt.md), and the planner uses the graph's shares."""
    from aiop.mpopt.planner import frozen_shares

    shares = frozen_shares(cg, [0.0, 0.3, 0.5, 0.9, 1.0])
    assert shares[0.0] == 0.0 and shares[1.0] == pytest.approx(1.0)
    assert 0 < shares[0.3] < shares[0.5] < 0.25 < shares[0.9] < 1.0  # early layers are narrow
    half = MConfig(batch_size=16, freeze=0.5)
    assert accuracy_prior(half, frozen_share=shares[0.5]) > accuracy_prior(
        MConfig(batch_size=16, method="lite+bias")
    )
    assert accuracy_prior(half) < accuracy_prior(MConfig(batch_size=16, method="lite+bias"))
    r = plan(cg, 1e5, predictor, space=SPACE)
    by_spec = {c.spec: c for c in r.feasible}
    c = by_spec[MConfig(batch_size=16, freeze=0.5).format()]
    assert c.accuracy == pytest.approx(accuracy_prior(half, frozen_share=shares[0.5]))
