"""The planner's device: built-ins, files, the default budget, the precision rule, latency."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aiop.cg import from_torch
from aiop.cli import load_predictor, main
from aiop.mconfig import MConfig, MSpace
from aiop.models import build
from aiop.mpopt import PlanError, plan
from aiop.mpopt.device import Device, DeviceError, get_device
from aiop.mpopt.planner import MB, accuracy_prior, default_space, planned_precisions

SPACE = MSpace(
    batch_sizes=(16,),
    micro_batches=(16, 8),
    freezes=(0.0, 0.5),
    segments=(0,),
    methods=("full", "bias"),
    precisions=("fp32", "bf16"),
)


@pytest.fixture(scope="module")
def predictor() -> Any:
    return load_predictor(None)


@pytest.fixture(scope="module")
def cg() -> Any:
    return from_torch(build("family:ofa_mbv3:3", resolution=32), (1, 3, 32, 32), name="mbv3")


def test_builtins() -> None:
    cpu, cuda, edge = (get_device(n) for n in ("cpu", "cuda", "edge"))
    assert get_device(None) == cpu and get_device(cuda) is cuda
    assert cpu.memory_budget_mb and cpu.memory_budget_mb > 100  # this machine's RAM
    assert not cpu.fast_bf16 and cpu.time_factor("bf16") > 1  # measured: slower than fp32
    assert cuda.fast_bf16 and cuda.fast_fp16
    assert edge.fast_fp16 and not edge.fast_bf16
    assert planned_precisions("cpu") == ("fp32", "bf16")
    assert planned_precisions("cuda") == ("fp32", "bf16")  # a tie goes to bf16
    assert planned_precisions("edge") == ("fp32", "fp16")
    assert planned_precisions(Device("fp32-only")) == ("fp32",)
    assert cpu.to_dict()["precision_time"]["fp32"] == 1.0


def test_device_file(tmp_path: Path) -> None:
    path = tmp_path / "jetson.json"
    path.write_text(json.dumps({"name": "jetson", "memory_budget_mb": 2048,
                                "precision_time": {"fp16": 0.5, "bf16": 2.0}}))  # fmt: skip
    dev = get_device(str(path))
    assert dev.memory_budget_mb == 2048 and dev.fast_fp16 and dev.time_factor("fp32") == 1.0
    assert Device.from_dict(dev.to_dict()) == dev  # round trip


@pytest.mark.parametrize(
    "content, match",
    [
        ("{", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"name": "x", "memory_budget_mb": -5}', "positive number"),
        ('{"name": "x", "precision_time": {"int4": 0.2}}', "unknown precision"),
        ('{"name": "x", "precision_time": {"bf16": 0}}', "positive number"),
        ('{"name": "x", "precision_time": {"fp32": 2}}', "relative to fp32"),
        ('{"name": "x", "speed": 3}', "unknown field"),
        ('{"memory_budget_mb": 5}', "non-empty name"),
    ],
)
def test_bad_device_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "dev.json"
    path.write_text(content)
    with pytest.raises(DeviceError, match=match):
        get_device(str(path))


def test_unknown_names() -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        get_device("tpu")
    with pytest.raises(DeviceError, match="does not exist"):
        get_device("/nonexistent/dev.json")


def test_half_precision_prior_depends_on_the_device() -> None:
    c = MConfig(batch_size=16, prec="bf16")
    fp32 = MConfig(batch_size=16)
    assert accuracy_prior(c, device=get_device("cpu")) < accuracy_prior(fp32)
    assert accuracy_prior(c, device=get_device("cuda")) == accuracy_prior(fp32)


def test_cpu_keeps_fp32_and_says_why(cg: Any, predictor: Any) -> None:
    r = plan(cg, 1e5, predictor, space=SPACE, device="cpu")
    assert r.chosen is not None and r.chosen.config.prec == "fp32"
    bf16 = [c for c in r.feasible if c.config.prec == "bf16"]
    assert all(c.time_factor == get_device("cpu").time_factor("bf16") for c in bf16)
    twin = next(c for c in bf16 if c.config.replace(prec="fp32") == r.chosen.config)
    if twin.latency_s is None:  # no latency head: estimated FLOPs times the device's factor
        assert twin.speed == pytest.approx(r.chosen.speed * twin.time_factor)
    else:  # the shipped latency head was measured on this CPU: used as it is
        assert twin.speed == twin.latency_s and r.chosen.speed == r.chosen.latency_s
    text = r.precision_explanation()
    assert text.startswith("bf16 not chosen: bf16 steps take 16× fp32's time on cpu (slower)")
    assert text in r.explanation() and r.to_dict()["device"]["name"] == "cpu"


def test_cuda_prefers_bf16_where_it_is_faster(cg: Any, predictor: Any) -> None:
    r = plan(cg, 1e5, predictor, space=SPACE, device="cuda")
    assert r.chosen is not None
    assert r.chosen.config == MConfig(batch_size=16, prec="bf16")
    assert r.precision_explanation().startswith("bf16 chosen: bf16 steps take 0.5")


def test_cpu_takes_bf16_when_it_buys_accuracy(cg: Any, predictor: Any) -> None:
    """A budget between full bf16's and full fp32's peaks: bf16 is slower on the CPU but
    lets full fine-tuning fit, which the accuracy rule puts first."""
    full32 = plan(cg, 1e5, predictor, candidates=["bs=16"], margin=0.0).chosen
    full16 = plan(cg, 1e5, predictor, candidates=["bs=16,prec=bf16"], margin=0.0).chosen
    assert full16.peak_bytes < full32.peak_bytes
    space = MSpace(batch_sizes=(16,), micro_batches=(16,), freezes=(0.0, 0.5), segments=(0,),
                   methods=("full", "bias"), precisions=("fp32", "bf16"))  # fmt: skip
    budget = (full16.peak_bytes + full32.peak_bytes) / 2 / MB
    r = plan(cg, budget, predictor, space=space, margin=0.0, device="cpu")
    assert r.chosen.config == MConfig(batch_size=16, prec="bf16")
    assert "lets a more accurate configuration fit" in r.precision_explanation()


class WithLatency:
    """Adds a predicted latency, measured on a GPU, in which bf16 is *slower*,
    contradicting the cuda device's factor."""

    latency_device = "cuda"

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict(self, cg: Any, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
        out = self.inner.predict(cg, configs)
        for r in out:
            c = MConfig.parse(r["config"])
            r["latency_s"] = 0.010 * c.accum_steps * (2.0 if c.prec == "bf16" else 1.0)
        return out


def test_predicted_latency_is_not_scaled_again(cg: Any, predictor: Any) -> None:
    r = plan(cg, 1e5, WithLatency(predictor), space=SPACE, device="cuda")
    assert all(c.speed == c.latency_s for c in r.feasible)
    # equally accurate on cuda; the predicted latency (not the device factor) decides
    assert r.chosen.config == MConfig(batch_size=16)
    assert r.chosen.speed_source == "predicted latency"
    # planned for another device, a latency measured on cuda only informs: the edge
    # device's factors rank (fp16 is faster there)
    space = dataclasses.replace(SPACE, precisions=("fp32", "fp16"))
    e = plan(cg, 1e5, WithLatency(predictor), space=space, device="edge")
    assert e.chosen.config.prec == "fp16" and e.chosen.speed_source == "GFLOPs × precision factor"


def test_budget_from_the_device_and_edge_plans_fp16(cg: Any, predictor: Any) -> None:
    r = plan(cg, None, predictor, device="edge", batch_size=16, top_k=1)
    assert r.budget_mb == 1024.0 and r.budget_source == "device edge's memory"
    assert {c.config.prec for c in r.feasible} == {"fp32", "fp16"}
    assert r.chosen.config.prec == "fp16"  # fast on edge, and full fine-tuning fits
    assert set(default_space(cg, 16, "edge").precisions) == {"fp32", "fp16"}
    with pytest.raises(PlanError, match="no memory budget"):
        plan(cg, None, predictor, device=Device("nomem"))
    with pytest.raises(PlanError, match="does not train in"):
        plan(cg, 100, predictor, candidates=["bs=16,prec=fp16"], device=Device("x"))
    with pytest.raises(PlanError, match="unknown device"):
        plan(cg, 100, predictor, device="tpu")


def test_cli_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["plan", "family:ofa_mbv3:3", "--input-shape", "1,3,32,32", "--batch-size", "16"]
    assert main([*args, "--device", "edge", "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget_mb"] == 1024 and data["device"]["name"] == "edge"
    assert data["precision_explanation"] and data["chosen"]["precision_time_factor"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "precision_time": {"bf16": -1}}')
    for extra, match in (
        (["--device", str(bad), "--budget-mb", "50"], "positive number"),
        (["--device", "tpu", "--budget-mb", "50"], "unknown device"),
        (["--device", str(tmp_path / "missing.json")], "does not exist"),
    ):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
