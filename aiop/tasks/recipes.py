"""Label recipes: how an architecture is trained for its accuracy label, named and hashed.

A label is only comparable with labels made by the same recipe (epochs,
samples, batch, learning rate, resolution, validation size, head width …), so
every stored label carries its recipe id (:func:`recipe_id`) and a label set
(the store's ``mode``, the scripts' ``-tag``) holds one recipe only
(:func:`aiop.tasks.labels.label_archs` refuses to mix them).

:data:`LABEL_RECIPES` names the recipes the project documents: ``v1`` is the
first one (2 epochs of 1,000 samples, 300 validation items), ``v2`` the one the
seed-noise study chose (``benchmarks/task_labels.py --noise``): classification
labels are the mean of two 1-epoch trainings measured on all 500 validation
digits, pose trains on 600 figures (the largest ofa_resnet backbones ran past
60 s), the scene tasks keep ``v1``'s training and are measured on 500 validation
scenes (their seed noise is already smaller than the spread between architectures). ``v3``
is ``v2`` with a pose setting that fits one CPU minute on the largest ofa_resnet
(``benchmarks/results/task_labels_v3_pose.md``); every other task trains as under ``v2``,
so its recipe id, and the labels already made with it, stay the same. ``v4`` trains as
``v3`` but starts every backbone from its slice of the family's weight-sharing supernet
(:mod:`aiop.tasks.supernet`) and trains only the head — AIO-P's setting, where backbones
came pretrained from OFA — which makes labels measure the architecture rather than one
initialisation (ICC(1) 0.76–0.82 against 0–0.60). ``v5`` is ``v4`` with instance masks cut
where the unweighted foreground posterior passes 0.5 (instance ICC(1) −0.06 → 0.76); every
other task is ``v4``'s. ``v6``, the default (:data:`DEFAULT_RECIPE`), is ``v5`` with
classification measured on the held-out digits under CIFAR-10-C's fifteen corruptions at
severity 4 (ofa_resnet's ICC(1) −0.09 → 0.97, ofa_mbv3 0.82 → 0.91, ofa_pn 0.92 → 0.95).

A named recipe never changes once labels exist (``tests/test_tasks_recipes.py`` pins
every named recipe's id per task): a new setting is a new name. The default tag of
a recipe for a task, :func:`label_tag`, is ``individual-<name>`` of the oldest
named recipe that trains the task the same way (or ``individual-<hash>`` for an
unnamed one), so labels made by different recipes never share a tag, and labels
made by the same recipe share one whatever the recipe's name (``v3``'s
classification labels join ``individual-v2``). Every label writer and reader goes by it
per task (:func:`label_tags`): ``run_train_cgs_on_task.py``'s default tags, the
predictor's :data:`aiop.predictor.train.ACC_MODE`, the label benchmarks; a new recipe
therefore needs nothing but its entry in :data:`LABEL_RECIPES` (and its pinned ids).

:func:`reliability` is the study's statistic: with every architecture trained
under several seeds, the intraclass correlation ICC(1) is the share of a
label's variance that belongs to the architecture rather than to the seed — the
expected Spearman-like agreement between two independent labellings of the
same architectures; Spearman–Brown gives the reliability of a mean over ``k``
seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from aiop.tasks.train import BACKGROUND_WEIGHT, DEFAULT_RESOLUTION, TrainConfig

# TrainConfig fields that change what a label measures. ``seed`` is left out on purpose:
# labels of the same recipe under different seeds are replicates (the noise study's unit);
# ``max_seconds`` only matters when a run stops early, which the label records itself.
RECIPE_FIELDS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "resolution",
    "n_train",
    "n_val",
    "data_seed",
    "train_backbone",
    "repeats",
    "val_split",
    "init",
    # where an instance mask's foreground is cut (sigmoid of the mask logit); left out of the
    # id at 0.5, the cut of every label made before the setting existed
    "mask_threshold",
    # semantic maps from the unweighted posterior; left out when off (every label before it)
    "unweight_semantic",
    # severity of the corruptions on the held-out digits; left out when clean
    "eval_corruption",
)


def _v1(task: str) -> TrainConfig:
    return TrainConfig(epochs=2, n_train=1000, n_val=300).for_task(task)


def _v2(task: str) -> TrainConfig:
    # chosen by the seed-noise study (benchmarks/results/task_label_noise.md), see README
    if task == "classification":
        # the mean of two 1-epoch trainings (seeds 0, 1): at the CPU of one 2-epoch training,
        # reliability 0.65 against 0.41 (ICC(1) of 1 and 2 epochs: 0.48 / 0.41 over 8 ofa_mbv3
        # architectures); the largest ofa_resnet affords no more than 2 epochs' CPU in 60 s
        return TrainConfig(epochs=1, n_train=1000, n_val=500, repeats=2).for_task(task)
    if task == "pose":
        # 600 figures instead of 1,000: the largest ofa_resnet backbones at 64 px spend
        # ~50 ms of CPU per figure and step, so 2 x 1,000 figures ran past 60 s
        return TrainConfig(epochs=2, n_train=600, n_val=300).for_task(task)
    # scene tasks: v1's training, measured on 500 validation scenes as in the study (semantic
    # ICC(1) 0.60: seed SD 0.011 against 0.015 between architectures)
    return TrainConfig(epochs=2, n_train=1000, n_val=500).for_task(task)


def _v3(task: str) -> TrainConfig:
    if task == "pose":
        # 500 figures at 64 px: ofa_resnet:16, the largest backbone, took 62.5 CPU s on v2's
        # 600 and 55.1 s on 500 (benchmarks/results/task_labels_v3_pose.md). PCK 0.36 / 0.39
        # on ofa_resnet:16 / :0 (v2: 0.37 / 0.39), 0.28 on 5 ofa_mbv3 x 2 seeds (v2: 0.35);
        # under both, seed noise outweighs the spread between architectures (ICC ~ 0,
        # benchmarks/results/task_labels_pose_noise.md). 48 px on 600 figures gave 0.31 / 0.29
        # on the two ofa_resnet at about the same CPU (one run each, see the README).
        return TrainConfig(epochs=2, n_train=500, n_val=300).for_task(task)
    return _v2(task)  # unchanged: same ids, the same label sets


def _v4(task: str) -> TrainConfig:
    # every backbone starts from its slice of the family's supernet (aiop.tasks.supernet) and
    # stays frozen; only the task head trains. From scratch one training's ICC(1) was 0.48
    # (classification), 0.60 (semantic), about 0 (pose); under v4, on 12 ofa_mbv3 x 2 seeds,
    # 0.82 / 0.76 / 0.76 at 5 / 11 / 6 CPU s a label (benchmarks/results/task_label_noise_v4.md).
    # Fine-tuning the backbone too (lr 3e-3) was as noisy as from scratch (ICC 0.16).
    cfg = replace(_v3(task), init="supernet", train_backbone=False)
    if task == "classification":
        # one training (the seed barely matters now), measured on all 1,500 held-out digits
        return replace(cfg, epochs=1, repeats=1, n_val=None, val_split="val+test")
    return cfg


def _v5(task: str) -> TrainConfig:
    # v4, with instance masks cut where the unweighted foreground posterior passes 0.5: the
    # mask loss weighs background BACKGROUND_WEIGHT (0.1), so sigmoid > 0.5 kept every pixel
    # above p = 1/11, a seed-dependent halo around 1-3 px strokes that put mask IoU on AP's
    # 0.5 cliff. Cut at 1 / (1 + BACKGROUND_WEIGHT): ICC(1) -0.06 -> 0.76 on 14 ofa_mbv3 x 2
    # seeds at the same CPU (benchmarks/results/task_label_noise_v5_instance.md). Every other
    # task trains and is measured as under v4 (same ids, the individual-v4 sets).
    cfg = _v4(task)
    if task == "instance":
        return replace(cfg, mask_threshold=1 / (1 + BACKGROUND_WEIGHT))
    return cfg


def _v6(task: str) -> TrainConfig:
    # v5, with classification measured on the held-out digits under CIFAR-10-C's fifteen
    # corruptions in turn at severity 4 (TrainConfig.eval_corruption): on clean digits the
    # ofa_resnet supernet's subnets all score 0.977 +- 0.002 and one label was pure seed noise
    # (ICC(1) -0.09 on 12 ofa_resnet x 2 seeds); under the corruptions ICC(1) 0.97, mean 0.86
    # (benchmarks/results/task_label_noise_v4c_resnet.md). Training unchanged.
    cfg = _v5(task)
    if task == "classification":
        return replace(cfg, eval_corruption=4)
    return cfg


LABEL_RECIPES: dict[str, Any] = {
    "v1": _v1,
    "v2": _v2,
    "v3": _v3,
    "v4": _v4,
    "v5": _v5,
    "v6": _v6,
}
# The recipe labels are made with and the predictor learns from. Every writer and reader
# names its label set per task with label_tag (run_train_cgs_on_task.py's default tags,
# aiop.predictor.train.ACC_MODE, the benchmarks), so changing it moves only the tasks the
# new recipe trains differently onto new sets. v4 trains every task differently (inherited,
# frozen backbones), so every task moved to individual-v4; the v2/v3 sets stay as history.
# v5 changes only how instance masks are cut: instance moves to individual-v5, every other
# task stays on individual-v4. v6 measures classification on corrupted held-out digits, where
# v4's clean top-1 of ofa_resnet was seed noise (ICC -0.09 -> 0.97): classification moves to
# individual-v6, every other task stays where v5 put it.
DEFAULT_RECIPE = "v6"


def recipe_config(name: str, task: str) -> TrainConfig:
    """The :class:`TrainConfig` of recipe ``name`` for ``task`` (resolution filled in)."""
    from aiop.tasks.heads import HeadError

    if name not in LABEL_RECIPES:
        raise HeadError(f"unknown label recipe {name!r}; valid: {', '.join(LABEL_RECIPES)}")
    return LABEL_RECIPES[name](task)


def recipe_fields(
    cfg: TrainConfig | Mapping[str, Any],
    task: str,
    width: int,
    shared: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe-defining fields of a training config (a dataclass or its stored dict);
    ``shared`` identifies the shared head a pseudo-label fine-tunes from."""
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    out = {k: d.get(k) for k in RECIPE_FIELDS}
    if out["repeats"] is None:  # labels stored before repeats existed were trained once
        out["repeats"] = 1
    if out["val_split"] is None:  # ... and measured on the validation split
        out["val_split"] = "val"
    if out["init"] in (None, "scratch"):  # labels from before init existed: from scratch
        del out["init"]  # (left out, so their recipe ids stay what they were)
    elif out["init"] == "supernet":  # which supernet settings the backbones inherit from
        from aiop.tasks.supernet import supernet_config

        out["init"] = f"supernet:{supernet_config('ofa_mbv3').settings_key()}"
    # v1-v4's cut (None in dicts stored before the field existed): left out, so ids stay
    if out["mask_threshold"] in (None, 0.5):
        del out["mask_threshold"]
    if not out["unweight_semantic"]:  # likewise: argmax of the logits, every recipe so far
        del out["unweight_semantic"]
    if not out["eval_corruption"]:  # likewise: clean held-out digits
        del out["eval_corruption"]
    if out["resolution"] is None:
        out["resolution"] = DEFAULT_RESOLUTION[task]
    out["head_width"] = width
    if shared is not None:
        out["shared_head"] = dict(shared)
    return out


def recipe_id(
    cfg: TrainConfig | Mapping[str, Any],
    task: str,
    width: int,
    shared: Mapping[str, Any] | None = None,
) -> str:
    """A short content hash of the recipe (stable across runs and machines)."""
    blob = json.dumps(recipe_fields(cfg, task, width, shared), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def recipe_name(cfg: TrainConfig, task: str, width: int) -> str:
    """The name of ``cfg``'s recipe in :data:`LABEL_RECIPES`, else its hash."""
    from aiop.tasks.heads import DEFAULT_WIDTH

    rid = recipe_id(cfg, task, width)
    if width == DEFAULT_WIDTH:
        for name in LABEL_RECIPES:
            if recipe_id(recipe_config(name, task), task, width) == rid:
                return name
    return rid


def task_recipe(name: str, task: str) -> str:
    """The oldest named recipe that trains ``task`` as recipe ``name`` does (``v2`` for
    ``("v3", "classification")``, ``v3`` for ``("v3", "pose")``): what names the task's label
    sets, checkpoints and files, so that an unchanged task keeps its old ones."""
    from aiop.tasks.heads import DEFAULT_WIDTH

    return recipe_name(recipe_config(name, task), task, DEFAULT_WIDTH)


def label_tag(
    name: str, task: str, kind: str = "individual", overrides: Mapping[str, Any] | None = None
) -> str:
    """The default label-set tag of recipe ``name`` for ``task``: ``<kind>-<first named
    recipe that trains the task the same way>`` (``label_tag("v3", "classification")`` is
    ``individual-v2``, ``label_tag("v3", "pose")`` is ``individual-v3``), plus a hash of
    ``overrides`` (``TrainConfig`` field → value) when there are any, so labels trained
    with other settings never share a set with the recipe's."""
    tag = f"{kind}-{task_recipe(name, task)}"
    if overrides:
        blob = json.dumps(dict(overrides), sort_keys=True)
        tag += "-" + hashlib.sha256(blob.encode()).hexdigest()[:6]
    return tag


def label_tags(
    name: str, tasks: Sequence[str] | None = None, kind: str = "individual"
) -> dict[str, str]:
    """``{task: label_tag(name, task, kind)}`` for ``tasks`` (default: every task)."""
    from aiop.tasks.heads import TASKS

    return {t: label_tag(name, t, kind) for t in (TASKS if tasks is None else tasks)}


def with_recipe(cfg: TrainConfig, name: str, task: str) -> TrainConfig:
    """``cfg``'s seed on recipe ``name``'s settings."""
    return replace(recipe_config(name, task), seed=cfg.seed)


@dataclass
class Reliability:
    """How much of a label is the architecture and how much the seed."""

    n_archs: int
    n_seeds: float  # mean replicates per architecture
    grand_mean: float
    between_sd: float  # SD of the per-architecture means
    within_sd: float  # pooled SD across seeds of one architecture
    icc: float  # ICC(1): share of a single label's variance due to the architecture
    snr: float  # between-architecture SD / seed SD (inf when the seed changes nothing)

    def spearman_brown(self, k: int) -> float:
        """Reliability of the mean of ``k`` seeds' labels."""
        if math.isnan(self.icc):
            return math.nan
        icc = max(self.icc, 0.0)
        return k * icc / (1 + (k - 1) * icc)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in d.items()
        }


def reliability(values: Mapping[str, Sequence[float]]) -> Reliability:
    """One-way random-effects ANOVA over ``{architecture: [label per seed]}``.

    ICC(1) = (MSB − MSW) / (MSB + (k₀ − 1)·MSW) with k₀ the (unbalanced-design)
    effective group size; architectures with one label add to the between part only.
    """
    groups = [list(map(float, v)) for v in values.values() if len(v) > 0]
    a = len(groups)
    n = sum(len(g) for g in groups)
    if a < 2 or n <= a:
        raise ValueError("reliability needs >= 2 architectures and some with >= 2 seeds")
    grand = sum(sum(g) for g in groups) / n
    means = [sum(g) / len(g) for g in groups]
    ssb = sum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means, strict=True))
    ssw = sum((x - m) ** 2 for g, m in zip(groups, means, strict=True) for x in g)
    msb = ssb / (a - 1)
    msw = ssw / (n - a)
    k0 = (n - sum(len(g) ** 2 for g in groups) / n) / (a - 1)
    denom = msb + (k0 - 1) * msw
    icc = (msb - msw) / denom if denom > 0 else math.nan
    mean_of_means = sum(means) / a
    between_sd = math.sqrt(sum((m - mean_of_means) ** 2 for m in means) / (a - 1))
    within_sd = math.sqrt(msw)
    snr = between_sd / within_sd if within_sd > 0 else math.inf
    return Reliability(
        n_archs=a,
        n_seeds=n / a,
        grand_mean=grand,
        between_sd=between_sd,
        within_sd=within_sd,
        icc=icc,
        snr=snr,
    )
