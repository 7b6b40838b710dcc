"""Accuracy ranking within a family: per-family target levels, re-levelling, fine-tune modes,
the ranking loss, epoch selection without the test set, and the script's flags."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from script_helpers import load_script

from aiop.cache import Store
from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.api import Predictor, Sample
from aiop.predictor.model import GNNSpec
from aiop.predictor.train import (
    clone_predictor,
    collect_predictions,
    family_stats,
    finetune,
    fit_predictor,
    load_samples,
    pairwise_rank_loss,
    relevel_acc,
    split_by_family,
    standardize_families,
)

ROOT = Path(__file__).resolve().parents[1]
T = "acc:cls"
TINY_SPEC = {"conv": "graphconv", "layers": 2, "hidden": 8, "head_hidden": 8}
WIDTHS = (8, 12, 16, 20, 24, 28)


def _label(family: str, width: int) -> float:
    # two families at different levels and spreads, accuracy rising with width in both
    return 0.5 + width / 100 if family == "cnn" else 0.85 + width / 2000


@pytest.fixture(scope="module")
def graphs() -> dict[tuple[str, int], object]:
    out = {}
    for family, cls in (("cnn", SmallCNN), ("res", TinyResNet)):
        for w in WIDTHS:
            model = cls(width=w)
            cg = from_torch(model, (1, *model.input_size), name=f"{family}{w}")
            cg.meta["fp"] = cg.fingerprint
            out[(family, w)] = cg
    return out


@pytest.fixture(scope="module")
def samples(graphs) -> list[Sample]:
    return [Sample(cg, MConfig(), {T: _label(f, w)}, f) for (f, w), cg in graphs.items()]


def _pred(**kw) -> Predictor:
    return Predictor(
        spec=GNNSpec(**TINY_SPEC),
        targets=[T],
        epochs=kw.pop("epochs", 8),
        batch_size=4,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def base(samples) -> Predictor:
    pred = _pred()
    fit_predictor(pred, [s for s in samples if s.family == "cnn"], "family")
    return pred


def _preds(pred, samples) -> np.ndarray:
    return np.asarray(collect_predictions(pred, samples, [T])[T].y_pred)


# -- per-family levels -------------------------------------------------------------------------
def test_standardize_families_gives_z_scores_per_family(samples):
    z, stats = standardize_families(samples, [T])
    assert set(stats[T]) == {"cnn", "res"}
    for fam in ("cnn", "res"):
        values = np.asarray([s.labels[T] for s in z if s.family == fam])
        assert values.mean() == pytest.approx(0.0, abs=1e-9)
        assert values.std() == pytest.approx(1.0)
        raw = [_label(fam, w) for w in WIDTHS]
        assert stats[T][fam].mean == pytest.approx(np.mean(raw))
    # the originals are untouched, the graphs shared
    assert samples[0].labels[T] == _label("cnn", 8) and z[0].cg is samples[0].cg


def test_family_stats_count_each_architecture_once(samples):
    # the same architecture at several configurations must not weigh more
    doubled = samples + [Sample(s.cg, MConfig.parse("bs=4"), s.labels, s.family) for s in samples]
    assert family_stats(doubled, [T]) == family_stats(samples, [T])


def test_family_norm_is_the_z_score_fit_composed_with_the_average_level(samples):
    both = [s for s in samples if s.family in ("cnn", "res")]
    fam = _pred(seed=3)
    fit_predictor(fam, both, "family")
    plain = _pred(seed=3)
    z, stats = standardize_families(both, [T])
    plain.fit(z)
    mean = np.mean([st.mean for st in stats[T].values()])
    std = np.mean([st.std for st in stats[T].values()])
    np.testing.assert_allclose(_preds(fam, both), _preds(plain, both) * std + mean, rtol=1e-6)
    assert fam.meta["acc_norm"]["reference"][T]["std"] == pytest.approx(std)


def test_fit_with_rank_loss_learns_the_order_within_families(samples):
    pred = _pred(seed=1, epochs=60)
    pred.lr = 3e-3
    report = fit_predictor(pred, samples, "family", rank_weight=2.0)
    assert len(report.train_loss) == 60 and report.train_loss[-1] < report.train_loss[0]
    for fam in ("cnn", "res"):
        ss = [s for s in samples if s.family == fam]
        assert spearmanr([s.labels[T] for s in ss], _preds(pred, ss))[0] >= 0.8, fam
    assert "acc_norm" in pred.meta


def test_family_norm_needs_stand(samples):
    pred = _pred(tar_norm="stand_flops")
    with pytest.raises(ValueError, match="tar_norm 'stand'"):
        fit_predictor(pred, samples, "family")
    with pytest.raises(ValueError, match="unknown acc_norm"):
        fit_predictor(_pred(), samples, "per-task")


def test_relevel_keeps_ranking_and_matches_the_family_level(base, samples):
    res = [s for s in samples if s.family == "res"]
    before = _preds(base, res)
    new = clone_predictor(base)
    stats = relevel_acc(new, res)
    after = _preds(new, res)
    assert spearmanr(before, after)[0] == pytest.approx(1.0)
    assert after.mean() == pytest.approx(np.mean([s.labels[T] for s in res]), rel=1e-6)
    # the output spread follows the new family's spread relative to the training families'
    ref = base.meta["acc_norm"]["reference"][T]["std"]
    assert after.std() == pytest.approx(before.std() * stats[T].std / ref, rel=1e-4)
    assert _preds(base, res) == pytest.approx(before)  # the base is not modified


def test_relevel_fit_is_least_squares_and_may_reverse_the_ranking(base, samples):
    res = [s for s in samples if s.family == "res"]
    before = _preds(base, res)
    # labels that fall exactly linearly as the base's outputs rise: the fit recovers them
    flipped = [
        Sample(s.cg, s.config, {T: 0.9 - 0.01 * float(p)}, s.family) for s, p in zip(res, before)
    ]
    new = clone_predictor(base)
    relevel_acc(new, flipped, "fit")
    after = _preds(new, flipped)
    np.testing.assert_allclose(after, [s.labels[T] for s in flipped], atol=1e-6)
    assert spearmanr(before, after)[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="relevel mode"):
        relevel_acc(new, flipped, "median")


# -- fine-tuning ---------------------------------------------------------------------------------
def test_default_finetune_is_aiops(base, samples):
    res = [s for s in samples if s.family == "res"][:4]
    tuned = finetune(base, res, 3)
    manual = clone_predictor(base)
    manual.epochs, manual.batch_size, manual.lr = 3, 8, base.lr / 10
    manual.fit(res, finetune=True)
    for k, v in tuned.model.state_dict().items():
        assert torch.equal(v, manual.model.state_dict()[k]), k


@pytest.mark.parametrize("params", ["all", "heads", "last"])
def test_finetune_params_update_only_their_group(base, samples, params):
    res = [s for s in samples if s.family == "res"]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    tuned = finetune(base, res, 2, params=params, lr=1e-2, rank_weight=0.5)
    last = f"heads.{T}.4."  # the heads' last Linear
    for k, v in tuned.model.state_dict().items():
        changed = not torch.equal(before[k], v)
        should = {
            "all": True,
            "heads": k.startswith("heads."),
            "last": k.startswith(last),
        }[params]
        if should:
            assert changed or "norms" in k or "bias" in k, k  # some grads may be exactly zero
        else:
            assert not changed, k
    assert all(p.requires_grad for p in tuned.model.parameters())  # flags restored
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert tuned.meta["finetune"][-1]["params"] == params


def test_pairwise_rank_loss_by_hand():
    y = torch.tensor([1.0, 2.0, 3.0])
    perfect = torch.tensor([0.0, 10.0, 20.0])
    reversed_ = -perfect
    assert pairwise_rank_loss(perfect, y) < 1e-3
    # 3 pairs, each margin -10 or -20: softplus(10), softplus(20), softplus(10)
    expected = (2 * np.log1p(np.exp(10.0)) + np.log1p(np.exp(20.0))) / 3
    assert float(pairwise_rank_loss(reversed_, y)) == pytest.approx(expected, rel=1e-5)
    assert pairwise_rank_loss(perfect, torch.tensor([1.0, 1.0, 1.0])) is None
    # pairs only within a group: a cross-group inversion costs nothing
    groups = torch.tensor([0, 0, 1])
    pred = torch.tensor([0.0, 10.0, -50.0])
    assert float(pairwise_rank_loss(pred, y, groups)) < 1e-3


def test_rank_loss_improves_the_ranking_it_trains_on(base, samples):
    res = [s for s in samples if s.family == "res"]
    kw = {"lr": 3e-3, "batch_size": 6, "params": "all", "relevel": True}
    ranked = finetune(base, res, 40, rank_weight=5.0, **kw)
    truth = [s.labels[T] for s in res]
    assert spearmanr(truth, _preds(ranked, res))[0] >= 0.9


def test_select_folds_chooses_epochs_without_test_data(base, samples):
    res = [s for s in samples if s.family == "res"]
    tuned = finetune(base, res, 4, lr=1e-2, relevel=True, select_folds=2)
    sel = tuned.meta["finetune_selection"][-1]
    assert 0 <= sel["chosen"] <= 4 and len(sel["oof_srcc"]) == 5
    assert tuned.meta["finetune"][-1]["epochs"] == sel["chosen"]
    if sel["chosen"] == 0:  # re-levelled zero-shot: the same ranking as the base
        assert spearmanr(_preds(base, res), _preds(tuned, res))[0] == pytest.approx(1.0)


def test_finetune_rejects_unknown_params(base, samples):
    with pytest.raises(ValueError, match="fine-tune params"):
        finetune(base, samples[:2], 1, params="encoder")


# -- the script ----------------------------------------------------------------------------------
def _load_script():
    return load_script("scripts/run_gpi_acc_predictor.py", "run_gpi_acc_predictor_rank")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, graphs) -> Path:
    path = tmp_path_factory.mktemp("store") / "acc.db"
    with Store(path) as store:
        store.put_task("cls", metric="acc")
        for (family, w), cg in graphs.items():
            arch = {"family": family, "width": w, "stages": [w] * (w // 8)}
            fp = store.put_graph(cg, meta={"family": family, "model": f"{family}{w}", "arch": arch})
            store.put_label(fp, "", "acc", _label(family, w), task="cls")
    return path


def test_script_with_ranking_flags(store_path, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    rc = script.main(
        [
            "-cache_file", str(store_path), "-family_test", "res#4", "-targets", "acc",
            "-epochs", "3", "-num_seeds", "1", "-fine_tune_epochs", "2", "-gnn", "aiop",
            "-acc_norm", "family", "-acc_rank_weight", "1", "-fine_tune_relevel",
            "-fine_tune_params", "heads",
            "-fine_tune_lr", "0.003", "-fine_tune_rank_weight", "1", "-fine_tune_select_folds",
            "2", "-output_dir", str(out), "-model_name", "r", "-q",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "r.json").read_text())
    assert result["args"]["acc_norm"] == "family" and result["args"]["fine_tune_relevel"]
    assert set(result["results"]["res"]) == {"noft", "ft"}
    assert result["split"]["res"]["test_architectures"] == 2
    (sel,) = result["finetune_selection"]["res"]
    assert sel["seed"] == 0 and 0 <= sel["chosen"] <= 2 and len(sel["oof_srcc"]) == 3


def test_script_relevel_only_keeps_the_zero_shot_ranking(store_path, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    rc = script.main(
        [
            "-cache_file", str(store_path), "-family_test", "res#3", "-targets", "acc",
            "-epochs", "3", "-num_seeds", "1", "-gnn", "aiop", "-fine_tune_relevel",
            "-output_dir", str(out), "-model_name", "z", "-q",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "z.json").read_text())["results"]["res"]
    t = "acc:cls"
    assert res["ft"][t]["srcc"]["mean"] == pytest.approx(res["noft"][t]["srcc"]["mean"])
    # re-levelled to the fine-tune architectures: far closer than the training family's level
    assert res["ft"][t]["mape"]["mean"] < res["noft"][t]["mape"]["mean"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-fine_tune_select_folds", "1"], "-fine_tune_select_folds"),
        (["-acc_norm", "family", "-tar_norm", "stand_flops"], "-acc_norm family"),
        (["-fine_tune_lr", "0"], "-fine_tune_lr"),
        (["-fine_tune_rank_weight", "-1"], "-fine_tune_rank_weight"),
        (["-acc_rank_weight", "nan"], "-acc_rank_weight"),
        (["-fine_tune_joint", "-fine_tune_epochs", "2"], "-fine_tune_joint"),
        (["-fine_tune_joint", "-fine_tune_relevel"], "-fine_tune_joint"),
        (["-pos_enc", "17"], "pos_enc must be between 0 and 16"),
        (["-acc_head", "forest", "-k_adapt", "1", "-family_k", "cnn"], "-acc_head forest"),
        (["-acc_head", "forest", "-forest_trees", "0"], "-forest_trees"),
        (["-acc_head", "forest", "-acc_share", "lots"], "acc_share must be a number"),
        (["-acc_share", "0.5"], "add -acc_head forest, ridge or auto"),
        (["-acc_head", "ridge", "-k_adapt", "1", "-family_k", "cnn"], "-acc_head ridge"),
    ],
)
def test_script_bad_ranking_flags(store_path, tmp_path, capsys, flags, message):
    script = _load_script()
    base = ["-cache_file", str(store_path), "-family_test", "res#4", "-targets", "acc"]
    rc = script.main([*base, "-output_dir", str(tmp_path), "-q", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def _run_joint(script, store_path, out, name, *flags):
    return script.main(
        [
            "-cache_file", str(store_path), "-family_test", "res#3", "-targets", "acc",
            "-epochs", "30", "-num_seeds", "1", "-gnn", "aiop", "-output_dir", str(out),
            "-model_name", name, "-q", *flags,
        ]
    )  # fmt: skip


def test_script_joint_trains_on_the_finetune_architectures(store_path, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    assert _run_joint(script, store_path, out, "j", "-fine_tune_joint") == 0
    assert _run_joint(script, store_path, out, "z") == 0, capsys.readouterr().err
    joint = json.loads((out / "j.json").read_text())
    zero = json.loads((out / "z.json").read_text())["results"]["res"]["noft"]["acc:cls"]
    assert set(joint["results"]["res"]) == {"joint"}
    assert joint["split"]["res"]["test_architectures"] == len(WIDTHS) - 3
    # the same held-out architectures, but the network has seen the family's level
    assert joint["results"]["res"]["joint"]["acc:cls"]["mape"]["mean"] < zero["mape"]["mean"]


def test_script_forest_head_joint(store_path, tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    # extremely randomised trees: every tree sees all 3 labelled "res" rows (a random forest's
    # bootstrap often draws one or two, and its leaves of >= 3 then mix in the other family)
    flags = ("-fine_tune_joint", "-acc_head", "forest", "-forest_kind", "extra")
    flags += ("-forest_trees", "20", "-save_predictor")
    assert _run_joint(script, store_path, out, "f", *flags) == 0, capsys.readouterr().err
    result = json.loads((out / "f.json").read_text())
    assert result["args"]["acc_head"] == "forest"
    metrics = result["results"]["res"]["joint"]["acc:cls"]
    # the held-out architectures of "res" sit at the level of the 3 the forest has seen
    assert metrics["mape"]["mean"] < 2.0
    saved = Predictor.load(out / "f_seed0.safetensors")
    assert saved.acc_head == "forest" and set(saved.acc_readouts) == {T}
    assert result["acc_heads"][0]["targets"][T]["kind"] == "forest"


@pytest.mark.parametrize("head", ["ridge", "auto"])
def test_script_ridge_and_auto_heads_joint(store_path, tmp_path, capsys, head):
    script = _load_script()
    out = tmp_path / "out"
    flags = ("-fine_tune_joint", "-acc_head", head, "-save_predictor")
    assert _run_joint(script, store_path, out, "r", *flags) == 0, capsys.readouterr().err
    result = json.loads((out / "r.json").read_text())
    chosen = [h["targets"][T] for h in result["acc_heads"]]
    # the tiny store has too few graphs to cross-validate: auto keeps the forest
    assert [c["kind"] for c in chosen] == ["ridge" if head == "ridge" else "forest"]
    assert chosen[0]["scores"] == {} and chosen[0]["by_family"] == {}
    assert math.isfinite(result["results"]["res"]["joint"]["acc:cls"]["mape"]["mean"])
    saved = Predictor.load(out / "r_seed0.safetensors")
    assert saved.acc_head == head and saved.acc_readouts[T].kinds == [chosen[0]["kind"]]


def test_script_joint_needs_finetune_architectures(store_path, tmp_path, capsys):
    script = _load_script()
    base = ["-cache_file", str(store_path), "-family_test", "res", "-targets", "acc"]
    rc = script.main([*base, "-output_dir", str(tmp_path), "-q", "-fine_tune_joint"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs #N" in err and len(err.strip().splitlines()) == 1


def test_store_roundtrip_keeps_labels(store_path):
    loaded = load_samples(store_path, ["acc"])
    assert {s.family for s in loaded} == {"cnn", "res"} and len(loaded) == 2 * len(WIDTHS)


def test_joint_benchmark_curves_and_resume(store_path, tmp_path, capsys):
    bench = load_script("benchmarks/acc_predictor_joint.py", "acc_predictor_joint")
    argv = [
        "--store", str(store_path), "--task", "cls", "--acc_mode", "any", "--families", "res",
        "--n_max", "4", "--ns", "0", "2", "4", "--seeds", "1", "--epochs", "20",
        "--gnn", "aiop", "--out", str(tmp_path), "--name", "j", "-q",
    ]  # fmt: skip
    assert bench.main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "j.json").read_text())
    assert result["families"]["res"] == {"pool": 4, "test": 2, "other_archs": len(WIDTHS)}
    rows = {(r["variant"], r["n"]) for r in result["summary"].values()}
    assert rows == {("joint", 0)} | {(v, n) for v in ("joint", "family", "forest") for n in (2, 4)}
    assert (tmp_path / "j.png").stat().st_size > 0 and "| res | joint | 4 |" in (
        tmp_path / "j.md"
    ).read_text()
    # the zero-shot network never saw the family's level; the joint one saw 4 of its 6
    zero = result["summary"]["res|joint|0"]["metrics"]["mape"]["mean"]
    assert result["summary"]["res|joint|4"]["metrics"]["mape"]["mean"] < zero
    # a rerun with the same settings resumes: nothing left to train, the same summary
    runs = (tmp_path / "j_runs.jsonl").read_text()
    assert bench.main(argv) == 0
    assert (tmp_path / "j_runs.jsonl").read_text() == runs
    assert json.loads((tmp_path / "j.json").read_text())["summary"] == result["summary"]


def test_joint_benchmark_with_the_forest_head(store_path, tmp_path, capsys):
    bench = load_script("benchmarks/acc_predictor_joint.py", "acc_predictor_joint")
    # extremely randomised trees: see test_script_forest_head_joint
    argv = [
        "--store", str(store_path), "--task", "cls", "--acc_mode", "any", "--families", "res",
        "--n_max", "4", "--ns", "4", "--seeds", "1", "--epochs", "0", "--acc_head", "forest",
        "--forest_trees", "20", "--forest_kind", "extra", "--no_forest", "--out", str(tmp_path),
        "--name", "f", "-q",
    ]  # fmt: skip
    assert bench.main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["settings"]["acc_head"] == "forest"
    assert "forest on the block readout (extra, 20 trees)" in (tmp_path / "f.md").read_text()
    # the forest has seen 4 of the family's 6 architectures: it answers at the family's level
    assert result["summary"]["res|joint|4"]["metrics"]["mape"]["mean"] < 2.0
    assert bench.main([*argv, "--epochs", "-1"]) == 2
    assert "--epochs" in capsys.readouterr().err
    # labels shared with another task's: the run records the weight the forest learnt with
    shared = [*argv[:-3], "--name", "s", "-q", "--acc_share", "0.5", "--share_tasks", "cls"]
    assert bench.main(shared) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["settings"]["acc_share"] == 0.5 and result["settings"]["share_tasks"] == ["cls"]
    assert "at weight 0.5" in (tmp_path / "s.md").read_text()
    assert bench.main([*shared, "--acc_share", "x"]) == 2
    assert "acc_share" in capsys.readouterr().err
    assert bench.main([*shared, "--acc_head", "gnn"]) == 2
    assert "--acc_share needs --acc_head forest" in capsys.readouterr().err


def test_forest_reference_reads_the_stored_architecture(store_path):
    bench = load_script("benchmarks/acc_predictor_joint.py", "acc_predictor_joint")
    samples = [s for s in load_samples(store_path, [T], acc_mode="any") if s.family == "res"]
    samples.sort(key=lambda s: s.labels[T])
    y_true, y_pred = bench._forest(str(store_path), samples[::2], samples[1::2], T, 0, 1)
    assert y_true == [s.labels[T] for s in samples[1::2]] and len(y_pred) == len(y_true)
    # label rises with width, the stored encoding holds the width: the order is learnt
    assert spearmanr(y_true, y_pred)[0] > 0.9
    flat: dict[str, float] = {}
    bench._flatten({"family": "x", "seed": 3, "d": [2, 1], "ks": [[3, 5], [7]]}, "", flat)
    assert flat == {"d.len": 2, "d.0": 2, "d.1": 1, "ks.len": 2, "ks.0.len": 2, "ks.0.0": 3,
                    "ks.0.1": 5, "ks.1.len": 1, "ks.1.0": 7}  # fmt: skip


def test_joint_benchmark_bad_input(store_path, tmp_path, capsys):
    bench = load_script("benchmarks/acc_predictor_joint.py", "acc_predictor_joint")
    base = ["--store", str(store_path), "--task", "cls", "--acc_mode", "any", "-q"]
    assert bench.main([*base, "--families", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert bench.main([*base, "--families", "res", "--n_max", "4", "--ns", "5"]) == 2
    assert "--ns 5" in capsys.readouterr().err
    assert bench.main(["--store", str(tmp_path / "none.db"), "--families", "res"]) == 2


def test_readout_regressors_benchmark(store_path, tmp_path, capsys):
    bench = load_script("benchmarks/acc_readout_regressors.py", "acc_readout_regressors")
    base = ["--store", str(store_path), "--task", "cls", "--acc_mode", "any"]
    argv = [*base, "--family", "res", "--n", "3", "--split_seeds", "0", "1"]
    assert bench.main([*argv, "--out", str(tmp_path), "--name", "r"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["test_sizes"] == [3, 3]
    assert result["acc_tags"] == {"cls": "any"}
    assert set(result["srcc"]) == {
        "forest (extra)", "forest (random, the default)", "gradient boosting", "ridge",
        "auto (forest or ridge per family by CV)",
    }  # fmt: skip
    # too few architectures to cross-validate: auto keeps the forest, and scores as it does
    assert result["auto_chosen"] == ["forest", "forest"]
    assert all(len(v) == 2 for v in result["srcc"].values())
    # a forest on 3 rows with leaves of >= 3 is one leaf: a constant prediction ranks nothing
    assert all(v != v for v in result["srcc"]["forest (extra)"])  # NaN
    assert result["mean"]["ridge"] == result["mean"]["ridge"]
    assert "| ridge |" in (tmp_path / "r.md").read_text()
    assert bench.main([*argv, "--joint", "--out", str(tmp_path), "--name", "j"]) == 0
    assert "joint n = 3" in (tmp_path / "j.md").read_text()
    capsys.readouterr()
    assert bench.main([*base, "--family", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert bench.main(["--store", str(tmp_path / "none.db"), "--family", "res"]) == 2
    assert "no store" in capsys.readouterr().err


def test_readout_regressors_scored_against_another_set(store_path, tmp_path, capsys):
    """--test_acc_mode: learn from one set, score against another (``cls=none``: the untagged
    labels alone). The labels reversed rank every prediction the other way; a held-out
    architecture the scoring set lacks is left out."""
    bench = load_script("benchmarks/acc_readout_regressors.py", "acc_readout_regressors")
    path = tmp_path / "rep.db"
    shutil.copy(store_path, path)
    with Store(path) as store:
        labels = list(store.labels(task="cls"))
        for lab in labels:
            store.put_label(lab.graph, "", "acc", -lab.value, task="cls", mode="rev")
            if lab is not labels[0]:
                store.put_label(lab.graph, "", "acc", -lab.value, task="cls", mode="part")
    argv = ["--store", str(path), "--task", "cls", "--family", "res", "--n", "3"]
    argv += ["--split_seeds", "0", "1", "--acc_mode", "cls=rev", "--out", str(tmp_path)]

    def run(name, *flags):
        assert bench.main([*argv, *flags, "--name", name]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    own, rev = run("own", "--test_acc_mode", "cls=rev"), run("rev", "--test_acc_mode", "cls=none")
    assert rev["acc_tags"] == {"cls": "rev"} and rev["test_acc_tags"] == {"cls": "none"}
    assert own["label_agreement"] == pytest.approx([1.0, 1.0])
    assert rev["label_agreement"] == pytest.approx([-1.0, -1.0])
    assert rev["srcc"]["ridge"] == pytest.approx([-v for v in own["srcc"]["ridge"]])
    assert "agree at SRCC -1.000" in (tmp_path / "rev.md").read_text()
    # rev+part: the mean of two sets, over the architectures both labelled (untagged labels
    # do not fill in a mean), so labels[0]'s architecture cannot be scored
    part = run("part", "--test_acc_mode", "cls=rev+part")
    samples = load_samples(path, ["acc:cls"], acc_mode="rev")
    for seed, n_own, n_part in zip((0, 1), own["test_sizes"], part["test_sizes"], strict=True):
        test = split_by_family(samples, "res#3", seed).test["res"]
        lacking = sum(s.cg.fingerprint == labels[0].graph for s in test)
        assert n_part == n_own - lacking
    capsys.readouterr()
    assert bench.main([*argv, "--test_acc_mode", "cls=a+a"]) == 2
    assert "distinct tags" in capsys.readouterr().err


def test_readout_regressors_with_labels_shared_across_tasks(store_path, tmp_path, capsys):
    """--share_tasks: the default forest on labels blended with another task's labels of the
    same architectures; weight 0 is the default forest itself. With the other task's labels
    the reverse of these, weight 1 blends every label to its family's mean: nothing ranks."""
    bench = load_script("benchmarks/acc_readout_regressors.py", "acc_readout_regressors")

    def store_with_aux(name: str, sign: float) -> Path:
        path = tmp_path / name
        shutil.copy(store_path, path)
        with Store(path) as store:
            store.put_task("aux", metric="acc")
            for lab in list(store.labels(task="cls")):
                store.put_label(lab.graph, "", "acc", sign * lab.value, task="aux")
        return path

    argv = ["--task", "cls", "--family", "res", "--n", "3", "--acc_mode", "any"]
    argv += ["--split_seeds", "0", "1", "--out", str(tmp_path), "--share_tasks", "aux"]
    argv += ["--share_weights", "0", "1", "cv"]
    assert bench.main(["--store", str(store_with_aux("a.db", 1)), *argv, "--name", "s"]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    shared = "forest (random), shared"
    assert result["srcc"][f"{shared} 0.0"] == result["srcc"]["forest (random, the default)"]
    assert len(result["srcc"][f"{shared} 1.0"]) == 2
    assert result["share_cv_chosen"] == [0.0, 0.0]  # 3 architectures: too few for 5 folds
    assert "labels at weight W" in (tmp_path / "s.md").read_text()
    assert bench.main(["--store", str(store_with_aux("r.db", -1)), *argv, "--name", "r"]) == 0
    reverse = json.loads((tmp_path / "r.json").read_text())["srcc"]
    assert all(v != v for v in reverse[f"{shared} 1.0"])  # NaN: a constant prediction
    assert reverse[f"{shared} 0.0"] == result["srcc"][f"{shared} 0.0"]
    capsys.readouterr()
    bad = ["--store", str(store_path), *argv[:-4], "--share_tasks", "aux", "--share_weights"]
    assert bench.main([*bad, "lots"]) == 2
    assert "acc_share" in capsys.readouterr().err


def test_load_samples_warns_of_labels_from_two_supernets(store_path, tmp_path, caplog):
    """Labels inherited from two trained supernets rank subnets differently: loading a set
    that mixes them says so (one warning per task and family); one instance says nothing."""
    path = tmp_path / "mixed.db"
    shutil.copy(store_path, path)
    with Store(path) as store:
        labs = [lab for lab in store.labels(kind="acc") if lab.task == "cls"]
        for i, lab in enumerate(labs):
            sha = "a" * 16 if i % 2 else None  # half recorded, half from before records
            extra = {"model": f"family:ofa_pn:{i}", "train": {"init": "supernet"}}
            if sha:
                extra["supernet"] = {"weights_sha256": sha}
            store.put_label(lab.graph, "", "acc", lab.value, task="t2", extra=extra)
    with caplog.at_level(logging.WARNING, logger="aiop.predictor.train"):
        load_samples(store_path, ["acc"])
    assert not [r for r in caplog.records if "supernet instances" in r.message]
    with caplog.at_level(logging.WARNING, logger="aiop.predictor.train"):
        load_samples(path, ["acc:t2"])
    (warning,) = [r.message for r in caplog.records if "supernet instances" in r.message]
    assert warning.startswith("t2 labels of ofa_pn come from 2 supernet instances (?, aaaa")
