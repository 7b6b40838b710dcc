"""Probing beyond the safety margin: a candidate that only the margin rules out is measured
under the memory guard and, when it stays within the budget, adopted (slow: real training)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aiop.cg import from_torch
from aiop.cli import load_predictor
from aiop.mconfig import MConfig
from aiop.models import build
from aiop.mpopt.loop import MB, RetrainLoop, RetrainSettings
from aiop.mpopt.planner import plan

pytestmark = pytest.mark.slow
SPACE = {"freezes": (0.0, 0.5), "segments": (0,), "precisions": ("fp32",),
         "methods": ("full", "bias", "last")}  # fmt: skip


class Cautious:
    """The shipped predictor with a calibration that claims 50 % under-prediction: a 100 %
    margin, far more than its real error, so the margin rules out configurations that fit."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error_quantiles = {"memory": {"q99_under": 0.5, "n": 1}}

    def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
        return self.inner.predict(cg, configs)


def settings(**kw: Any) -> RetrainSettings:
    base: dict[str, Any] = dict(
        model="zoo:mobilenet_v2", model_kwargs={"width_mult": 0.25}, stream="digits-c-short",
        steps_per_domain=3, batch_size=8, resolution=16, pretrain_epochs=1, pretrain_samples=200,
        eval_size=40, probe_size=30, top_k=2, probe_steps=2, space=SPACE, drift="metadata",
    )  # fmt: skip
    base.update(kw)
    return RetrainSettings(**base)


def test_measured_candidate_replaces_the_margin(tmp_path: Path, aiop_cache: Path) -> None:
    predictor = Cautious(load_predictor(None))
    cg = from_torch(build("zoo:mobilenet_v2", num_classes=10, resolution=16, width_mult=0.25),
                    (1, 3, 16, 16))  # fmt: skip
    full = plan(cg, 1e5, predictor, candidates=["bs=8"], margin=0.0).chosen
    budget = 1.4 * full.peak_bytes / MB  # full fits by prediction, not with the 100 % margin
    s = settings(budget_mb=budget)
    report = RetrainLoop(s, predictor, tmp_path / "on", progress=False).run()
    first = report["plans"][0]
    assert first["probed"][0]["beyond_margin"] and first["probed"][0]["config"] == full.spec
    assert first["chosen"] == full.spec  # measured within the budget: adopted
    assert report["budget_violations"] == 0
    assert max(r["measured_peak_bytes"] for r in report["steps"]) <= budget * MB

    off = RetrainLoop(settings(budget_mb=budget, probe_beyond_margin=False), predictor,
                      tmp_path / "off", progress=False).run()  # fmt: skip
    assert not any(p["beyond_margin"] for p in off["plans"][0]["probed"])
    assert off["plans"][0]["chosen"] != full.spec


def test_guard_stops_a_candidate_that_does_not_fit(tmp_path: Path, aiop_cache: Path) -> None:
    """A predictor that halves every peak: the best candidate beyond the margin is really
    over the budget; the guard stops its probe, nothing is violated, and it is not retried."""

    class Halving(Cautious):
        def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
            out = self.inner.predict(cg, configs)
            for r in out:
                r["peak_memory_bytes"] = int(r["peak_memory_bytes"] * 0.5)
            return out

    predictor = Halving(load_predictor(None))
    cg = from_torch(build("zoo:mobilenet_v2", num_classes=10, resolution=16, width_mult=0.25),
                    (1, 3, 16, 16))  # fmt: skip
    full = plan(cg, 1e5, load_predictor(None), candidates=["bs=8"], margin=0.0).chosen
    budget = 0.8 * full.peak_bytes / MB  # predicted (halved) full fits; the real one does not
    report = RetrainLoop(settings(budget_mb=budget), predictor, tmp_path, progress=False).run()
    beyond = [x for p in report["plans"] for x in p["probed"] if x["beyond_margin"]]
    assert beyond and not beyond[0]["ok"] and "oom_at_bytes" in beyond[0]
    assert len({x["config"] for x in beyond}) == len(beyond)  # none probed twice
    assert report["budget_violations"] == 0
    done = [r for r in report["steps"] if r["event"] != "oom-fallback"]
    assert sorted(r["step"] for r in done) == list(range(9))
