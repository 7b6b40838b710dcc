"""The block readout, the tree ensemble and the ridge stored without pickle, and the
predictor's accuracy readout heads (``Predictor(acc_head="forest" | "ridge" | "auto")``): fit,
predict, fine-tune, save/load, bad files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

from aiop.cg import from_onnx, from_torch
from aiop.mconfig import MConfig
from aiop.models.families import build_arch, sample_arch
from aiop.predictor.acc_heads import (
    HeadChoice,
    ReadoutHeadError,
    TargetReadout,
    choose_heads,
    fit_head,
    fit_target_readout,
)
from aiop.predictor.api import Predictor, PredictorError, Sample
from aiop.predictor.blocks import (
    MAX_BLOCKS,
    READOUT_NAMES,
    block_readout,
    find_blocks,
    find_stages,
)
from aiop.predictor.forest import ForestError, TreeEnsemble
from aiop.predictor.linear import RIDGE_ALPHAS, RidgeError, RidgeReadout
from aiop.predictor.model import GNNSpec
from aiop.predictor.train import clone_predictor, finetune

T = "acc:cls"


# -- the tree ensemble ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12))
    y = 2 * x[:, 0] + np.sin(3 * x[:, 1]) + 0.1 * rng.normal(size=200)
    return x, y, rng.normal(size=(300, 12))


@pytest.mark.parametrize("kind", ["extra", "random"])
def test_forest_predicts_what_scikit_learn_predicts(regression_data, kind):
    from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

    x, y, x_new = regression_data
    forest = TreeEnsemble.fit(x, y, kind=kind, trees=30, seed=4)
    maker = ExtraTreesRegressor if kind == "extra" else RandomForestRegressor
    reference = maker(n_estimators=30, min_samples_leaf=3, random_state=4).fit(x, y)
    np.testing.assert_allclose(forest.predict(x_new), reference.predict(x_new), atol=1e-12)
    # the arrays are the whole model: a round trip through tensors predicts the same
    again = TreeEnsemble.from_tensors(forest.to_tensors("f/"), "f/", x.shape[1])
    np.testing.assert_array_equal(again.predict(x_new), forest.predict(x_new))


def test_forest_refuses_bad_input_and_broken_arrays(regression_data):
    x, y, _ = regression_data
    with pytest.raises(ForestError, match="unknown forest kind"):
        TreeEnsemble.fit(x, y, kind="boosted")
    with pytest.raises(ForestError, match="finite"):
        TreeEnsemble.fit(np.where(x > 2, np.nan, x), y)
    with pytest.raises(ForestError, match="2 rows"):
        TreeEnsemble.fit(x[:1], y[:1])
    forest = TreeEnsemble.fit(x, y, trees=5)
    with pytest.raises(ForestError, match="reads 12 features"):
        forest.predict(x[:, :5])
    for name, bad in [
        ("left", lambda a: a.__setitem__(int(np.flatnonzero(a != -1)[0]), 10**9)),
        ("feature", lambda a: a.__setitem__(0, 99)),
        ("left", lambda a: a.__setitem__(int(np.flatnonzero(a != -1)[0]), 0)),  # a cycle
    ]:
        state = forest.to_tensors("f/")
        array = state[f"f/{name}"].numpy().copy()
        bad(array)
        state[f"f/{name}"] = torch.from_numpy(array)
        with pytest.raises(ForestError):
            TreeEnsemble.from_tensors(state, "f/", 12)
    state = forest.to_tensors("f/")
    del state["f/value"]
    with pytest.raises(ForestError, match="missing"):
        TreeEnsemble.from_tensors(state, "f/", 12)


# -- the block readout ---------------------------------------------------------------------
def _family_cg(family: str, seed: int):
    arch = sample_arch(family, seed)
    model = build_arch(arch, resolution=32).eval()
    return arch, model, from_torch(model, (1, 3, 32, 32), name=f"{family}:{seed}")


def test_readout_finds_the_architectures_blocks_and_stages():
    arch, _, cg = _family_cg("ofa_mbv3", 5)
    stages = find_stages(find_blocks(cg))
    # stem + the 16-wide first block, then the 5 elastic stages (at 32 px the last one runs on
    # 1 x 1 maps: the squeeze-excite convolutions there must not pass for blocks)
    elastic = stages[-5:]
    assert [len(s) for s in elastic] == arch["d"]
    assert [[b.kernel for b in s] for s in elastic] == arch["ks"]
    for stage, expands in zip(elastic, arch["e"]):
        assert len({b.width for b in stage}) == 1
        # past the stage's first block, a block expands the stage's width
        assert [b.mid for b in stage[1:]] == [b.width * e for b, e in zip(stage[1:], expands[1:])]
    assert [s[0].resolution for s in elastic] == [8, 4, 2, 2, 1]
    v = block_readout(cg)
    assert v.shape == (len(READOUT_NAMES),)
    k = READOUT_NAMES.index
    first = len(stages) - 5
    assert v[k(f"s{first}.blocks")] == arch["d"][0]
    assert v[k(f"s{first}.b0.kernel")] == arch["ks"][0][0]
    assert v[k(f"s{first}.b{arch['d'][0]}.present")] == 0.0  # past the stage's depth
    assert v[k("ops.HardSwish")] > 0 and v[k("stages")] == len(stages)


def test_readout_of_a_bottleneck_family_and_of_an_onnx_file(tmp_path):
    arch, model, cg = _family_cg("ofa_resnet", 2)
    stages = find_stages(find_blocks(cg))
    assert [len(s) for s in stages[-4:]] == [len(e) for e in arch["e"]]
    assert all(len(s) <= MAX_BLOCKS for s in stages)
    # nothing in the readout reads module names: a user's inference export of the network
    # (BatchNorm folded into the convolutions, so other op counts, FLOPs and parameters)
    # has the same blocks and stages
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), buf, dynamo=False)
    structure = [
        i for i, n in enumerate(READOUT_NAMES) if n.startswith("s") and not n.startswith("stages")
    ]
    structure.append(READOUT_NAMES.index("stages"))
    onnx_readout = block_readout(from_onnx(buf.getvalue()))
    np.testing.assert_array_equal(onnx_readout[structure], block_readout(cg)[structure])


# -- the predictor's accuracy forest ---------------------------------------------------------
def _label(cg) -> float:
    """A synthetic accuracy that depends on which blocks exist and their kernels."""
    blocks = find_blocks(cg)
    return 0.5 + 0.01 * len(blocks) + 0.004 * sum(b.kernel == 7 for b in blocks)


@pytest.fixture(scope="module")
def family_samples() -> list[Sample]:
    out = []
    for family, n in (("ofa_mbv3", 22), ("ofa_pn", 4)):
        for seed in range(n):
            _, _, cg = _family_cg(family, seed)
            out.append(Sample(cg, MConfig(), {T: _label(cg)}, family))
    return out


def _forest_predictor(**kw) -> Predictor:
    kw.setdefault("acc_head", "forest")
    return Predictor(
        spec=GNNSpec(conv="graphconv", layers=2, hidden=8, head_hidden=8),
        targets=[T],
        epochs=kw.pop("epochs", 2),
        batch_size=8,
        progress=False,
        forest_trees=50,
        **kw,
    )


@pytest.fixture(scope="module")
def forest_pred(family_samples) -> Predictor:
    pred = _forest_predictor()
    pred.fit(family_samples[:14] + family_samples[22:])
    return pred


def _accuracy(pred: Predictor, samples: list[Sample]) -> np.ndarray:
    return np.array([pred.predict(s.cg, [s.config])[0]["accuracy"]["cls"] for s in samples])


def test_forest_answers_accuracy_and_ranks_held_out_architectures(forest_pred, family_samples):
    held = family_samples[14:22]
    got = _accuracy(forest_pred, held)
    x = np.stack([forest_pred.acc_features(s.cg, [s.config])[0] for s in held])
    np.testing.assert_array_equal(got, forest_pred.acc_readouts[T].predict(x))
    truth = [s.labels[T] for s in held]
    assert spearmanr(got, truth)[0] > 0.6
    # the network's own head (2 epochs) is not what answers
    gnn = Predictor.__new__(Predictor)
    gnn.__dict__ = {**forest_pred.__dict__, "acc_readouts": {}}
    assert not np.allclose(_accuracy(gnn, held), got)
    # one graph, many configurations: accuracy labels came under one configuration, so the
    # forest answers the same for each
    many = forest_pred.predict(held[0].cg, ["bs=8", "bs=16,freeze=0.5", "bs=4,method=last"])
    assert {r["accuracy"]["cls"] for r in many} == {got[0]}


def test_forest_fine_tune_refits_on_the_union_and_leaves_the_base(forest_pred, family_samples):
    held = family_samples[14:22]
    rows = len(forest_pred.acc_readouts[T].rows_y)
    before = _accuracy(forest_pred, held)
    tuned = finetune(forest_pred, held[:4], epochs=0)
    assert len(tuned.acc_readouts[T].rows_y) == rows + 4
    assert len(forest_pred.acc_readouts[T].rows_y) == rows
    np.testing.assert_array_equal(_accuracy(forest_pred, held), before)
    # the labelled architectures now sit in the forest: it answers them far closer
    err_before = np.abs(before[:4] - [s.labels[T] for s in held[:4]]).mean()
    err_after = np.abs(_accuracy(tuned, held[:4]) - [s.labels[T] for s in held[:4]]).mean()
    assert err_after < err_before
    clone = clone_predictor(forest_pred)
    clone.fit_acc_readout(held, extend=True)
    assert len(forest_pred.acc_readouts[T].rows_y) == rows


def test_forest_save_load_round_trip_and_bad_files(forest_pred, family_samples, tmp_path):
    path = forest_pred.save(tmp_path / "f.safetensors")
    loaded = Predictor.load(path)
    held = family_samples[14:22]
    np.testing.assert_array_equal(_accuracy(loaded, held), _accuracy(forest_pred, held))
    assert loaded.acc_head == "forest" and loaded.forest_trees == 50
    np.testing.assert_array_equal(loaded.acc_readouts[T].rows_x, forest_pred.acc_readouts[T].rows_x)
    # a fine-tune of the loaded predictor still refits on the original rows too
    assert len(finetune(loaded, held[:2], epochs=0).acc_readouts[T].rows_y) == 14 + 4 + 2

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()

    def write(name: str, state: dict, meta: dict) -> str:
        out = tmp_path / name
        save_file(state, str(out), metadata=meta)
        return str(out)

    broken = dict(state)
    broken[f"acc_forest/{T}/feature"] = torch.full_like(state[f"acc_forest/{T}/feature"], 10**6)
    with pytest.raises(PredictorError, match=r"accuracy forest acc:cls.*feature index"):
        Predictor.load(write("b1.safetensors", broken, meta))
    missing = {k: v for k, v in state.items() if not k.endswith("/rows_x")}
    with pytest.raises(PredictorError, match="accuracy forest acc:cls"):
        Predictor.load(write("b2.safetensors", missing, meta))
    config = json.loads(meta["config"])
    config["acc_head"]["readout_version"] = 999
    with pytest.raises(PredictorError, match="block readout version 999"):
        Predictor.load(write("b3.safetensors", state, {**meta, "config": json.dumps(config)}))


def test_forest_settings_are_checked():
    with pytest.raises(PredictorError, match="acc_head"):
        Predictor(acc_head="boosted")
    with pytest.raises(PredictorError, match="forest_kind"):
        Predictor(acc_head="forest", forest_kind="boosted")
    with pytest.raises(PredictorError, match="forest_trees"):
        Predictor(acc_head="forest", forest_trees=0)


def test_gnn_head_keeps_no_forest(family_samples, tmp_path):
    pred = _forest_predictor(epochs=1)
    pred.acc_head = "gnn"
    pred.fit(family_samples[:6])
    assert pred.acc_readouts == {}
    loaded = Predictor.load(pred.save(tmp_path / "g.safetensors"))
    assert loaded.acc_head == "gnn" and loaded.acc_readouts == {}


def test_forest_reads_the_configuration_when_labels_depend_on_it(family_samples):
    """Labels measured under several configurations: the trees split on the configuration
    vector, and one graph's configurations get their own answers."""
    rows = []
    for s in family_samples[:10]:
        for freeze in (0.0, 0.5):
            cfg = MConfig.parse(f"bs=8,freeze={freeze}")
            rows.append(Sample(s.cg, cfg, {T: s.labels[T] - 0.2 * freeze}, s.family))
    pred = _forest_predictor(epochs=1)
    pred.fit(rows)
    assert pred.acc_readouts[T].max_feature_used >= len(READOUT_NAMES)
    out = pred.predict(family_samples[12].cg, ["bs=8", "bs=8,freeze=0.5"])
    assert out[0]["accuracy"]["cls"] - out[1]["accuracy"]["cls"] > 0.05


def test_speed_benchmark_times_a_forest_that_reads_the_configuration():
    from script_helpers import load_script

    from aiop.models.examples import SmallCNN

    bench = load_script("benchmarks/predictor_speed.py", "predictor_speed_forest")
    model = SmallCNN(width=8)
    cg = from_torch(model, (1, *model.input_size))
    pred = bench._predictor(None, cg, acc_forest=True)
    assert pred.acc_readouts["acc:cls"].max_feature_used >= len(READOUT_NAMES)
    out = pred.predict(cg, ["bs=8", "bs=32,freeze=0.5"])
    assert out[0]["accuracy"]["cls"] > out[1]["accuracy"]["cls"]
    assert bench._predictor(None, cg).acc_readouts == {}


# -- the ridge readout and acc_head="auto" ---------------------------------------------------
def test_ridge_predicts_what_scikit_learn_predicts(regression_data):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, x_new = regression_data
    x = np.column_stack([x, np.full(len(x), 3.0)])  # a constant column: scale 1, coefficient 0
    x_new = np.column_stack([x_new, np.full(len(x_new), 5.0)])
    ridge = RidgeReadout.fit(x, y)
    reference = make_pipeline(StandardScaler(), RidgeCV(alphas=np.asarray(RIDGE_ALPHAS)))
    reference.fit(x, y)
    np.testing.assert_allclose(ridge.predict(x_new), reference.predict(x_new), atol=1e-10)
    assert ridge.alpha == reference[-1].alpha_
    assert ridge.scale[-1] == 1.0 and ridge.coef[-1] == 0.0
    assert ridge.max_feature_used == x.shape[1] - 2
    again = RidgeReadout.from_tensors(ridge.to_tensors("r/"), "r/", x.shape[1])
    np.testing.assert_array_equal(again.predict(x_new), ridge.predict(x_new))


def test_ridge_refuses_bad_input_and_broken_arrays(regression_data):
    x, y, _ = regression_data
    with pytest.raises(RidgeError, match="≥ 2 rows"):
        RidgeReadout.fit(x[:1], y[:1])
    with pytest.raises(RidgeError, match="finite"):
        RidgeReadout.fit(np.where(x > 2, np.nan, x), y)
    with pytest.raises(RidgeError, match="penalties"):
        RidgeReadout.fit(x, y, alphas=(0.0,))
    ridge = RidgeReadout.fit(x, y)
    with pytest.raises(RidgeError, match="reads 12 features"):
        ridge.predict(x[:, :5])
    state = ridge.to_tensors("r/")
    with pytest.raises(RidgeError, match="coef of shape"):
        RidgeReadout.from_tensors(
            {**state, "r/coef": torch.zeros(3, dtype=torch.float64)}, "r/", 12
        )
    zero_scale = state["r/scale"].clone()
    zero_scale[0] = 0
    with pytest.raises(RidgeError, match="non-positive scale"):
        RidgeReadout.from_tensors({**state, "r/scale": zero_scale}, "r/", 12)
    with pytest.raises(RidgeError, match="r/intercept_alpha"):
        RidgeReadout.from_tensors({k: v for k, v in state.items() if "alpha" not in k}, "r/", 12)


def _two_family_rows(rng, per_family=40):
    """Family ``a``: a label linear in features 0-3; ``b``: a label that is |x| in 4-5, which
    no linear model ranks. Each graph has two rows (configurations) with one label."""
    x, y, groups, fams = [], [], [], []
    for k in range(2 * per_family):
        fam = "ab"[k % 2]
        row = np.zeros(9)
        cols = slice(0, 4) if fam == "a" else slice(4, 8)
        row[cols] = rng.normal(size=4)
        label = row[:4] @ [1.0, -0.5, 0.3, 0.8] if fam == "a" else abs(row[4]) + abs(row[5])
        for config in (0.0, 1.0):
            x.append(np.r_[row[:8], config])
            y.append(label)
            groups.append(k)
            fams.append(fam)
    return np.array(x), np.array(y), np.array(groups), fams


def _fit(kind, xx, yy):
    return fit_head(kind, xx, yy, forest_kind="random", trees=40, seed=0)


def test_choose_heads_picks_per_family_the_regressor_that_ranks_held_out_graphs():
    x, y, groups, fams = _two_family_rows(np.random.default_rng(1))
    group_family = dict(zip(groups.tolist(), fams))
    choice = choose_heads(x, y, groups, group_family, _fit)
    assert choice.by_family == {"a": "ridge", "b": "forest"}
    assert choice.family_scores["a"]["ridge"] > choice.family_scores["a"]["forest"]
    assert choice.family_scores["b"]["forest"] > choice.family_scores["b"]["ridge"] + 0.3
    assert set(choice.scores) == {"forest", "ridge"}
    # too few graphs to cross-validate: the forest, nothing scored
    few = choose_heads(x[:16], y[:16], groups[:16], group_family, _fit)
    assert few == HeadChoice(default="forest")
    with pytest.raises(ReadoutHeadError, match="unknown readout head 'boosted'"):
        fit_head("boosted", x, y, forest_kind="random", trees=2, seed=0)


def test_target_readout_routes_a_graph_to_its_familys_head():
    rng = np.random.default_rng(2)
    x, y, _, fams = _two_family_rows(rng)
    readout = fit_target_readout("auto", x, y, fams, _fit, n_readout=8)
    assert readout.kinds == ["forest", "ridge"] and readout.by_family == {
        "a": "ridge",
        "b": "forest",
    }
    new_x, _, _, new_fams = _two_family_rows(rng, per_family=5)
    assert [readout.family_of(r) for r in new_x] == new_fams
    expect = [readout.heads["ridge" if f == "a" else "forest"].predict(r[None])[0]
              for r, f in zip(new_x, new_fams)]  # fmt: skip
    np.testing.assert_array_equal(readout.predict(new_x), expect)
    # a fixed setting: one head, no routing, no choice
    ridge = fit_target_readout("ridge", x, y, fams, _fit, n_readout=8)
    assert ridge.kinds == ["ridge"] and ridge.by_family == {} and ridge.scores == {}
    np.testing.assert_array_equal(ridge.predict(new_x), ridge.heads["ridge"].predict(new_x))
    # the saved form restores the same routing and predictions
    again = TargetReadout.from_saved(readout.to_json(), readout.to_tensors("t"), "t", 8)
    np.testing.assert_array_equal(again.predict(new_x), readout.predict(new_x))
    assert again.row_families == fams
    state = readout.to_tensors("t")
    state["acc_forest/t/rows_family"] = torch.full_like(state["acc_forest/t/rows_family"], 7)
    with pytest.raises(ReadoutHeadError, match="row family index out of range"):
        TargetReadout.from_saved(readout.to_json(), state, "t", 8)
    with pytest.raises(ReadoutHeadError, match="unknown readout head 'gnn'"):
        fit_target_readout("gnn", x, y, fams, _fit, n_readout=8)


@pytest.mark.parametrize("head", ["ridge", "auto"])
def test_ridge_and_auto_heads_fit_predict_fine_tune_and_round_trip(head, family_samples, tmp_path):
    pred = _forest_predictor(acc_head=head)
    train, held = family_samples[:14] + family_samples[22:], family_samples[14:22]
    pred.fit(train)
    readout = pred.acc_readouts[T]
    summary = pred.acc_head_summary()[T]
    assert summary["kind"] == readout.default and (head == "auto" or readout.kinds == ["ridge"])
    # 14 ofa_mbv3 graphs: enough for the folds, too few for a choice of the family's own
    assert bool(summary["scores"]) == (head == "auto") and summary["by_family"] == {}
    x = np.stack([pred.acc_features(s.cg, [s.config])[0] for s in held])
    got = _accuracy(pred, held)
    np.testing.assert_array_equal(got, readout.predict(x))
    if readout.default == "ridge":  # the synthetic label is linear in the readout
        assert spearmanr(got, [s.labels[T] for s in held])[0] > 0.6
    path = pred.save(tmp_path / f"{head}.safetensors")
    assert any(k.startswith(f"acc_{readout.default}/{T}/") for k in load_file(str(path)))
    loaded = Predictor.load(path)
    assert loaded.acc_head == head and loaded.acc_head_summary() == pred.acc_head_summary()
    np.testing.assert_array_equal(_accuracy(loaded, held), got)
    # a fine-tune refits on the union: 18 rows before, 4 new
    tuned = finetune(loaded, held[:4], epochs=0)
    assert len(tuned.acc_readouts[T].rows_y) == 18 + 4
    assert tuned.acc_readouts[T].row_families.count("ofa_mbv3") == 14 + 4
    assert len(loaded.acc_readouts[T].rows_y) == 18


def test_forest_files_from_before_the_ridge_head_still_load(forest_pred, family_samples, tmp_path):
    """Files written before the ridge head name their forests ``"forests": {target: width}``
    and store no row families."""
    path = forest_pred.save(tmp_path / "new.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.endswith("rows_family")}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    config = json.loads(meta["config"])
    readouts = config["acc_head"].pop("readouts")
    config["acc_head"]["forests"] = {t: r["n_features"] for t, r in readouts.items()}
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata={**meta, "config": json.dumps(config)})
    loaded = Predictor.load(old)
    assert loaded.acc_readouts[T].kinds == ["forest"]
    assert set(loaded.acc_readouts[T].row_families) == {""}
    held = family_samples[14:22]
    np.testing.assert_array_equal(_accuracy(loaded, held), _accuracy(forest_pred, held))
    config["acc_head"]["readouts"] = {
        T: {"kind": "boosted", "n_features": readouts[T]["n_features"]}
    }
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(PredictorError, match="unknown kind 'boosted'"):
        Predictor.load(bad)
