"""Cross-task label sharing for the accuracy forests (``aiop.predictor.share``,
``Predictor(acc_share=...)``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.families import build_arch, sample_arch
from aiop.predictor.api import Predictor, PredictorError, Sample
from aiop.predictor.blocks import find_blocks
from aiop.predictor.forest import TreeEnsemble
from aiop.predictor.model import GNNSpec
from aiop.predictor.share import check_acc_share, choose_share, share_for, shared_labels


def test_shared_labels_blend_standardised_labels_within_a_family():
    arch = {
        "acc:a": {"m1": ("f", 0.5), "m2": ("f", 0.7), "m3": ("g", 0.1), "m4": ("g", 0.3)},
        "acc:b": {"m1": ("f", 10.0), "m2": ("f", 8.0), "m3": ("g", 5.0)},
    }
    assert shared_labels(arch, "acc:a", 0.0) == {"m1": 0.5, "m2": 0.7, "m3": 0.1, "m4": 0.3}
    out = shared_labels(arch, "acc:a", 1.0)
    # family f: a's z = -1 / +1 (mean 0.6, std 0.1), b's z = +1 / -1: the blend is the mean
    assert out["m1"] == pytest.approx(0.6) and out["m2"] == pytest.approx(0.6)
    # family g: b has one label (std 0 → z 0); m4 has no b label and keeps its own
    assert out["m3"] == pytest.approx(0.2 + 0.1 * (-1 + 0) / 2)
    assert out["m4"] == pytest.approx(0.3)
    half = shared_labels(arch, "acc:a", 0.5)
    assert half["m1"] == pytest.approx(0.6 + 0.1 * (-1 + 0.5) / 1.5)


def test_check_acc_share():
    assert check_acc_share("cv") == "cv"
    assert check_acc_share("0.5") == 0.5 and check_acc_share(0) == 0.0
    for bad in ("-1", "auto", float("nan"), -0.1):
        with pytest.raises(ValueError, match="acc_share"):
            check_acc_share(bad)
    per_task = check_acc_share("semantic=0.5, acc:detection=cv")
    assert per_task == {"semantic": 0.5, "detection": "cv"}
    assert share_for(per_task, "acc:semantic") == 0.5 and share_for(per_task, "acc:pose") == 0.0
    assert share_for(0.25, "acc:pose") == 0.25
    for bad in ("semantic=", "=0.5", "semantic=1,semantic=2", "pose=-1"):
        with pytest.raises(ValueError, match="acc_share"):
            check_acc_share(bad)
    with pytest.raises(PredictorError, match="acc_share"):
        Predictor(acc_head="forest", acc_share="lots")


def _synthetic(related: bool, n: int = 120, seed: int = 0):
    """Task a: quality + heavy noise; task b: quality + light noise (``related``) or noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 4))
    quality = x[:, 0] + 0.5 * x[:, 1]
    a = quality + rng.normal(scale=0.6, size=n)
    b = (quality if related else rng.normal(size=n)) + rng.normal(scale=0.05, size=n)
    models = [f"m{i}" for i in range(n)]
    arch = {
        "acc:a": {m: ("f", float(v)) for m, v in zip(models, a)},
        "acc:b": {m: ("f", float(v)) for m, v in zip(models, b)},
    }
    rows = dict(zip(models, x))

    def fit_predict(train, ys, test):
        forest = TreeEnsemble.fit(np.stack([rows[m] for m in train]), np.asarray(ys), trees=30)
        return forest.predict(np.stack([rows[m] for m in test]))

    return arch, fit_predict


def test_cross_validation_shares_a_related_task_and_not_an_unrelated_one():
    arch, fit_predict = _synthetic(related=True)
    lam, scores = choose_share(arch, "acc:a", fit_predict)
    assert lam > 0 and scores[lam] > scores[0.0]
    arch, fit_predict = _synthetic(related=False)
    lam, scores = choose_share(arch, "acc:a", fit_predict)
    assert lam == 0.0 and set(scores) == {0.0, 0.25, 0.5, 1.0}
    # too few architectures for 5 folds: no sharing, no scores
    small = {t: dict(list(v.items())[:6]) for t, v in arch.items()}
    assert choose_share(small, "acc:a", fit_predict) == (0.0, {})


@pytest.fixture(scope="module")
def two_task_samples() -> list[Sample]:
    """Two task graphs per architecture (one graph reused, as the labels differ per task),
    matched by ``meta["model"]``; task b's label is task a's quality without its noise."""
    rng = np.random.default_rng(1)
    out = []
    for seed in range(16):
        arch = sample_arch("ofa_mbv3", seed)
        cg = from_torch(build_arch(arch, resolution=32).eval(), (1, 3, 32, 32), name=str(seed))
        quality = 0.01 * len(find_blocks(cg))
        for task, noise in (("a", 0.02), ("b", 0.0)):
            task_cg = copy.copy(cg)
            task_cg.meta = {**cg.meta, "model": f"family:ofa_mbv3:{seed}"}
            label = quality + noise * rng.normal()
            out.append(Sample(task_cg, MConfig(), {f"acc:{task}": label}, "ofa_mbv3"))
    return out


def _predictor(**kw) -> Predictor:
    return Predictor(
        spec=GNNSpec(conv="graphconv", layers=1, hidden=8, head_hidden=8),
        targets=["acc:a", "acc:b"],
        epochs=0,
        progress=False,
        acc_head="forest",
        forest_trees=20,
        **kw,
    )


def test_predictor_trains_its_forest_on_shared_labels(two_task_samples, tmp_path):
    plain = _predictor()
    plain.fit(two_task_samples)
    assert plain.acc_share_chosen == {}
    shared = _predictor(acc_share=1.0)
    shared.fit(two_task_samples)
    assert shared.acc_share_chosen == {"acc:a": 1.0, "acc:b": 1.0}
    own = {s.cg.meta["model"]: s.labels["acc:a"] for s in two_task_samples if "acc:a" in s.labels}
    arch = {
        t: {
            s.cg.meta["model"]: ("ofa_mbv3", s.labels[t]) for s in two_task_samples if t in s.labels
        }
        for t in ("acc:a", "acc:b")
    }
    expected = shared_labels(arch, "acc:a", 1.0)
    rows_plain, rows_shared = (
        plain.acc_readouts["acc:a"].rows_y,
        shared.acc_readouts["acc:a"].rows_y,
    )
    assert sorted(rows_plain) == pytest.approx(sorted(own.values()))
    assert sorted(rows_shared) == pytest.approx(sorted(expected.values()))
    assert not np.allclose(sorted(rows_plain), sorted(rows_shared))
    # the setting and the weights chosen travel with the file
    loaded = Predictor.load(shared.save(tmp_path / "s.safetensors"))
    assert loaded.acc_share == 1.0 and loaded.acc_share_chosen == shared.acc_share_chosen
    cg = two_task_samples[0].cg
    assert (
        loaded.predict(cg, ["bs=8"])[0]["accuracy"] == shared.predict(cg, ["bs=8"])[0]["accuracy"]
    )


def test_predictor_cv_records_a_weight_per_task(two_task_samples, tmp_path):
    pred = _predictor(acc_share="cv")
    pred.fit(two_task_samples)
    assert set(pred.acc_share_chosen) == {"acc:a", "acc:b"}
    assert all(v in (0.0, 0.25, 0.5, 1.0) for v in pred.acc_share_chosen.values())
    # one task shared, the other not; the mapping survives save/load
    pred = _predictor(acc_share="a=1")
    pred.fit(two_task_samples)
    assert pred.acc_share_chosen == {"acc:a": 1.0}
    loaded = Predictor.load(pred.save(tmp_path / "m.safetensors"))
    assert loaded.acc_share == {"a": 1.0}
    # graphs without a model key are not matched: nothing is shared
    bare = [Sample(copy.copy(s.cg), s.config, s.labels, s.family) for s in two_task_samples]
    for s in bare:
        s.cg.meta = {k: v for k, v in s.cg.meta.items() if k != "model"}
    pred = _predictor(acc_share=1.0)
    pred.fit(bare)
    assert pred.acc_share_chosen == {}
