"""The analytic memory model against the meta-mode profiler on networks outside the zoo."""

from __future__ import annotations

import pytest

from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.analytic import estimate_memory, simulate_step

profiler = pytest.importorskip("aiop.profiler")


@pytest.fixture(scope="module")
def graphs():
    return {cls: from_torch(cls(), (1, *cls().input_size)) for cls in (SmallCNN, TinyResNet)}


# Full training, accumulation, optimizers and precision: within 3 % of the profiler.
@pytest.mark.parametrize("cls", [SmallCNN, TinyResNet])
@pytest.mark.parametrize(
    "spec", ["bs=8,mb=8", "bs=8,mb=4", "bs=32,mb=32", "bs=8,mb=8,opt=adam", "bs=8,mb=8,ckpt=1"]
)
def test_close_to_profiler(graphs, cls, spec):
    measured = profiler.profile(cls, spec, mode="meta").to_dict()["peak_memory_bytes"]
    estimate = estimate_memory(graphs[cls], spec)
    assert abs(estimate.peak_memory_bytes / measured - 1) < 0.03, (estimate, measured)


def test_static_terms_are_exact(graphs):
    cg = graphs[TinyResNet]
    n_params = sum(p.numel() for p in TinyResNet().parameters())
    adam = estimate_memory(cg, "bs=8,opt=adam")
    sgd = estimate_memory(cg, "bs=8,opt=sgd")
    assert sgd.params == 4 * n_params and sgd.grads == 4 * n_params
    assert sgd.optimizer == 4 * n_params and adam.optimizer == 8 * n_params
    frozen = estimate_memory(cg, "bs=8,method=last")
    head = sum(p.numel() for p in TinyResNet().head.parameters())
    assert frozen.trainable_params == head


def test_monotone_in_the_techniques(graphs):
    cg = graphs[TinyResNet]
    base = estimate_memory(cg, "bs=32").peak_memory_bytes
    assert estimate_memory(cg, "bs=32,mb=8").peak_memory_bytes < base
    assert estimate_memory(cg, "bs=32,freeze=0.5").peak_memory_bytes < base
    assert estimate_memory(cg, "bs=32,method=last").peak_memory_bytes < base
    assert estimate_memory(cg, "bs=64").peak_memory_bytes > base


def test_frozen_prefix_saves_nothing(graphs):
    cg = graphs[SmallCNN]
    frozen = [False] * cg.num_nodes
    profile = simulate_step(cg, frozen, [None] * cg.num_nodes)
    assert profile.saved == 0 and profile.backward_act == ()
    assert profile.forward_peak > 0


def test_accepts_spec_or_config(graphs):
    cg = graphs[SmallCNN]
    assert estimate_memory(cg, "bs=16,mb=4") == estimate_memory(cg, MConfig(16, 4))
