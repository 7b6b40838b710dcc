"""The kernel-level latency model: kernel listing, microbenchmarks, regressors, step sums."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.examples import TinyResNet
from aiop.predictor.analytic import PlanCache
from aiop.predictor.kernels import (
    FEATURES_VERSION,
    KIND_LIST,
    KernelModel,
    KernelModelError,
    KernelRegressor,
    features,
)
from aiop.predictor.latency import (
    KERNEL_TERMS,
    KernelLatencyModel,
    LatencyError,
    fit_kernel_latency,
    kernel_parts,
    latency_model_from_dict,
)
from aiop.profiler import microbench
from aiop.profiler.microbench import KernelPoint, KernelRecord

K = {name: k for k, name in enumerate(KERNEL_TERMS)}


@pytest.fixture(scope="module")
def resnet():
    cg = from_torch(TinyResNet(), (1, *TinyResNet().input_size))
    return cg, PlanCache(cg)


def _synthetic_records(rng: np.random.Generator, n: int = 15) -> list[KernelRecord]:
    """Records of every kind TinyResNet runs, timed by a known law: 5 µs + work / rate."""
    recs = []
    for kind in (
        "conv",
        "dwconv",
        "gconv",
        "linear",
        "bn",
        "relu",
        "add",
        "gap",
        "view",
        "maxpool",
        "mul",
        "avgpool",
    ):
        for dtype in ("fp32", "bf16"):
            for _ in range(n):
                c = int(rng.integers(4, 64))
                g = {"dwconv": c, "gconv": 2}.get(kind, 1)
                cin = c if kind != "gconv" else 2 * (c // 2 + 1)
                p = KernelPoint(
                    kind,
                    dtype,
                    int(rng.integers(1, 16)),
                    cin,
                    cin if g > 1 else int(rng.integers(4, 64)),
                    3,
                    1,
                    g,
                    int(rng.integers(2, 16)),
                    int(rng.integers(2, 16)),
                )
                rate = 2e10 if dtype == "fp32" else 2e9
                t = 5e-6 + p.flops() / rate
                times = {"fwd": t, "bin": 1.5 * t + 3e-5}  # + the harness's grad call
                if kind in ("conv", "dwconv", "gconv", "linear"):
                    times["bw"] = 2.0 * t + 3e-5
                recs.append(KernelRecord(p, times))
    for kind in microbench.OPT_KINDS:
        for _ in range(6):
            tensors, elems = int(rng.integers(1, 50)), int(rng.integers(1000, 10**6))
            recs.append(
                KernelRecord(
                    KernelPoint(kind, "fp32", tensors=tensors, elems=elems),
                    {"step": 2e-5 * tensors + 1e-9 * elems},
                )
            )
    return recs


@pytest.fixture(scope="module")
def kernels():
    return KernelModel.fit(_synthetic_records(np.random.default_rng(0)), harness_s=3e-5, steps=120)


# -- the kernels of a step -----------------------------------------------------------------
def test_node_kernels_list_the_ops(resnet):
    cg, cache = resnet
    nk = cache.latency_plan(MConfig.parse("bs=8")).graph.kernels
    names = nk.names
    convs = [i for i, n in enumerate(cg.nodes) if n.op == "Conv"]
    assert convs and all(names[i] in ("conv", "dwconv", "gconv") for i in convs)
    assert all(names[i] == "bn" for i, n in enumerate(cg.nodes) if n.op == "BatchNormalization")
    assert names[0] == ""  # the input runs nothing
    first = convs[0]
    assert nk.cin[first] == 3 and nk.k[first] == cg.nodes[first].attrs["kernel_shape"][0]


def test_freezing_removes_backward_kernels_below_the_trainable_part(resnet):
    _, cache = resnet
    full = cache.latency_plan(MConfig.parse("bs=8"))
    half = cache.latency_plan(MConfig.parse("bs=8,freeze=0.5"))
    frozen = cache.latency_plan(MConfig.parse("bs=8,freeze=1.0"))
    assert half.bwd_weight.sum() < full.bwd_weight.sum()
    assert half.bwd_input.sum() < full.bwd_input.sum()
    assert np.array_equal(half.fwd_runs, full.fwd_runs)
    # below the lowest trainable layer nothing runs backward
    low = int(np.argmax(half.bwd_input + half.bwd_weight > 0))
    assert low > 0 and not (half.bwd_input[:low].any() or half.bwd_weight[:low].any())
    assert frozen.bwd_input.sum() == frozen.bwd_weight.sum() == 0 and frozen.fwd_runs.sum() > 0
    # the first conv's input needs no gradient: weight gradient only
    first = int(np.flatnonzero(full.graph.kernels.has_weight_grad)[0])
    assert full.bwd_weight[first] == 1 and full.bwd_input[first] == 0


def test_checkpointing_adds_recomputed_forwards(resnet):
    _, cache = resnet
    plain = cache.latency_plan(MConfig.parse("bs=8"))
    ckpt = cache.latency_plan(MConfig.parse("bs=8,ckpt=2"))
    assert (plain.fwd_runs <= 1).all() and (ckpt.fwd_runs == 2).sum() > 0
    assert np.array_equal(plain.bwd_input, ckpt.bwd_input)


def test_lite_adds_branch_kernels(resnet):
    _, cache = resnet
    last = cache.latency_plan(MConfig.parse("bs=8,method=last"))
    lite = cache.latency_plan(MConfig.parse("bs=8,method=lite"))
    assert lite.fwd_runs.sum() > last.fwd_runs.sum()
    names = lite.graph.kernels.names
    branch = [i for i, n in enumerate(names) if n == "gconv"]
    # the branches' grouped 5×5 convs: the kernel size comes from the weight (no attributes)
    assert branch and all(lite.graph.kernels.k[i] == 5 for i in branch)
    assert all(lite.bwd_weight[i] == 1 for i in branch)


def test_micro_batches_scale_the_kernel_count(resnet, kernels):
    _, cache = resnet
    one, eight = MConfig.parse("bs=32,mb=32"), MConfig.parse("bs=32,mb=4")
    r1 = kernel_parts(cache.latency_plan(one), one, kernels)
    r8 = kernel_parts(cache.latency_plan(eight), eight, kernels)
    assert r8[K["kernel_calls"]] == 8 * r1[K["kernel_calls"]] > 0
    assert r8[K["micro_batches"]] == 8 and r1[K["steps"]] == r8[K["steps"]] == 1
    assert r8[K["optimizer"]] == r1[K["optimizer"]] > 0
    # smaller micro-batches: less work each, but 8 of them; per-call costs do not shrink
    assert r8[K["kernel_fwd_fp32"]] > r1[K["kernel_fwd_fp32"]] * 0.5
    half = MConfig.parse("bs=32,mb=32,prec=bf16")
    rh = kernel_parts(cache.latency_plan(half), half, kernels)
    assert rh[K["kernel_fwd_fp32"]] == 0 and rh[K["kernel_fwd_half"]] > r1[K["kernel_fwd_fp32"]]
    sgd, adam = MConfig.parse("bs=32,mb=32,opt=sgd"), MConfig.parse("bs=32,mb=32,opt=adam")
    rows = [kernel_parts(cache.latency_plan(c), c, kernels) for c in (sgd, adam)]
    assert 0 < rows[0][K["optimizer"]] < rows[1][K["optimizer"]]


# -- regressors ------------------------------------------------------------------------------
def test_regressor_learns_a_law_and_round_trips():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, size=(200, 3))
    t = 1e-6 * np.exp(0.8 * x[:, 0]) * (1 + 0.3 * np.sin(x[:, 1]))
    raw = KernelRegressor.inputs(x, False, "fwd")
    reg = KernelRegressor.fit(raw[:160], t[:160], steps=400)
    ape = np.abs(reg.predict(raw[160:]) / t[160:] - 1)
    assert np.median(ape) < 0.15
    back = KernelRegressor.from_dict(json.loads(json.dumps(reg.to_dict())))
    assert np.allclose(back.predict(raw), reg.predict(raw), rtol=1e-12)
    # beyond the measured box, time grows with the work
    far = KernelRegressor.inputs(np.array([[x[:, 0].max() + 2.0, 5.0, 5.0]]), False, "fwd")
    edge = KernelRegressor.inputs(np.array([[x[:, 0].max(), 5.0, 5.0]]), False, "fwd")
    assert reg.predict(far)[0] == pytest.approx(reg.predict(edge)[0] * math.exp(2.0), rel=1e-9)
    with pytest.raises(KernelModelError, match="inconsistent"):
        KernelRegressor.from_dict({**reg.to_dict(), "mean": [0.0]})


def test_kernel_model_fit_save_load(kernels, resnet, tmp_path):
    _, cache = resnet
    x = features(
        "conv",
        8.0,
        {
            c: np.array([v])
            for c, v in (
                ("cin", 32),
                ("cout", 32),
                ("k", 3),
                ("stride", 1),
                ("groups", 1),
                ("h", 8),
                ("w", 8),
                ("ho", 8),
                ("wo", 8),
                ("rows", 1),
            )
        },
    )
    fp32, bf16 = (
        kernels.predict("conv", "fp32", "fwd", x),
        kernels.predict("conv", "bf16", "fwd", x),
    )
    assert bf16[0] > 3 * fp32[0]  # learned: bf16 runs at a tenth of the rate
    assert (
        kernels.predict(
            "relu",
            "fp32",
            "bw",
            features(
                "relu",
                8.0,
                {
                    c: np.ones(1)
                    for c in ("cin", "cout", "k", "stride", "groups", "h", "w", "ho", "wo", "rows")
                },
            ),
        )
        is None
    )  # no weight kernel
    assert kernels.optimizer_s("sgd", 10, 10**5) == pytest.approx(2e-4 + 1e-4, rel=0.2)
    path = kernels.save(tmp_path / "k.json")
    back = KernelModel.load(path)
    nk = cache.latency_plan(MConfig.parse("bs=8")).graph.kernels
    a, b = kernels.node_times(nk, 4, "bf16"), back.node_times(nk, 4, "bf16")
    assert all(np.allclose(u, v, rtol=1e-12) for u, v in zip(a, b))
    ops = nk.kind >= 0
    assert (a[0][ops] > 0).all()
    with pytest.raises(KernelModelError, match="no kernel model"):
        KernelModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KernelModelError, match="unreadable"):
        KernelModel.load(tmp_path / "bad.json")
    with pytest.raises(KernelModelError, match="malformed"):
        KernelModel.from_dict({"regressors": 3, "features_version": FEATURES_VERSION})
    # a model fitted on other features (an older aiop) is refused, not mispredicted
    with pytest.raises(KernelModelError, match="features version 1"):
        KernelModel.from_dict({**kernels.to_dict(), "features_version": 1})


def test_step_constants_fit_and_round_trip(kernels, resnet):
    _, cache = resnet
    specs = [
        f"bs={bs},mb={mb},freeze={f},ckpt={ck},prec={p},opt={o}"
        for bs, mb in ((8, 8), (16, 4), (32, 8))
        for f in (0, 0.5)
        for ck in (0, 2)
        for p in ("fp32", "bf16")
        for o in ("sgd", "adam")
    ]
    configs = [MConfig.parse(s) for s in specs]
    rows = np.stack([kernel_parts(cache.latency_plan(c), c, kernels) for c in configs])
    truth = np.array([1.3, 1.1, 0.9, 1.2, 2.0, 2e-6, 1e-3, 5e-3])
    y = rows @ truth
    model = fit_kernel_latency(rows, y, kernels)
    assert model.fit_median_ape < 1.0
    back = latency_model_from_dict(json.loads(json.dumps(model.to_dict())))
    assert isinstance(back, KernelLatencyModel)
    assert np.allclose(back.predict(rows), model.predict(rows), rtol=1e-12)
    with pytest.raises(LatencyError, match="at least 3"):
        fit_kernel_latency(rows[:2], y[:2], kernels)
    with pytest.raises(LatencyError, match="refit"):
        KernelLatencyModel(kernels, [1.0], terms=["x"])


def test_predictor_uses_the_kernel_model(kernels, resnet, tmp_path):
    from aiop.predictor.api import Predictor, PredictorError, Sample
    from aiop.predictor.model import GNNSpec

    cg, _ = resnet
    specs = ["bs=8", "bs=16,mb=4,freeze=0.5", "bs=8,ckpt=2,method=lite", "bs=8,prec=bf16"]
    samples = [
        Sample(cg, MConfig.parse(s), {"memory": 1e6, "latency": 0.01 * (k + 1)}, "x")
        for k, s in enumerate(specs)
    ]
    pred = Predictor(
        spec=GNNSpec(layers=1, hidden=8), epochs=1, progress=False, kernel_model=kernels
    )
    pred.fit(samples)
    assert isinstance(pred.latency_model, KernelLatencyModel)
    out = pred.predict(cg, specs)
    assert all(r["latency_s_analytic"] > 0 for r in out)
    assert np.allclose(pred.analytic_latency(cg, specs), [r["latency_s_analytic"] for r in out])
    back = Predictor.load(pred.save(tmp_path / "p.safetensors"))
    assert back.predict(cg, specs) == out
    with pytest.raises(PredictorError, match="no kernel model"):
        Predictor(kernel_model=tmp_path / "none.json", epochs=1, progress=False).fit(samples)
    with pytest.raises(PredictorError, match="latency_kind"):
        Predictor(latency_kind="nope")


# -- the microbenchmark ------------------------------------------------------------------------
def test_design_is_generic_deterministic_and_capped():
    a, b = microbench.design(seed=3, scale=0.05), microbench.design(seed=3, scale=0.05)
    assert a == b and len({p.key for p in a}) == len(a)
    kinds = {p.kind for p in a}
    assert set(microbench.KINDS) <= kinds
    assert {p.dtype for p in a} == {"fp32", "bf16"}
    assert all(p.flops() <= microbench._MAX_FLOPS[p.dtype] for p in a)
    assert not any(p.kind == "bn" and p.mb * p.h * p.w < 2 for p in a)


def test_measure_and_resume(tmp_path, monkeypatch):
    tiny = [
        KernelPoint("conv", "fp32", 2, 4, 8, 3, 1, 1, 6, 6),
        KernelPoint("bn", "bf16", 2, 4, 4, h=3, w=3),
        KernelPoint("mul", "fp32", 2, 4, 4, h=3, w=3),
        KernelPoint("opt_adam", "fp32", tensors=3, elems=300),
    ]
    rec = microbench.measure(tiny[0])
    assert set(rec.times) == {"fwd", "bin", "bw"} and all(t > 0 for t in rec.times.values())
    monkeypatch.setattr(microbench, "design", lambda seed, scale: list(tiny))
    out = tmp_path / "kb.jsonl"
    first = list(microbench.collect(out, limit=2, progress=False))
    assert len(first) == 2
    with out.open("a") as f:  # a crash mid-write
        f.write('{"point": {"kind": "co')
    rest = list(microbench.collect(out, progress=False))
    assert [r.point for r in rest] == tiny[2:]
    header, records = microbench.read_records(out)
    assert header["format"] == microbench.FORMAT_VERSION and header["grad_call_s"] > 0
    assert [r.point for r in records] == tiny and records[3].times["step"] > 0
    with pytest.raises(microbench.MicrobenchError, match="seed"):
        list(microbench.collect(out, seed=1, progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"header": {"format": 99}}\n')
    with pytest.raises(microbench.MicrobenchError, match="not an aiop"):
        microbench.read_records(bad)
    assert KIND_LIST[0] == "conv"


def test_memos_do_not_leak_between_kernel_models(kernels, resnet):
    _, cache = resnet
    c = MConfig.parse("bs=16,mb=8")
    d = kernels.to_dict()
    for reg in d["regressors"].values():
        reg["y_mean"] += math.log(2.0)  # every kernel twice as slow
    slower = KernelModel.from_dict(d)
    plan = cache.latency_plan(c)
    a, b = kernel_parts(plan, c, kernels), kernel_parts(plan, c, slower)
    f = K["kernel_fwd_fp32"]
    assert b[f] == pytest.approx(2 * a[f], rel=1e-9)
    assert kernel_parts(plan, c, kernels)[f] == a[f]


def test_ensemble_is_the_mean_of_its_members_in_log_seconds():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 5, size=(80, 3))
    t = 1e-5 * np.exp(0.5 * x[:, 0] + 0.2 * np.cos(x[:, 2]))
    raw = KernelRegressor.inputs(x, True, "bin")
    ens = KernelRegressor.fit(raw, t, hidden=8, steps=150, members=3)
    assert len(ens.weights) == 3 and ens.to_dict()["weights"] != []
    # each member alone (its own seed) is what the batched training made of it
    alone = [KernelRegressor.fit(raw, t, hidden=8, steps=150, seed=s) for s in range(3)]
    mean = np.mean([a.predict_log(raw) for a in alone], axis=0)
    assert np.allclose(ens.predict_log(raw), mean, atol=1e-3)
    parts = [
        KernelRegressor(
            *(ens.to_dict()[k] for k in ("mean", "std", "lo", "hi")), [w], [b], ens.y_mean
        )
        for w, b in zip(ens.weights, ens.biases)
    ]
    assert np.allclose(
        ens.predict_log(raw), np.mean([p.predict_log(raw) for p in parts], axis=0), rtol=1e-12
    )
    with pytest.raises(KernelModelError, match="at least one"):
        KernelRegressor.fit(raw, t, members=0)


def test_prefetch_gives_the_per_micro_batch_times(kernels, resnet):
    _, cache = resnet
    nk = cache.latency_plan(MConfig.parse("bs=16")).graph.kernels
    fresh = KernelModel.from_dict(kernels.to_dict())  # its own memo token
    fresh.prefetch(nk, [2, 5, 16], "bf16")
    for mb in (2, 5, 16):
        got = fresh.node_times(nk, mb, "bf16")
        nk_alone = cache.latency_plan(MConfig.parse("bs=16")).graph.kernels
        ref = KernelModel.from_dict(kernels.to_dict()).node_times(nk_alone, mb, "bf16")
        assert all(np.allclose(a, b, rtol=1e-12) for a, b in zip(got, ref))
    assert {k[1] for k in nk.memo if k[0] == fresh.token} == {2, 5, 16}


def test_conv_features_see_the_algorithm_switches():
    cols = {
        c: np.array([v, v])
        for c, v in (("cin", 512), ("cout", 512), ("k", 1), ("stride", 1), ("groups", 1))
    }
    cols.update({c: np.array([2.0, 2.0]) for c in ("h", "w", "ho", "wo")})
    cols["rows"] = np.ones(2)
    x = features("conv", np.array([8.0, 16.0]), cols)
    assert x.shape[1] == 15
    assert x[0, -1] == 0.0 and x[1, -1] == 1.0  # micro-batch ≥ 16 flag
    assert x[0, 11] == 1.0  # 1×1 flag
    odd = features("conv", 8.0, {**cols, "cin": np.array([13.0, 13.0])})
    assert odd[0, 12] == pytest.approx(16 / 13)  # the 8-block padding fraction


def test_default_kernel_model_is_package_data():
    from aiop.predictor.kernels import DEFAULT_KERNEL_MODEL

    assert DEFAULT_KERNEL_MODEL.parent.name == "data"
    assert DEFAULT_KERNEL_MODEL.parent.parent.name == "aiop"
    model = KernelModel.load()  # the shipped one loads with this aiop's features
    assert {"conv", "dwconv", "gconv", "bn"} <= set(model.regressors)
    assert len(model.regressors["conv"].weights) == 3  # an ensemble of 3 networks


def test_design_extensions_keep_the_measured_points(monkeypatch):
    # a file measured on the first design resumes by measuring only the extra points
    full = microbench.design(seed=3, scale=0.05)
    extra = microbench._extra_fp32(3, 0.05)
    monkeypatch.setattr(microbench, "_extra_fp32", lambda seed, scale: [])
    first = microbench.design(seed=3, scale=0.05)
    assert full == first + extra and extra
    assert {p.kind for p in extra} == {"conv", "dwconv", "gconv", "bn"}
    low_res = [p for p in extra if p.dtype == "bf16"]
    assert low_res and all(p.kind == "conv" and p.h <= 8 and p.k in (1, 3) for p in low_res)
