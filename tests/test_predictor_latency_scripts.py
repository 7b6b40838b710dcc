"""Latency end to end on a tiny store: the shipped-predictor script, run_gpi_acc_predictor.py
``-targets latency`` and benchmarks/predictor_latency.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_helpers import load_script

from aiop.cache import Store
from aiop.cg import from_torch
from aiop.mconfig import MConfig, MSpace
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.analytic import PlanCache, estimate_memory
from aiop.predictor.api import Predictor
from aiop.predictor.latency import LATENCY_TERMS, latency_terms

ROOT = Path(__file__).resolve().parents[1]
FACTOR = {"cnn": 1.0, "res": 1.3}  # what the analytic model cannot know: a per-family factor


def _truth() -> np.ndarray:
    """Device constants the labels are made with."""
    t = dict.fromkeys(LATENCY_TERMS, 0.0)
    t.update(
        flops_dense_fwd_fp32=3e-11, flops_dense_bwd_fp32=4e-11, flops_dense_fwd_half=2e-10,
        flops_dense_bwd_half=3e-10, calls_other_fwd=4e-6, calls_conv_fwd_fp32=3e-5,
        calls_conv_bwd_fp32=8e-5, opt_elems=1e-9, steps=2e-3,
    )  # fmt: skip
    return np.asarray(list(t.values()))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """Two families × three widths; memory (meta) and latency (cpu, real) records."""
    path = tmp_path_factory.mktemp("lat") / "tiny.db"
    theta = _truth()
    with Store(path) as store:
        for family, cls in (("cnn", SmallCNN), ("res", TinyResNet)):
            for width in (8, 12, 16):
                model = cls(width=width)
                cg = from_torch(model, (1, *model.input_size), name=f"{family}{width}")
                fp = store.put_graph(cg, meta={"family": family, "model": f"{family}{width}"})
                cache = PlanCache(cg)
                space = MSpace.for_model(cache.n_blocks, batch_size=32, precisions=("fp32", "bf16"))
                for c in space.sample(6, seed=width):
                    spec = MConfig.parse(c).format()
                    peak = estimate_memory(cg, c, cache).peak_memory_bytes
                    store.put_record(
                        fp, spec, {"peak_memory_bytes": peak}, device="meta", mode="meta"
                    )
                    lat = float(latency_terms(cache.latency_plan(c), c) @ theta) * FACTOR[family]
                    store.put_record(fp, spec, {"latency_s": lat}, device="cpu", mode="real")
    return path


@pytest.mark.slow  # trains GNNs: ~10 CPU-seconds each
def test_train_predictor_ships_latency(store_path, tmp_path, capsys):
    script = load_script(ROOT / "scripts" / "train_predictor.py", "train_predictor")
    out = tmp_path / "p.safetensors"
    argv = ["-store", str(store_path), "-output", str(out), "-epochs", "3", "-q"]
    assert script.main([*argv, "-holdout", "0.3"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["latency_model"]["n_labels"] > 0 and "latency" in report["errors"]
    pred = Predictor.load(out)
    assert pred.latency_model is not None and pred.targets[:2] == ["memory", "latency"]
    cg = from_torch(SmallCNN(), (1, *SmallCNN().input_size))
    small, big = pred.predict(cg, ["bs=8", "bs=64"])
    assert 0 < small["latency_s_analytic"] < big["latency_s_analytic"]
    assert small["latency_s"] > 0


@pytest.mark.slow  # trains GNNs: ~10 CPU-seconds each
def test_gpi_script_latency(store_path, tmp_path, capsys):
    script = load_script(ROOT / "scripts" / "run_gpi_acc_predictor.py", "run_gpi_latency")
    for extra in ([], ["-no_analytic", "-gnn", "aiop"]):
        rc = script.main(
            [
                "-cache_file", str(store_path), "-family_test", "res", "-targets", "latency",
                "-epochs", "2", "-num_seeds", "1", "-output_dir", str(tmp_path), "-q", *extra,
            ]
        )  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        result = json.loads((tmp_path / "gpi.json").read_text())
        lat = result["results"]["res"]["noft"]["latency"]
        assert np.isfinite(lat["mape"]["mean"]) and (tmp_path / "gpi_res_latency.png").is_file()


@pytest.mark.slow  # trains GNNs: ~10 CPU-seconds each
def test_latency_benchmark_on_tiny_store(store_path, tmp_path):
    bench = load_script(ROOT / "benchmarks" / "predictor_latency.py", "predictor_latency_bench")
    argv = ["-store", str(store_path), "-families", "cnn", "res", "-epochs", "1", "-q"]
    assert bench.main([*argv, "-out", str(tmp_path), "-name", "t", "-holdout", "0.34"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    lofo = result["summary"]["lofo"]
    assert set(lofo) == {"kernels", "default", "analytic", "aiop"}
    # constants fitted on res (labels × 1.3), tested on cnn: 30 % too high, every label
    cnn = result["splits"]["lofo:cnn"]["analytic"][0]
    assert cnn["median_ape"] == pytest.approx(30.0, rel=0.02)
    # the random split trains on both families: the shared fit lands in between
    assert result["splits"]["random"]["analytic"][0]["median_ape"] < cnn["median_ape"]
    assert (tmp_path / "t_scatter.png").stat().st_size > 1000
    assert "Leave one family out" in (tmp_path / "t.md").read_text()
