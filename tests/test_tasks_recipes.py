"""Label recipes: ids, the one-recipe-per-tag rule, and the noise study's reliability statistic."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from aiop.cache import Store
from aiop.tasks.labels import RecipeMismatch, inventory, label_archs, label_recipe_id
from aiop.tasks.recipes import (
    DEFAULT_RECIPE,
    LABEL_RECIPES,
    label_tag,
    label_tags,
    recipe_config,
    recipe_id,
    recipe_name,
    reliability,
    task_recipe,
)
from aiop.tasks.train import PRIMARY_METRIC, TrainConfig


def test_recipe_ids_follow_the_settings_not_the_seed() -> None:
    v1 = recipe_config("v1", "classification")
    assert v1.resolution == 32 and v1.epochs == 2 and v1.n_val == 300
    same = recipe_id(replace(v1, seed=7), "classification", 64)
    assert recipe_id(v1, "classification", 64) == same
    assert recipe_id(v1, "classification", 64) != recipe_id(
        replace(v1, epochs=3), "classification", 64
    )
    assert recipe_id(v1, "classification", 64) != recipe_id(v1, "classification", 32)  # head width
    # the stored dict of a TrainConfig with resolution None gives the same id as the filled one
    assert recipe_id(TrainConfig(epochs=2, n_val=300).to_dict(), "classification", 64) == (
        recipe_id(v1, "classification", 64)
    )
    shared = {"family": "ofa_mbv3", "config": {"steps": 200}}
    assert recipe_id(v1, "classification", 64, shared) != recipe_id(v1, "classification", 64)
    from aiop.tasks.recipes import task_recipe

    for name in LABEL_RECIPES:  # the oldest recipe that trains the task alike names it
        for task in ("pose", "instance"):
            assert recipe_name(recipe_config(name, task), task, 64) == task_recipe(name, task)
    assert recipe_name(recipe_config("v5", "instance"), "instance", 64) == "v5"
    assert recipe_name(recipe_config("v4", "pose"), "pose", 64) == "v4"
    assert recipe_name(replace(v1, lr=1.0), "classification", 64) == recipe_id(
        replace(v1, lr=1.0), "classification", 64
    )
    assert DEFAULT_RECIPE in LABEL_RECIPES
    with pytest.raises(ValueError, match="unknown label recipe 'v9'"):
        recipe_config("v9", "pose")


# Every named recipe's id per task. Labels exist for these: a named recipe never changes
# (a new setting is a new name), so a change here is a bug, not a test to update.
PINNED_IDS = {
    "v1": {"classification": "19463c08", "scene": "f7ebf9e9", "pose": "9f219bf9"},
    "v2": {"classification": "455f6223", "scene": "095322a1", "pose": "96f04862"},
    "v3": {"classification": "455f6223", "scene": "095322a1", "pose": "933c8c09"},
    "v4": {"classification": "5420db35", "scene": "ee572d45", "pose": "eb171a1d"},
    "v5": {
        "classification": "5420db35",
        "scene": "ee572d45",
        "instance": "3169b66e",
        "pose": "eb171a1d",
    },
    "v6": {
        "classification": "f9bc56bb",
        "scene": "ee572d45",
        "instance": "3169b66e",
        "pose": "eb171a1d",
    },
}


@pytest.mark.parametrize("name", sorted(PINNED_IDS))
def test_named_recipes_never_change(name: str) -> None:
    for task in PRIMARY_METRIC:
        key = task if task in PINNED_IDS[name] else "scene"
        assert recipe_id(recipe_config(name, task), task, 64) == PINNED_IDS[name][key], task
    assert set(PINNED_IDS) == set(LABEL_RECIPES)  # a new named recipe is pinned too


def test_a_mask_threshold_is_a_new_recipe_only_where_it_moves_the_cut() -> None:
    """Labels stored before the setting existed (no key) and a cut at 0.5 (v1-v4's) keep
    their ids, so no existing label set moves; another cut of the instance masks is another
    recipe, with an id of its own."""
    v4 = recipe_config("v4", "instance").to_dict()
    base = recipe_id(v4, "instance", 64)
    assert base == PINNED_IDS["v4"]["scene"]
    assert recipe_id({**v4, "mask_threshold": 0.5}, "instance", 64) == base
    assert recipe_id({**v4, "mask_threshold": None}, "instance", 64) == base
    moved = recipe_id({**v4, "mask_threshold": 1 / 1.1}, "instance", 64)
    assert moved != base
    assert moved != recipe_id({**v4, "mask_threshold": 0.8}, "instance", 64)


def test_the_mask_cut_has_one_default_and_must_be_a_probability() -> None:
    """A stored config from before the field (None) reads as the 0.5 cut it was trained with;
    a cut outside (0, 1) would keep every pixel or none, so the config refuses it."""
    assert TrainConfig().mask_threshold == 0.5
    assert TrainConfig(mask_threshold=None).mask_threshold == 0.5  # type: ignore[arg-type]
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="mask_threshold"):
            TrainConfig(mask_threshold=bad)


def test_v3_changes_pose_only_and_shares_v2s_label_sets() -> None:
    """v3 trains pose on 500 figures; every other task exactly as v2, so its labels join
    v2's sets (and pass their one-recipe check), while pose gets a set of its own."""
    for task in PRIMARY_METRIC:
        v2, v3 = recipe_config("v2", task), recipe_config("v3", task)
        if task == "pose":
            assert (v3.n_train, v3.resolution, v3.epochs) == (500, 64, 2) and v3 != v2
            assert label_tag("v3", task) == "individual-v3"
        else:
            assert v3 == v2
            assert label_tag("v3", task) == "individual-v2"
        assert label_tag("v2", task) == "individual-v2"
        assert label_tag("v1", task, kind="shared") == "shared-v1"
        assert recipe_name(v3, task, 64) == ("v3" if task == "pose" else "v2")


def test_reliability_separates_architecture_from_seed() -> None:
    # no seed noise: all variance is the architecture's
    clean = reliability({"a": [0.5, 0.5], "b": [0.7, 0.7], "c": [0.9, 0.9]})
    assert clean.icc == pytest.approx(1.0) and clean.within_sd == 0 and math.isinf(clean.snr)
    assert clean.between_sd == pytest.approx(0.2)
    # same architecture means: nothing but noise
    noise = reliability({"a": [0.4, 0.6], "b": [0.6, 0.4], "c": [0.5, 0.5]})
    assert noise.icc < 0 and noise.between_sd == pytest.approx(0.0)
    # a hand-computed balanced case: means 1, 3 (grand 2); MSB = 2*(1+1)/1 = 4,
    # MSW = (0.25*2 + 0.25*2)/2 = 0.5; ICC = (4 - 0.5) / (4 + 0.5) = 7/9
    r = reliability({"a": [0.5, 1.5], "b": [2.5, 3.5]})
    assert r.icc == pytest.approx(7 / 9) and r.within_sd == pytest.approx(math.sqrt(0.5))
    assert r.spearman_brown(1) == pytest.approx(7 / 9)
    assert r.spearman_brown(2) == pytest.approx(2 * (7 / 9) / (1 + 7 / 9))
    with pytest.raises(ValueError, match="2 architectures"):
        reliability({"a": [0.5, 0.6]})


TINY = TrainConfig(epochs=1, batch_size=16, resolution=32, n_train=32, n_val=16)


def test_a_tag_holds_one_recipe(tmp_path: Path) -> None:
    """A second recipe under the same tag is refused before training, and nothing changes."""
    db = tmp_path / "r.db"
    spec = ["family:ofa_pn:0"]
    rep = label_archs(db, spec, ["classification"], TINY, tag="t", width=16, progress=False)
    assert len(rep.labelled) == 1
    with Store(db, readonly=True) as s:
        (rec,) = s.labels(kind="acc", mode="t")
    assert rec.extra["recipe"] == recipe_id(TINY, "classification", 16)
    assert label_recipe_id(rec.extra, "classification") == rec.extra["recipe"]
    # labels written before ids were recorded: the id is recomputed from their settings
    legacy = {k: v for k, v in rec.extra.items() if k != "recipe"}
    assert label_recipe_id(legacy, "classification") == rec.extra["recipe"]

    other = replace(TINY, epochs=2)
    with pytest.raises(RecipeMismatch, match="label set 't' of task classification holds"):
        label_archs(db, ["family:ofa_pn:1"], ["classification"], other, tag="t", width=16)
    with Store(db, readonly=True) as s:
        assert len(list(s.labels(kind="acc", mode="t"))) == 1  # nothing added, nothing replaced
    # the same recipe resumes (skips), a new tag takes the other recipe; per-task configs work
    again = label_archs(db, spec, ["classification"], TINY, tag="t", width=16, progress=False)
    assert again.skipped == [("family:ofa_pn:0", "classification")]
    per_task = {"classification": other}
    new = label_archs(db, spec, ["classification"], per_task, tag="t2", width=16, progress=False)
    assert len(new.labelled) == 1
    with pytest.raises(ValueError, match="no training config for task 'pose'"):
        label_archs(db, spec, ["pose"], per_task, tag="t3", width=16, progress=False)
    sets = {(x.tag, x.task, x.family): x for x in inventory(db)}
    assert sets[("t", "classification", "ofa_pn")].count == 1
    assert sets[("t", "classification", "ofa_pn")].supernets == []  # trained from scratch
    t2 = sets[("t2", "classification", "ofa_pn")]
    assert t2.recipes == [recipe_id(other, "classification", 16)]


def test_repeats_store_the_mean_over_seeds(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    cfg = replace(TINY, repeats=2)
    rep = label_archs(db, ["family:ofa_pn:0"], ["classification"], cfg, tag="m", width=16)
    assert len(rep.labelled) == 1
    with Store(db, readonly=True) as s:
        (acc,) = s.labels(kind="acc", mode="m")
        (top1,) = s.labels(kind="top1", mode="m")
    values = acc.extra["values"]
    assert len(values) == 2 and acc.value == pytest.approx(sum(values) / 2)
    assert top1.value == pytest.approx(acc.value)
    assert acc.extra["steps"] == 2 * 2  # two trainings of 32 samples at batch 16
    # the single-seed label of seed 0 is the first of the two
    one = label_archs(db, ["family:ofa_pn:0"], ["classification"], TINY, tag="one", width=16)
    assert one.labelled[0][2] == pytest.approx(values[0])


def test_labels_can_be_measured_on_every_held_out_digit() -> None:
    from aiop.tasks.train import make_loader

    cfg = TrainConfig(val_split="val+test").for_task("classification")
    assert len(make_loader("classification", "val+test", cfg, shuffle=False).dataset) == 1500
    some = make_loader("classification", "val+test", cfg, shuffle=False, n=300).dataset
    assert [len(d) for d in some.datasets] == [100, 200]  # in proportion to 500 / 1000
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        make_loader("classification", "val+tset", cfg, shuffle=False)


def test_task_recipe_names_each_tasks_label_sets() -> None:
    """The name a task's sets, checkpoints and files go by: the oldest named recipe training
    the task the same way, for the default recipe as for any named one."""
    for name in LABEL_RECIPES:
        tags = label_tags(name)
        assert set(tags) == set(PRIMARY_METRIC)
        for task, tag in tags.items():
            first = task_recipe(name, task)
            assert tag == f"individual-{first}" == label_tag(name, task)
            assert list(LABEL_RECIPES).index(first) <= list(LABEL_RECIPES).index(name)
            assert recipe_config(first, task) == recipe_config(name, task)
    assert label_tags("v3", ["pose"], kind="shared") == {"pose": "shared-v3"}
    assert task_recipe("v3", "semantic") == "v2" and task_recipe("v1", "pose") == "v1"


def test_label_archs_needs_a_tag_for_every_task(tmp_path: Path) -> None:
    """A per-task tag mapping must name every task: refused before anything is trained."""
    db = tmp_path / "n.db"
    with pytest.raises(ValueError, match="no label tag for task 'pose'"):
        label_archs(
            db, ["family:ofa_pn:0"], ["classification", "pose"], TINY,
            tag={"classification": "a"}, width=16, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="non-empty one-line"):
        label_archs(db, ["family:ofa_pn:0"], ["pose"], TINY, tag={"pose": ""}, progress=False)
    with pytest.raises(ValueError, match="joins label sets"):  # -acc_mode's A+B
        label_archs(db, ["family:ofa_pn:0"], ["pose"], TINY, tag="a+b", progress=False)
    assert not db.exists() or not inventory(db)


def test_pseudo_label_benchmark_names_sets_per_task() -> None:
    """benchmarks/pseudo_labels.py under v3 reuses v2's classification sets (those in
    data/task_labels.db) and gives pose sets of its own."""
    import argparse

    from script_helpers import load_script

    bench = load_script("benchmarks/pseudo_labels.py", "pseudo_labels_bench")
    args = argparse.Namespace(
        recipe="v3", pool=4, head_steps=200, mode="swap", ft_epochs=1, seed=7, truth_repeats=1
    )
    assert bench.tags(args, "ofa_mbv3", "classification") == {
        "individual": "individual-v2",
        "shared": "shared-v2-ft1-s7-p4s200swap",
        "scratch": "scratch-v2-ft1-s7",
    }
    pose = bench.tags(args, "ofa_mbv3", "pose")
    assert pose["individual"] == "individual-v3" and pose["shared"].startswith("shared-v3-")
    # a ground truth averaging 2 seeds is a set of its own, named as the store command names
    # `-repeats 2` labels; the pseudo-label sets stay where they were
    args.truth_repeats = 2
    two = bench.tags(args, "ofa_mbv3", "pose")
    cgs = load_script("scripts/run_train_cgs_on_task.py", "run_train_cgs_recipes")
    assert two["individual"] == cgs.default_tag("v3", "pose", {"repeats": 2}, shared=False)
    assert two["individual"].startswith("individual-v3-") and two["shared"] == pose["shared"]
    assert label_tag("v3", "pose", overrides={}) == "individual-v3"


def test_v4_inherits_from_the_supernet_and_names_it() -> None:
    """v4 starts every backbone from the family supernet, frozen; its recipe id names the
    supernet's settings, so labels from another supernet never join its sets."""
    from dataclasses import replace

    from aiop.tasks import supernet

    for task in PRIMARY_METRIC:
        cfg = recipe_config("v4", task)
        assert cfg.init == "supernet" and not cfg.train_backbone
        assert label_tag("v4", task) == "individual-v4"
        scratch = replace(cfg, init="scratch")
        assert recipe_id(scratch, task, 64) != recipe_id(cfg, task, 64)
    assert recipe_config("v4", "classification").val_split == "val+test"
    base = recipe_id(recipe_config("v4", "pose"), "pose", 64)
    real = supernet.supernet_config
    try:
        supernet.supernet_config = lambda family: supernet.SupernetConfig(family, epochs=9)
        assert recipe_id(recipe_config("v4", "pose"), "pose", 64) != base
    finally:
        supernet.supernet_config = real


def test_v5_moves_only_the_instance_cut_and_keeps_v4s_other_sets() -> None:
    from aiop.tasks.recipes import label_tag
    from aiop.tasks.train import BACKGROUND_WEIGHT

    assert recipe_config("v5", "instance").mask_threshold == pytest.approx(1 / 1.1)
    assert recipe_config("v5", "instance").mask_threshold == 1 / (1 + BACKGROUND_WEIGHT)
    for task in ("classification", "semantic", "detection", "panoptic", "pose"):
        assert recipe_config("v5", task) == recipe_config("v4", task)
        assert label_tag("v5", task) == "individual-v4"
    assert label_tag("v5", "instance") == "individual-v5"


def test_the_mask_cut_changes_instance_masks_only_where_predict_cuts(monkeypatch) -> None:
    """predict's mask_threshold is where the foreground handed to instance_masks is cut: a
    higher cut keeps a strict subset of the pixels, and the boxes do not move."""
    import torch

    from aiop.tasks import train as task_train
    from aiop.tasks.train import TrainConfig, build_task_model, make_loader, predict

    model = build_task_model("family:ofa_pn:0", "instance", resolution=32)
    model.eval()
    loader = make_loader("instance", "val", TrainConfig(resolution=32), shuffle=False, n=4)
    seen: dict[float, list[torch.Tensor]] = {}
    real = task_train.instance_masks
    cut = [0.0]

    def spy(det, fg):
        seen.setdefault(cut[0], []).append(fg.clone())
        return real(det, fg)

    monkeypatch.setattr(task_train, "instance_masks", spy)
    boxes = {}
    for cut[0] in (0.5, 1 / 1.1):
        preds, _ = predict(model, loader, mask_threshold=cut[0])
        boxes[cut[0]] = [p["boxes"] for p in preds]
    low, high = seen[0.5], seen[1 / 1.1]
    assert len(low) == len(high) == 4
    assert all(bool((h <= lo).all()) for h, lo in zip(high, low, strict=True))  # a subset
    assert sum(int(m.sum()) for m in high) < sum(int(m.sum()) for m in low)
    assert all(torch.equal(a, b) for a, b in zip(*boxes.values(), strict=True))


def test_unweighted_semantic_decode_undoes_the_background_weight() -> None:
    """semantic_argmax(unweighted=True) is the argmax of the posterior the loss's background
    weight distorts: a pixel whose digit logit beats the background by less than
    log(1 / BACKGROUND_WEIGHT) is background again; the flag is a recipe field only when on."""
    import torch

    from aiop.tasks.train import BACKGROUND_WEIGHT, semantic_argmax

    gap = math.log(1 / BACKGROUND_WEIGHT)
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, 1, 0] = torch.tensor([0.5 * gap, 1.5 * gap, -1.0])  # digit 1 vs background 0
    assert semantic_argmax(logits, 1).tolist() == [[[1, 1, 0]]]
    assert semantic_argmax(logits, 1, unweighted=True).tolist() == [[[0, 1, 0]]]
    assert semantic_argmax(logits[0], 0, unweighted=True).tolist() == [[0, 1, 0]]
    assert torch.equal(logits[0, 0], torch.zeros(1, 3))  # the caller's logits are untouched
    v4 = recipe_config("v4", "semantic").to_dict()
    base = recipe_id(v4, "semantic", 64)
    assert recipe_id({**v4, "unweight_semantic": False}, "semantic", 64) == base
    assert recipe_id({**v4, "unweight_semantic": True}, "semantic", 64) != base


def test_corrupted_held_out_digits_are_a_harder_set_of_the_same_digits() -> None:
    """eval_corruption: the held-out digits under the fifteen corruptions in turn, the same
    labels, deterministic; refused for scene tasks and for a severity outside 1-5; a recipe
    field only when set."""
    import torch

    from aiop.tasks.corruptions import CORRUPTIONS
    from aiop.tasks.train import TrainConfig, make_loader

    cfg = TrainConfig(resolution=32)
    clean = make_loader("classification", "val+test", cfg, shuffle=False, n=40).dataset
    hard = make_loader("classification", "val+test", cfg, shuffle=False, n=40, corruption=3)
    again = make_loader("classification", "val+test", cfg, shuffle=False, n=40, corruption=3)
    pairs = list(zip(clean, hard.dataset, again.dataset, strict=True))
    assert len(pairs) == 40 and len(CORRUPTIONS) < 40
    assert all(torch.equal(c[1], h[1]) for c, h, _ in pairs)  # the same digits and labels
    assert all(torch.equal(h[0], a[0]) for _, h, a in pairs)  # deterministic
    changed = [not torch.allclose(c[0], h[0]) for c, h, _ in pairs]
    assert sum(changed) >= 35  # (a corruption may leave a blank corner of a digit alone)
    with pytest.raises(ValueError, match="not 'semantic'"):
        make_loader("semantic", "val", cfg, shuffle=False, n=4, corruption=3)
    with pytest.raises(ValueError, match="severity 1-5"):
        TrainConfig(eval_corruption=7)
    v4 = recipe_config("v4", "classification").to_dict()
    base = recipe_id(v4, "classification", 64)
    assert recipe_id({**v4, "eval_corruption": None}, "classification", 64) == base
    assert recipe_id({**v4, "eval_corruption": 3}, "classification", 64) != base


def test_v6_moves_only_classification_onto_corrupted_digits() -> None:
    assert recipe_config("v6", "classification").eval_corruption == 4
    assert label_tag("v6", "classification") == "individual-v6"
    for task in ("detection", "semantic", "panoptic", "pose"):
        assert label_tag("v6", task) == "individual-v4"
    assert label_tag("v6", "instance") == "individual-v5"
