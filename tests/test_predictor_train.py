"""Predictor training: metrics, family splits, K-adapters, run_gpi_acc_predictor.py end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_helpers import load_script

from aiop.cache import Store
from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.adapters import K_ADAPT_MODES, KAdapterPredictor, base_states
from aiop.predictor.analytic import estimate_memory
from aiop.predictor.api import Predictor, Sample
from aiop.predictor.metrics import mean_std, regression_metrics
from aiop.predictor.model import GNNSpec
from aiop.predictor.train import (
    ACC_MODE,
    AccModeError,
    AnalyticPredictor,
    SplitError,
    acc_tag,
    acc_tags,
    evaluate,
    families_of,
    finetune,
    format_acc_mode,
    leave_one_family_out,
    load_samples,
    parse_acc_mode,
    parse_family_test,
    split_by_family,
)
from aiop.tasks.recipes import DEFAULT_RECIPE, label_tags

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["bs=8", "bs=16,mb=4", "bs=8,freeze=0.5", "bs=16,opt=adam", "bs=8,method=last"]
# Known factors between "measured" and analytic memory, per family: what the GNN must learn.
FACTOR = {"cnn": 1.10, "res": 1.25}
TINY_SPEC = {"conv": "graphconv", "layers": 2, "hidden": 8, "head_hidden": 8}


def _load_script():
    return load_script("scripts/run_gpi_acc_predictor.py", "run_gpi_acc_predictor")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """Three SmallCNN and three TinyResNet graphs (widths 8/12/16), memory = analytic × factor."""
    path = tmp_path_factory.mktemp("store") / "tiny.db"
    with Store(path) as store:
        for family, cls in (("cnn", SmallCNN), ("res", TinyResNet)):
            for width in (8, 12, 16):
                model = cls(width=width)
                cg = from_torch(model, (1, *model.input_size), name=f"{family}{width}")
                fp = store.put_graph(cg, meta={"family": family, "model": f"{family}{width}"})
                store.put_labels(fp, "", [("flops", float(cg.total_flops), {})])
                for spec in SPECS:
                    peak = estimate_memory(cg, spec).peak_memory_bytes * FACTOR[family]
                    store.put_record(
                        fp,
                        MConfig.parse(spec).format(),
                        {"peak_memory_bytes": peak},
                        device="meta",
                        mode="meta",
                    )
                store.put_task("cls", metric="acc")
                store.put_label(fp, "", "acc", 0.5 + width / 100, task="cls")
    return path


@pytest.fixture(scope="module")
def samples(store_path) -> list[Sample]:
    return load_samples(store_path, ["memory", "flops", "acc"])


@pytest.fixture(scope="module")
def base(samples) -> Predictor:
    pred = Predictor(
        spec=GNNSpec(**TINY_SPEC), targets=["memory"], epochs=3, batch_size=16, progress=False
    )
    pred.fit([s for s in samples if s.family == "cnn"])
    return pred


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_by_hand():
    m = regression_metrics([100, 200, 400, 800], [110, 190, 400, 1000])
    # APEs: 10 %, 5 %, 0 %, 25 %
    assert m["n"] == 4
    assert m["mae"] == pytest.approx((10 + 10 + 0 + 200) / 4)
    assert m["mse"] == pytest.approx((100 + 100 + 0 + 40000) / 4)
    assert m["mape"] == pytest.approx(10.0)
    assert m["median_ape"] == pytest.approx(7.5)
    assert m["p95_ape"] == pytest.approx(10 + 0.85 * 15)  # numpy's linear quantile
    assert m["srcc"] == pytest.approx(1.0) and m["kendall"] == pytest.approx(1.0)
    assert m["within_5"] == pytest.approx(0.5) and m["within_10"] == pytest.approx(0.75)


def test_rank_metrics_by_hand():
    m = regression_metrics([1, 2, 3], [3, 1, 2])
    # ranks (1,2,3) vs (3,1,2): d² = 4+1+1 → ρ = 1 − 6·6/(3·8) = −0.5; τ: 1 concordant, 2 discordant
    assert m["srcc"] == pytest.approx(-0.5)
    assert m["kendall"] == pytest.approx(-1 / 3)
    assert math.isnan(regression_metrics([1, 1], [1, 2])["srcc"])


def test_mean_std_over_seeds():
    out = mean_std([{"mape": 1.0, "srcc": 0.5}, {"mape": 3.0, "srcc": math.nan}])
    assert out["mape"]["mean"] == 2.0 and out["mape"]["std"] == 1.0
    assert out["srcc"]["mean"] == 0.5 and out["mape"]["values"] == [1.0, 3.0]


# -- loading and splits -------------------------------------------------------------------------
def test_load_samples(samples):
    assert len(samples) == 6 * len(SPECS)
    assert families_of(samples) == {"cnn": 3, "res": 3}
    s = samples[0]
    assert {"memory", "flops", "acc:cls"} <= set(s.labels)
    assert s.labels["flops"] == s.cg.total_flops


def test_parse_family_test():
    assert parse_family_test("cnn#2+res") == [("cnn", 2), ("res", 0)]
    for bad in ["", "cnn#", "#3", "cnn#x", "cnn++res", "cnn#1+cnn#2"]:
        with pytest.raises(SplitError):
            parse_family_test(bad)


def test_split_deterministic_and_disjoint(samples):
    a = split_by_family(samples, "res#1")
    b = split_by_family(list(reversed(samples)), "res#1")
    assert a.finetune_graphs == b.finetune_graphs  # independent of order and training seed
    fps = {k: {s.cg.meta["fp"] for s in v} for k, v in (("ft", a.finetune["res"]),)}
    test_fps = {s.cg.meta["fp"] for s in a.test["res"]}
    train_fps = {s.cg.meta["fp"] for s in a.train}
    assert len(fps["ft"]) == 1 and len(test_fps) == 2
    assert not (fps["ft"] & test_fps) and not (train_fps & (fps["ft"] | test_fps))
    assert {s.family for s in a.train} == {"cnn"}
    assert len(a.train) + len(a.finetune["res"]) + len(a.test["res"]) == len(samples)
    with pytest.raises(SplitError, match="unknown family"):
        split_by_family(samples, "nope#1")
    with pytest.raises(SplitError, match="nothing to test"):
        split_by_family(samples, "res#3")
    with pytest.raises(SplitError, match="both trained on and held out"):
        split_by_family(samples, "res", train_families=["res", "cnn"])
    folds = dict(leave_one_family_out(samples))
    assert set(folds) == {"cnn", "res"} and not folds["cnn"].finetune["cnn"]
    # one family alone: its own pool and test set, if asked for; the same pool as with others
    res = [s for s in samples if s.family == "res"]
    with pytest.raises(SplitError, match="no family is left"):
        split_by_family(res, "res#1")
    alone = split_by_family(res, "res#1", require_train=False)
    assert not alone.train and alone.finetune_graphs == a.finetune_graphs


# -- predictors ----------------------------------------------------------------------------------
def test_analytic_ablation_and_evaluate(samples):
    res = [s for s in samples if s.family == "res"]
    m = evaluate(AnalyticPredictor(), res, ["memory"])["memory"]
    assert m["median_ape"] == pytest.approx((1 - 1 / 1.25) * 100, rel=1e-3)
    assert m["srcc"] == pytest.approx(1.0)


def test_finetune_copies(base, samples):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    tuned = finetune(base, [s for s in samples if s.family == "res"][:5], epochs=1)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.model.state_dict().items())


def test_base_states_match_encoder(base, samples):
    from torch_geometric.data import Batch

    graphs, *_ = base._rows(samples[:3])
    batch = Batch.from_data_list(graphs)
    states, emb = base_states(base.model.encoder, batch)
    assert len(states) == TINY_SPEC["layers"]
    assert torch.allclose(emb, base.model.encoder(batch))


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def test_kadapter_freezes_base_and_predicts(base, samples, tmp_path):
    base_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    kp = KAdapterPredictor(base, ["cnn", "res"], k_epochs=2, batch_size=16, progress=False)
    kp.fit(samples)
    # the base predictor and the base inside the adapter model are unchanged
    assert all(torch.equal(base_before[k], v) for k, v in base.model.state_dict().items())
    inner = kp.model.base.state_dict()
    assert all(torch.equal(base_before[k], inner[k]) for k in base_before)
    assert len(kp.model.adapters) == 2
    # layer i of an adapter mixes concat[adapter_{i-1}, base_i]: 2 × hidden wide
    assert kp.model.adapters[0].mix[0].in_features == 2 * TINY_SPEC["hidden"]
    assert kp.targets[0] == "memory" and "acc:cls" in kp.targets
    cg = samples[0].cg
    out = kp.predict(cg, ["bs=8", "bs=32"])
    assert len(out) == 2 and out[1]["peak_memory_bytes"] > out[0]["peak_memory_bytes"]
    assert "cls" in out[0]["accuracy"]
    path = kp.save(tmp_path / "k.safetensors")
    again = KAdapterPredictor.load(path)
    again._featurizer = kp._featurizer
    assert again.predict(cg, ["bs=8"])[0]["peak_memory_bytes"] == out[0]["peak_memory_bytes"]


@pytest.mark.parametrize("k_adapt", sorted(K_ADAPT_MODES))
def test_k_adapt_modes_train_the_right_parameters(base, samples, k_adapt):
    kp = KAdapterPredictor(base, ["cnn"], k_epochs=1, batch_size=16, progress=False)
    kp.fit([s for s in samples if s.family == "cnn"])
    groups = kp.model.parameter_groups()
    before = {g: _snapshot(ps) for g, ps in groups.items()}
    kp.finetune([s for s in samples if s.family == "res"][:6], k_adapt=k_adapt, epochs=2)
    for g, ps in groups.items():
        assert _changed(before[g], ps) == (g in K_ADAPT_MODES[k_adapt]), (k_adapt, g)
    assert all(p.requires_grad for p in kp.model.parameters())  # flags restored


# -- the script ------------------------------------------------------------------------------
def test_script_end_to_end(store_path, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    rc = script.main(
        [
            "-cache_file", str(store_path), "-family_test", "res#1", "-targets", "memory", "acc",
            "-epochs", "2", "-num_seeds", "2", "-fine_tune_epochs", "1", "-k_adapt", "3",
            "-k_epochs", "1", "-family_k", "cnn", "-output_dir", str(out), "-model_name", "t",
            "-q", "-gnn", "aiop", "-save_predictor",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "t.json").read_text())
    res = result["results"]["res"]
    assert set(res) == {"noft", "ft", "kadapt_noft", "kadapt_ft"}
    mem = res["noft"]["memory"]
    assert len(mem["srcc"]["values"]) == 2 and np.isfinite(mem["mape"]["mean"])
    assert result["split"]["res"]["finetune_architectures"] == 1
    assert (out / "t_res_memory.png").stat().st_size > 1000
    assert (out / "t_res_acc-cls.png").is_file()
    saved = Predictor.load(out / "t_seed0.safetensors")
    assert saved.targets == ["memory", "acc:cls"] and saved.spec.conv == "graphconv"
    # the label set each accuracy target learnt from: cls is no aiop.tasks task, so untagged
    assert result["acc_tags"] == {"cls": ""}
    assert result["args"]["acc_mode"] == format_acc_mode(ACC_MODE)


def test_benchmark_on_tiny_store(store_path, tmp_path):
    bench = load_script("benchmarks/predictor_accuracy.py", "predictor_accuracy")
    out = tmp_path / "acc"
    argv = ["-store", str(store_path), "-families", "cnn", "res", "-epochs", "1", "-q"]
    assert bench.main([*argv, "-targets", "memory", "-out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    mem = result["results"]["memory"]
    assert set(mem) == {"default", "aiop", "analytic"} and set(mem["analytic"]) == {
        "cnn", "res", "all"
    }  # fmt: skip
    # the analytic model misses the known factors exactly
    assert mem["analytic"]["res"]["median_ape"]["mean"] == pytest.approx(20.0, rel=1e-3)
    assert "| res | analytic |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-family_test", "nope#2"], "unknown family"),
        (["-family_test", "res#x"], "malformed"),
        (["-family_test", "res#3"], "nothing to test"),
        (["-family_test", "res", "-k_adapt", "9"], "invalid choice"),
        (["-family_test", "res", "-k_adapt", "1"], "-family_k"),
        (["-family_test", "res", "-targets", "speed"], "unknown target"),
        (["-family_test", "res", "-epochs", "0"], "-epochs"),
        (["-family_test", "res", "--bogus"], "unrecognized"),
        (["-family_test", "res", "-acc_mode", "pose=a", "pose=b"], "names task 'pose' twice"),
        (["-family_test", "res", "-acc_mode", "a", "b"], "more than one tag"),
        (["-family_test", "res", "-acc_mode", "pose="], "malformed -acc_mode"),
    ],
)
def test_script_bad_flags_exit_2(store_path, tmp_path, capsys, flags, message):
    script = _load_script()
    with pytest.raises(SystemExit) as exc:
        sys.exit(
            script.main(["-cache_file", str(store_path), "-output_dir", str(tmp_path), *flags])
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_script_missing_store(tmp_path, capsys):
    script = _load_script()
    rc = script.main(["-cache_file", str(tmp_path / "none.db"), "-family_test", "res"])
    assert rc == 2 and "no such store" in capsys.readouterr().err


def test_accuracy_labels_come_from_one_label_set(tmp_path):
    """Pseudo-labels and other recipes' sets never mix into the ground truth; each task reads
    its own set (by default its set under the current label recipe)."""
    path = tmp_path / "acc.db"
    model = SmallCNN(width=8)
    cg = from_torch(model, (1, *model.input_size), name="cnn8")
    with Store(path) as store:
        fp = store.put_graph(cg, meta={"family": "cnn"})
        for task in ("classification", "pose", "cls"):
            store.put_task(task, metric="acc")
        store.put_label(fp, "", "acc", 0.40, task="classification")  # untagged (imported)
        store.put_label(fp, "", "acc", 0.55, task="classification", mode="individual-v2")
        store.put_label(fp, "", "acc", 0.90, task="classification", mode="shared-v2-ft1")
        store.put_label(fp, "", "acc", 0.20, task="pose", mode="individual-v2")
        store.put_label(fp, "", "acc", 0.30, task="pose", mode="individual-v3")
        store.put_label(fp, "", "acc", 0.65, task="classification", mode="individual-v4")
        store.put_label(fp, "", "acc", 0.35, task="pose", mode="individual-v4")
        store.put_label(fp, "", "acc", 0.70, task="classification", mode="individual-v6")
        store.put_label(fp, "", "acc", 0.10, task="cls")  # a task aiop.tasks does not train
        store.put_label(fp, "", "acc", 0.15, task="cls", mode="individual-v2")

    def acc(mode=ACC_MODE):
        (sample,) = load_samples(path, ["acc"], acc_mode=mode)
        return {k.split(":", 1)[1]: v for k, v in sample.labels.items()}

    # the default: each task's set under the current recipe; unknown tasks: untagged labels
    want = {t: ACC_MODE[t] for t in ("classification", "pose")}
    assert want == label_tags(DEFAULT_RECIPE, ["classification", "pose"])
    by_tag = {"individual-v2": {"classification": 0.55, "pose": 0.20},
              "individual-v3": {"classification": 0.40, "pose": 0.30},
              "individual-v4": {"classification": 0.65, "pose": 0.35},
              "individual-v6": {"classification": 0.70}}  # fmt: skip
    got = acc()
    assert got["cls"] == 0.10
    for task, tag in want.items():
        assert got[task] == by_tag[tag][task], (task, tag)
    assert acc(dict(ACC_MODE)) == got  # a plain dict works as well
    # recipe v3: classification as v2 (the committed results' set), pose its own
    v3 = label_tags("v3", ["classification", "pose"])
    assert acc(v3) == {"classification": 0.55, "pose": 0.30, "cls": 0.10}
    # a plain string: that tag for every task (the old behaviour)
    assert acc("individual-v2") == {"classification": 0.55, "pose": 0.20, "cls": 0.15}
    assert acc("shared-v2-ft1")["classification"] == 0.90
    assert acc("other") == {"classification": 0.40, "cls": 0.10}  # untagged only; no pose
    # a mapping overrides the default for its tasks ("*": for every other task too)
    assert acc({"pose": "individual-v2"}) == {**got, "pose": 0.20}
    assert acc({"classification": "x"}) == {**got, "classification": 0.40}  # untagged only
    assert acc({"*": "individual-v2", "pose": "individual-v3"}) == {
        "classification": 0.55, "pose": 0.30, "cls": 0.15
    }  # fmt: skip
    every = acc(None)
    assert acc("any") == every and acc({"*": "any"}) == every
    assert every["classification"] in (0.40, 0.55, 0.65, 0.70, 0.90)


def test_replicate_sets_are_averaged(tmp_path):
    """``A+B`` is the mean of two seed replicates of one recipe, over the architectures both
    labelled; sets of different recipes are refused, naming them."""
    path = tmp_path / "rep.db"
    fps = []
    with Store(path) as store:
        store.put_task("classification", metric="acc")
        for width in (4, 8, 12):
            model = SmallCNN(width=width)
            cg = from_torch(model, (1, *model.input_size), name=f"cnn{width}")
            fps.append(store.put_graph(cg, meta={"family": "cnn"}))
        recipe = {"recipe": "r1"}
        for fp, a, b in zip(fps, (0.50, 0.60, 0.70), (0.54, 0.58, None), strict=True):
            store.put_label(fp, "", "acc", a, task="classification", mode="s0", extra=recipe)
            store.put_label(fp, "", "top5", a + 0.2, task="classification", mode="s0")
            if b is not None:
                store.put_label(fp, "", "acc", b, task="classification", mode="s1", extra=recipe)
        store.put_label(
            fps[0], "", "acc", 0.9, task="classification", mode="v", extra={"recipe": "r2"}
        )

    def acc(mode):
        got = load_samples(path, ["acc:classification"], acc_mode=parse_acc_mode(mode))
        return sorted(round(s.labels["acc:classification"], 6) for s in got)

    assert acc("classification=s0") == [0.5, 0.6, 0.7]
    assert acc("classification=s0+s1") == [0.52, 0.59]  # cnn12 has no s1 label: left out
    assert acc("classification=s1+s0") == [0.52, 0.59]
    with pytest.raises(AccModeError, match=r"different recipes.*s0 \(r1\).*v \(r2\)"):
        load_samples(path, ["acc:classification"], acc_mode=parse_acc_mode("classification=s0+v"))
    for bad in ("classification=s0+", "classification=s0+s0", "s0+any", "classification=+s1"):
        with pytest.raises(AccModeError, match="distinct tags"):
            parse_acc_mode(bad)


def test_parse_acc_mode():
    assert parse_acc_mode("any") is None and parse_acc_mode(["any"]) is None
    assert parse_acc_mode(["individual-v2"]) == "individual-v2"
    # pairs replace those tasks' defaults only
    assert parse_acc_mode(["pose=individual-v2"]) == {"pose": "individual-v2"}
    both = parse_acc_mode(["classification=a,pose=b"])
    assert both == parse_acc_mode(["classification=a", "pose=b"])
    assert both == {"classification": "a", "pose": "b"}
    default_detection = ACC_MODE["detection"]
    assert acc_tags(both, ["pose", "detection"]) == {"pose": "b", "detection": default_detection}
    # a bare tag among pairs: every other task's set
    mixed = parse_acc_mode(["individual", "pose=individual-v3"])
    assert mixed == {"*": "individual", "pose": "individual-v3"}
    assert acc_tags(mixed, ["pose", "detection"]) == {
        "pose": "individual-v3", "detection": "individual"
    }  # fmt: skip
    assert acc_tags({"pose": "any"}, ["pose", "x"]) == {"pose": "any", "x": ""}
    for mode in (None, "t", mixed, dict(ACC_MODE), {"pose": "any"}):
        assert parse_acc_mode(format_acc_mode(mode)) == mode
    for bad, message in [
        ([""], "empty"),
        ([" , "], "empty"),
        (["a", "b"], "more than one tag"),
        (["any", "pose=x"], None),  # "any" among pairs: every set of the other tasks
        (["=x"], "malformed"),
        (["pose="], "malformed"),
        (["pose=a=b"], "malformed"),
        (["pose=a", "pose=b"], "twice"),
        (["pose=a b"], "bad task or tag"),
        (["bad/tag"], "bad task or tag"),
    ]:
        if message is None:
            assert acc_tag(parse_acc_mode(bad), "detection") is None
            continue
        with pytest.raises(AccModeError, match=message):
            parse_acc_mode(bad)


def test_train_predictor_bad_acc_mode_exit_2(store_path):
    """A real process: exit status 2, one line on stderr, no traceback."""
    script = ROOT / "scripts" / "train_predictor.py"
    argv = ["-store", str(store_path), "-output", "/nonexistent/p.safetensors"]
    out = subprocess.run(
        [sys.executable, str(script), *argv, "-acc_mode", "pose=a", "pose=b"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "names task 'pose' twice" in lines[0]
