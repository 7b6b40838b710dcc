"""The analytic step-latency terms, their fit, and the shared node plan of the fast path."""

from __future__ import annotations

import numpy as np
import pytest

from aiop.cg import from_torch
from aiop.mconfig import MConfig, MSpace
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.analytic import PlanCache, estimate_memory
from aiop.predictor.latency import (
    LATENCY_TERMS,
    LatencyError,
    LatencyModel,
    fit_latency_constants,
    latency_terms,
)

T = {name: k for k, name in enumerate(LATENCY_TERMS)}


@pytest.fixture(scope="module")
def resnet():
    cg = from_torch(TinyResNet(), (1, *TinyResNet().input_size))
    return cg, PlanCache(cg)


def _terms(cache: PlanCache, spec: str) -> np.ndarray:
    c = MConfig.parse(spec)
    return latency_terms(cache.latency_plan(c), c)


def _flops(x: np.ndarray, kind: str = "fwd", prec: str = "fp32") -> float:
    return float(x[T[f"flops_dense_{kind}_{prec}"]] + x[T[f"flops_grouped_{kind}_{prec}"]])


def test_full_training_costs_forward_plus_twice_backward(resnet):
    cg, cache = resnet
    x = _terms(cache, "bs=8")
    # convs and linears: all but the norms' and additions' few FLOPs (bytes-bound, counted apart)
    assert 0.95 * 8 * cg.total_flops < _flops(x) <= 8 * cg.total_flops
    # every weighted op but the first computes both gradients; the first only its weight's
    assert 1.5 * _flops(x) < _flops(x, "bwd") <= 2 * _flops(x)


def test_freezing_cuts_backward(resnet):
    _, cache = resnet
    full, half, last = (_terms(cache, s) for s in ("bs=8", "bs=8,freeze=0.5", "bs=8,method=last"))
    assert _flops(last, "bwd") < _flops(half, "bwd") < _flops(full, "bwd")
    assert _flops(last) == _flops(full)  # the forward pass runs whole either way
    assert last[T["calls_conv_bwd_fp32"]] < full[T["calls_conv_bwd_fp32"]]
    assert last[T["calls_other_bwd"]] < full[T["calls_other_bwd"]]
    assert last[T["opt_elems"]] < full[T["opt_elems"]]
    frozen = _terms(cache, "bs=8,freeze=1.0")  # nothing trains: a forward pass only
    assert _flops(frozen, "bwd") == 0 and frozen[T["opt_elems"]] == 0


def test_checkpointing_recomputes_the_forward(resnet):
    _, cache = resnet
    plain, ckpt = _terms(cache, "bs=8"), _terms(cache, "bs=8,ckpt=2")
    assert _flops(ckpt) > _flops(plain)  # the segments run forward twice
    assert _flops(ckpt, "bwd") == _flops(plain, "bwd")
    assert ckpt[T["calls_conv_fwd_fp32"]] > plain[T["calls_conv_fwd_fp32"]]
    assert ckpt[T["calls_norm_bwd"]] == plain[T["calls_norm_bwd"]]


def test_micro_batches_add_calls_not_flops(resnet):
    _, cache = resnet
    one, eight = _terms(cache, "bs=32,mb=32"), _terms(cache, "bs=32,mb=4")
    assert _flops(one) == _flops(eight)
    calls = [k for t, k in T.items() if "calls" in t]
    assert np.array_equal(eight[calls], 8 * one[calls]) and one[calls].sum() > 0
    assert eight[T["micro_batches"]] == 8 and one[T["steps"]] == 1


def test_batch_and_precision(resnet):
    _, cache = resnet
    small, big = _terms(cache, "bs=8"), _terms(cache, "bs=32")
    assert _flops(big) == pytest.approx(4 * _flops(small))
    half = _terms(cache, "bs=8,prec=bf16")
    assert _flops(half) == 0 and _flops(half, "fwd", "half") == _flops(small)
    assert half[T["calls_other_fwd"]] > small[T["calls_other_fwd"]]  # autocast's casts
    assert half[T["calls_conv_fwd_half"]] == small[T["calls_conv_fwd_fp32"]] > 0


def test_lite_branches_and_bias_only(resnet):
    _, cache = resnet
    last, lite = _terms(cache, "bs=8,method=last"), _terms(cache, "bs=8,method=lite")
    assert _flops(lite) > _flops(last)  # the branches run too
    assert _flops(lite, "bwd") > _flops(last, "bwd")
    bias = _terms(cache, "bs=8,method=bias")
    # bias-only layers pass input gradients but compute no weight gradient
    assert _flops(last, "bwd") < _flops(bias, "bwd") < _flops(_terms(cache, "bs=8"), "bwd")
    assert bias[T["opt_elems"]] < _terms(cache, "bs=8")[T["opt_elems"]]


def test_optimizer_cost_grows_with_adam(resnet):
    _, cache = resnet
    sgd, adam = _terms(cache, "bs=8,opt=sgd"), _terms(cache, "bs=8,opt=adam")
    assert adam[T["opt_elems"]] > sgd[T["opt_elems"]] > 0
    assert adam[T["opt_kernels"]] > sgd[T["opt_kernels"]] > 0


def test_fit_recovers_constants_and_is_monotone(resnet):
    """Synthetic labels from known constants over real term vectors: the fit finds them."""
    _, cache = resnet
    small = PlanCache(from_torch(SmallCNN(), (1, *SmallCNN().input_size)))
    space = MSpace.for_model(cache.n_blocks, batch_size=32)
    rows = [latency_terms(c_.latency_plan(c), c) for c_ in (cache, small) for c in space.sample(60)]
    x = np.stack(rows)
    truth = np.zeros(len(LATENCY_TERMS))
    truth[[T["flops_dense_fwd_fp32"], T["flops_dense_fwd_half"]]] = [2e-11, 3e-10]
    truth[[T["flops_dense_bwd_fp32"], T["flops_dense_bwd_half"]]] = [3e-11, 5e-10]
    truth[[T["calls_other_fwd"], T["calls_conv_bwd_fp32"]]] = [3e-6, 1e-4]
    truth[[T["opt_elems"], T["steps"]]] = [1e-9, 2e-3]
    y = x @ truth
    model = fit_latency_constants(x, y)
    assert model.fit_median_ape < 1.0
    pred = model.predict(x)
    assert np.median(np.abs(pred / y - 1)) < 0.01
    m = LatencyModel.from_dict(model.to_dict())
    assert m.constants == model.constants
    assert float(m.predict(_terms(cache, "bs=64"))[0]) > float(m.predict(_terms(cache, "bs=8"))[0])


def test_fit_and_model_errors():
    with pytest.raises(LatencyError, match="at least 3"):
        fit_latency_constants(np.ones((2, len(LATENCY_TERMS))), np.ones(2))
    with pytest.raises(LatencyError, match="refit"):
        LatencyModel(constants=[0.0] * 3, terms=["a", "b", "c"])
    with pytest.raises(LatencyError, match="non-negative"):
        LatencyModel(constants=[-1.0] * len(LATENCY_TERMS))
    with pytest.raises(LatencyError, match="malformed"):
        LatencyModel.from_dict({"constants": "x"})


# -- the fast path: one node plan per structural key, shared -----------------------------
def test_shared_plan_cache_equals_fresh_estimates(resnet):
    """Estimates through one shared cache (deduplicated simulations, memoised saves and
    gradient walks) equal estimates each computed from scratch, to the byte."""
    cg, _ = resnet
    cache = PlanCache(cg)
    configs = MSpace.for_model(cache.n_blocks, batch_size=32).sample(120, seed=5)
    for c in configs:
        shared = estimate_memory(cg, c, cache)
        fresh = estimate_memory(cg, c)
        assert shared == fresh, c
    n_keys = len({(c.freeze, c.ckpt, c.method) for c in configs})
    simulated = len(cache._plain.by_structure) + (
        len(cache._lite.by_structure) if cache._lite and cache._lite is not cache._plain else 0
    )
    assert simulated <= n_keys


def test_predictions_through_the_shared_path_equal_the_old_path(resnet, monkeypatch):
    """Predictor.predict (node plans shared between the PyG flags and the analytic model,
    one PyG graph per flag pattern) equals the old path: flags from ``MConfig.node_flags``,
    one PyG graph per structural key, fresh analytic estimates."""
    import copy

    import torch

    from aiop.predictor import analytic
    from aiop.predictor.api import Predictor, Sample
    from aiop.predictor.features import GraphFeaturizer
    from aiop.predictor.model import GNNSpec

    cg, _ = resnet
    specs = ["bs=8", "bs=16,mb=4,freeze=0.5", "bs=8,ckpt=2,method=lite", "bs=8,method=bias"]
    samples = [
        Sample(cg, MConfig.parse(s), {"memory": 1e6 * (k + 1), "latency": 0.01 * (k + 1)}, "x")
        for k, s in enumerate(specs)
    ]
    pred = Predictor(spec=GNNSpec(layers=1, hidden=8), epochs=2, progress=False)
    pred.fit(samples)
    configs = MSpace.for_model(PlanCache(cg).n_blocks, batch_size=16).sample(60, seed=9)
    fast = pred.predict(cg, configs)

    old = copy.copy(pred)
    plain = GraphFeaturizer()
    old._featurizer = plain
    old._plan_caches = type(pred._plan_caches)()
    # the old path: every variant's flags from MConfig.node_flags, no plan handed over
    plain.pyg = lambda cg_, c, plans=None: GraphFeaturizer.pyg(plain, cg_, c)  # type: ignore
    with monkeypatch.context() as m:  # no sharing of PyG graphs between structural keys
        m.setattr(analytic.PlanCache, "flags_signature", lambda self, c: analytic.structural_key(c))
        slow = old.predict(cg, configs)
    # the analytic latency sums the same terms in another order: equal to the last ulp or so
    assert len(slow) == len(fast)
    for a, b in zip(slow, fast):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-12), k
            else:
                assert a[k] == b[k], k
    for c, r in zip(configs, fast):
        assert r["peak_memory_bytes_analytic"] == estimate_memory(cg, c).peak_memory_bytes
        assert torch.equal(pred._featurizer.pyg(cg, c).x, plain.pyg(cg, c).x)
    assert all(r["latency_s"] > 0 and r["latency_s_analytic"] > 0 for r in fast)


def test_grouped_latency_equals_per_config_terms(resnet):
    """Predictor's per-(structure, precision, optimizer) coefficients give each config's
    analytic latency as the fitted model does on that config's own term vector."""
    from aiop.predictor.api import Predictor

    _, cache = resnet
    configs = MSpace.for_model(cache.n_blocks, batch_size=64).sample(50, seed=2)
    model = LatencyModel(constants=list(np.linspace(1e-9, 1e-4, len(LATENCY_TERMS))))
    pred = Predictor()
    pred.latency_model = model
    grouped = pred._analytic_latency(cache, configs)
    single = [float(model.predict(latency_terms(cache.latency_plan(c), c))[0]) for c in configs]
    assert np.allclose(grouped, single, rtol=1e-12)
