"""Predictor: fit, batched predict, save/load without pickle, and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from aiop.cg import from_torch
from aiop.mconfig import MConfig, MConfigError
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.analytic import estimate_memory
from aiop.predictor.api import Predictor, PredictorError, Sample
from aiop.predictor.model import GNNSpec
from aiop.predictor.normalize import Normalizer, NormalizerError

SPECS = [
    "bs=8",
    "bs=16,mb=4",
    "bs=8,freeze=0.5",
    "bs=32,method=last",
    "bs=8,opt=adam",
    "bs=16,ckpt=1",
]


def _samples():
    """Labels = analytic estimate × a known per-family factor, latency ∝ FLOPs × batch."""
    out = []
    for cls, width, factor in [(SmallCNN, 8, 1.10), (SmallCNN, 16, 1.10), (TinyResNet, 8, 0.90)]:
        cg = from_torch(cls(width=width), (1, *cls().input_size))
        for spec in SPECS:
            cfg = MConfig.parse(spec)
            mem = estimate_memory(cg, cfg).peak_memory_bytes * factor
            labels = {"memory": mem, "latency": 1e-9 * cg.total_flops * cfg.batch_size + 1e-3}
            out.append(Sample(cg, cfg, labels, family=cls.__name__))
    return out


@pytest.fixture(scope="module")
def fitted():
    samples = _samples()
    p = Predictor(
        spec=GNNSpec(layers=2, hidden=16), epochs=120, batch_size=6, lr=3e-3, progress=False, seed=1
    )
    p.fit(samples)
    return p, samples


def test_fit_learns_the_correction(fitted):
    p, samples = fitted
    errors = []
    for s in samples:
        pred = p.predict(s.cg, [s.config])[0]
        errors.append(abs(pred["peak_memory_bytes"] / s.labels["memory"] - 1))
    assert np.median(errors) < 0.05  # the analytic estimate alone is 10 % off


def test_batched_predict_equals_single(fitted):
    p, samples = fitted
    cg = samples[0].cg
    batch = p.predict(cg, SPECS)
    single = [p.predict(cg, [spec])[0] for spec in SPECS]
    for a, b in zip(batch, single):
        assert a["peak_memory_bytes"] == b["peak_memory_bytes"]
        assert a["latency_s"] == pytest.approx(b["latency_s"], rel=1e-5)
    assert [r["config"] for r in batch] == [MConfig.parse(s).format() for s in SPECS]
    assert batch[0]["flops"] == cg.total_flops and batch[0]["params"] == cg.total_params
    assert set(batch[0]["breakdown"]) >= {"params", "grads", "optimizer", "activations", "inputs"}


def test_save_load_round_trip(fitted, tmp_path):
    p, samples = fitted
    p.calibrate(samples)
    path = p.save(tmp_path / "p.safetensors")
    q = Predictor.load(path)
    assert q.predict(samples[0].cg, SPECS) == p.predict(samples[0].cg, SPECS)
    assert q.error_quantiles == p.error_quantiles
    assert q.error_quantiles["memory"]["n"] == len(samples)


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)


def test_refuses_other_versions_and_garbage(fitted, tmp_path):
    p, _ = fitted
    path = p.save(tmp_path / "p.safetensors")
    _rewrite_meta(path, tmp_path / "fv.safetensors", feature_version="999")
    with pytest.raises(PredictorError, match="feature version 999"):
        Predictor.load(tmp_path / "fv.safetensors")
    _rewrite_meta(path, tmp_path / "fmt.safetensors", format="something-else")
    with pytest.raises(PredictorError, match="not an aiop predictor"):
        Predictor.load(tmp_path / "fmt.safetensors")
    _rewrite_meta(path, tmp_path / "cfg.safetensors", config=json.dumps({"spec": {}}))
    with pytest.raises(PredictorError, match="corrupt"):
        Predictor.load(tmp_path / "cfg.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(PredictorError, match="not a predictor file"):
        Predictor.load(tmp_path / "junk.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PredictorError):
        Predictor.load(tmp_path / "cut.safetensors")
    with pytest.raises(PredictorError, match="no such predictor"):
        Predictor.load(tmp_path / "missing.safetensors")


def test_bad_configs_and_unfitted(fitted):
    p, samples = fitted
    with pytest.raises(MConfigError):
        p.predict(samples[0].cg, ["bs=8,mb=3"])
    with pytest.raises(MConfigError, match="segments"):
        p.predict(samples[0].cg, ["bs=8,ckpt=40"])
    with pytest.raises(PredictorError, match="not fitted"):
        Predictor().predict(samples[0].cg, ["bs=8"])
    with pytest.raises(PredictorError, match="no samples"):
        Predictor().fit([])


def test_out_of_vocabulary_graph_predicts_with_warning(fitted, caplog):
    p, _ = fitted
    cg = from_torch(SmallCNN(width=8), (1, 1, 28, 28))
    cg.nodes[3].op = "FancyOp"
    cg.meta.pop("unknown_ops", None)
    with caplog.at_level(logging.WARNING):
        out = p.predict(cg, ["bs=8"])
    assert out[0]["peak_memory_bytes"] > 0 and "FancyOp" in caplog.text


def test_normalizers_invert():
    y = np.array([1e6, 5e6, 2e7])
    flops = np.array([1e8, 2e9, 5e10])
    for kind in ("stand", "stand_flops", "log", "none"):
        n = Normalizer(kind).fit(y, flops)
        assert np.allclose(n.inverse(n.transform(y, flops), flops), y)
        assert Normalizer.from_dict(n.to_dict()) == n
    with pytest.raises(NormalizerError):
        Normalizer("log").fit(np.array([-1.0]))
    with pytest.raises(NormalizerError):
        Normalizer("stand_flops").fit(y)
    with pytest.raises(NormalizerError):
        Normalizer("bogus")


def test_aiop_baseline_spec():
    spec = GNNSpec.aiop_baseline()
    assert (spec.conv, spec.layers, spec.hidden, spec.pool, spec.activation) == (
        "graphconv",
        6,
        32,
        "mean",
        "tanh",
    )
    with pytest.raises(ValueError, match="unknown conv"):
        GNNSpec(conv="nope").validate()


def test_caches_are_bounded_and_do_not_trust_a_files_fingerprint(fitted, tmp_path):
    from aiop.cg.graph import ComputeGraph

    p, samples = fitted
    cg = samples[0].cg
    other = samples[-1].cg
    # A graph file cannot claim another graph's identity through meta["fp"].
    cg.meta["fp"] = cg.fingerprint
    path = tmp_path / "g.json"
    cg.save(path)
    data = json.loads(path.read_text())
    assert "fp" not in data["meta"]
    data["meta"]["fp"] = other.fingerprint
    forged = ComputeGraph.from_dict(data)
    assert "fp" not in forged.meta
    want = p.predict(cg, SPECS[:2])
    assert p.predict(forged, SPECS[:2]) == want

    p.clear_caches()
    p._featurizer.max_graphs = 1
    for s in samples:
        p.predict(s.cg, [s.config])
    assert len(p._featurizer._graphs) == 1
    assert {k[0] for k in p._featurizer._variants} == {samples[-1].cg.fingerprint}
    assert p.predict(cg, SPECS[:2]) == want  # evicted graphs are rebuilt, same answer
