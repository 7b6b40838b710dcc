"""Training data from a store, family splits, fine-tuning and evaluation of predictors.

* :func:`load_samples` turns a store's labels into :class:`Sample` objects;
* :func:`split_by_family` and :func:`leave_one_family_out` hold families out
  the AIO-P way (``-family_test A#20+B#20``), with held-out sets that do not
  depend on the training seed (AIO-P's changed per seed);
* :func:`finetune` fine-tunes a copy of a fitted predictor;
* :func:`collect_predictions` / :func:`evaluate` score any object with
  ``predict(cg, configs)`` (a :class:`Predictor`, a K-adapter predictor or
  :class:`AnalyticPredictor`, the analytic-memory ablation).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from aiop.cg.graph import ComputeGraph
from aiop.mconfig import MConfig
from aiop.predictor.analytic import PlanCache, estimate_memory
from aiop.predictor.api import FitReport, Predictor, Sample
from aiop.predictor.latency import LatencyModel, fit_latency_constants, latency_terms
from aiop.predictor.metrics import regression_metrics
from aiop.predictor.model import GNNSpec
from aiop.predictor.normalize import Normalizer

log = logging.getLogger(__name__)

# Which task-label set (the store's ``mode``, a tag) each task's accuracy targets learn from:
# one tag for every task (a str), every set (None / "any"), or per task (a mapping that
# overrides ACC_MODE: tasks it does not name take its ``ANY_TASK`` entry if any, else their
# ACC_MODE set; "any" as a tag means every set of that task).
AccMode = str | Mapping[str, str] | None
ANY_TASK = "*"
# joins seed replicates of one recipe in a tag (``individual-v6+replicate-s1``): their mean
REPLICATE_JOIN = "+"


def default_acc_mode() -> dict[str, str]:
    """Each task's ground truth under aiop.tasks' current recipe: ``label_tag(DEFAULT_RECIPE,
    task)`` (with v3: ``individual-v2`` for classification, ``individual-v3`` for pose)."""
    from aiop.tasks.recipes import DEFAULT_RECIPE, label_tags

    return label_tags(DEFAULT_RECIPE)


ACC_MODE: Mapping[str, str] = MappingProxyType(default_acc_mode())
# Store label kinds that are not task metrics.
_NON_METRIC_KINDS = frozenset({"peak_memory_bytes", "latency_s", "flops", "params"})
# Where each target's prediction sits in a ``Predictor.predict`` result.
_PRED_KEYS = {"memory": "peak_memory_bytes", "latency": "latency_s", "flops": "flops_predicted"}
# Targets that belong to the architecture, not to an m-configuration: scored once per graph.
_PER_GRAPH = ("flops",)

GNN_SETTINGS: dict[str, Any] = {
    "default": GNNSpec,
    "aiop": GNNSpec.aiop_baseline,
}


class SplitError(ValueError):
    """A family split cannot be made (unknown family, malformed spec, too few architectures)."""


class AccModeError(ValueError):
    """A malformed ``-acc_mode`` (see :func:`parse_acc_mode`)."""


# -- accuracy label sets ---------------------------------------------------------------------------
_ACC_NAME = re.compile(r"^[A-Za-z0-9_.:+\-]+$")


def acc_tag(acc_mode: AccMode, task: str) -> str | None:
    """The label set ``task``'s metrics come from under ``acc_mode``: a tag, None for every
    set, or ``""`` (untagged labels only) for a task neither the mapping nor :data:`ACC_MODE`
    names (one aiop.tasks does not train, e.g. from an imported AIO-P cache)."""
    if acc_mode is None or isinstance(acc_mode, str):
        tag: str | None = acc_mode
    elif task in acc_mode:
        tag = acc_mode[task]
    else:
        tag = acc_mode.get(ANY_TASK, ACC_MODE.get(task, ""))
    return None if tag == "any" else tag


def acc_tags(acc_mode: AccMode, tasks: Sequence[str]) -> dict[str, str]:
    """``{task: tag}`` of ``tasks`` for a result file (``"any"``: every set, ``""``: untagged
    labels only)."""
    out = {}
    for task in tasks:
        tag = acc_tag(acc_mode, task)
        out[task] = "any" if tag is None else tag
    return out


def parse_acc_mode(items: str | Sequence[str]) -> AccMode:
    """The scripts' ``-acc_mode``: ``any`` (every set: None), one ``TAG`` (that set for every
    task: the str), or ``TASK=TAG`` pairs (space- or comma-separated: a mapping, whose tasks'
    sets replace their :data:`ACC_MODE` ones); a bare ``TAG`` among pairs replaces every other
    task's set as well (``individual pose=individual-v3``). ``TASK=any`` takes every set of
    that task. ``A+B`` in place of a tag is the mean of sets ``A`` and ``B``, seed replicates
    of one recipe (``classification=individual-v6+replicate-v6-seed1``), over the
    architectures both labelled."""
    given = [items] if isinstance(items, str) else list(items)
    tokens = [t.strip() for item in given for t in item.split(",") if t.strip()]
    usage = "expected any, TAG, or TASK=TAG[,TASK=TAG...] (TAG may be A+B: their mean)"
    if not tokens:
        raise AccModeError(f"-acc_mode is empty; {usage}")
    bare = [t for t in tokens if "=" not in t]
    if len(bare) > 1:
        raise AccModeError(f"-acc_mode names more than one tag for every task: {', '.join(bare)}")
    pairs: dict[str, str] = {}
    for token in tokens:
        if "=" not in token:
            continue
        task, _, tag = (x.strip() for x in token.partition("="))
        if not task or not tag or "=" in tag:
            raise AccModeError(f"malformed -acc_mode item {token!r}; {usage}")
        if task in pairs:
            raise AccModeError(f"-acc_mode names task {task!r} twice")
        pairs[task] = tag
    for name in [*bare, *pairs, *pairs.values()]:
        if name != ANY_TASK and not _ACC_NAME.match(name):
            raise AccModeError(f"-acc_mode: bad task or tag {name!r}; {usage}")
    for name in [*bare, *pairs.values()]:
        parts = name.split(REPLICATE_JOIN)
        if len(parts) > 1 and (
            not all(parts) or ANY_TASK in parts or "any" in parts or len(set(parts)) < len(parts)
        ):
            raise AccModeError(f"-acc_mode: {name!r} must join distinct tags, A+B; {usage}")
    if not pairs:
        return None if bare[0] == "any" else bare[0]
    return {ANY_TASK: bare[0], **pairs} if bare else pairs


def format_acc_mode(acc_mode: AccMode) -> str:
    """The canonical ``-acc_mode`` text of ``acc_mode`` (:func:`parse_acc_mode`'s inverse)."""
    if acc_mode is None:
        return "any"
    if isinstance(acc_mode, str):
        return acc_mode
    items = [f"{t}={g}" for t, g in sorted(acc_mode.items()) if t != ANY_TASK]
    if ANY_TASK in acc_mode:
        items.insert(0, acc_mode[ANY_TASK])
    return ",".join(items)


# -- loading ------------------------------------------------------------------------------------
def _mean_of_replicates(
    replicates: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    recipes: Mapping[str, Mapping[str, str]],
    tag_of: Mapping[str, str | None],
) -> dict[tuple[str, str], dict[str, float]]:
    """Each (graph, task) of an ``A+B`` label set: every metric averaged over the sets, for
    the architectures every set labelled (a mean over fewer seeds would be a noisier label
    of the same name). Sets of different recipes measure different things: refused."""
    for task, by_recipe in recipes.items():
        if len(by_recipe) > 1:
            made = ", ".join(f"{tag} ({rid})" for rid, tag in sorted(by_recipe.items()))
            raise AccModeError(
                f"-acc_mode {task}={tag_of[task]} averages label sets of different recipes "
                f"({made}); only seed replicates of one recipe can be averaged"
            )
    out: dict[tuple[str, str], dict[str, float]] = {}
    dropped: dict[str, int] = {}
    for (graph, task), by_tag in replicates.items():
        wanted = str(tag_of[task]).split(REPLICATE_JOIN)
        if any(t not in by_tag for t in wanted):
            dropped[task] = dropped.get(task, 0) + 1
            continue
        kinds = set.intersection(*(set(by_tag[t]) for t in wanted))
        out[(graph, task)] = {k: sum(by_tag[t][k] for t in wanted) / len(wanted) for k in kinds}
    for task, n in sorted(dropped.items()):
        log.info("%s: %d architectures lack a label in every set of %s", task, n, tag_of[task])
    return out


def _expand_targets(targets: Sequence[str], tasks: Sequence[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        if t == "acc":
            out += [f"acc:{task}" for task in tasks]
        elif t in ("memory", "latency", "flops") or t.startswith("acc:"):
            out.append(t)
        else:
            raise ValueError(f"unknown target {t!r}; choose memory, latency, flops, acc[:TASK]")
    return list(dict.fromkeys(out))


def _note_instance(instances: dict[tuple[str, str], set[str]], lab: Any) -> None:
    """Record which supernet instance an inherited ``acc`` label came from ("?": unrecorded)."""
    from aiop.tasks.supernet import label_supernet

    sha = label_supernet(lab.extra) if lab.kind == "acc" else None
    if sha is None:
        return
    parts = str(lab.extra.get("model", "")).split(":")
    family = parts[1] if len(parts) == 3 and parts[0] == "family" else "?"
    instances.setdefault((lab.task, family), set()).add(sha)


def _warn_mixed_instances(instances: dict[tuple[str, str], set[str]]) -> None:
    # two trained supernets rank a family's subnets differently (aiop.tasks.supernet): a set
    # that mixes them is mostly noise to an accuracy predictor
    for (task, family), shas in sorted(instances.items()):
        if len(shas) > 1:
            log.warning(
                "%s labels of %s come from %d supernet instances (%s), which rank subnets "
                "differently: train on one set (-acc_mode)",
                task,
                family,
                len(shas),
                ", ".join(sorted(shas)),
            )


def load_samples(
    store_path: str | Path,
    targets: Sequence[str] = ("memory", "latency", "flops"),
    device: str = "meta",
    mode: str = "meta",
    *,
    latency_device: str = "cpu",
    latency_mode: str = "real",
    families: Sequence[str] | None = None,
    acc_mode: AccMode = ACC_MODE,
) -> list[Sample]:
    """Samples of every (graph, configuration) with a label for one of ``targets``.

    ``memory`` comes from ``peak_memory_bytes`` records of ``device``/``mode``;
    ``latency`` from ``latency_s`` of ``latency_device``/``latency_mode`` (real
    CPU runs); ``flops`` and ``acc:<task>`` are per-architecture labels (config
    ``''``) joined onto every configuration of their graph; ``acc`` stands for
    every task in the store. A graph with only per-architecture labels gets
    one sample at the default configuration. A task's metrics come from the label set
    (the store's ``mode``: a tag such as ``individual-v2``) ``acc_mode`` names for it
    (:func:`acc_tag`; by default each task's set under the current label recipe), plus
    untagged labels (imported AIO-P caches), the tagged set winning where both exist —
    sets made by other recipes or by pseudo-labelling never mix — or from every set
    when it is None or ``"any"``. Missing targets are simply absent from
    ``Sample.labels``. Order: by graph fingerprint, then config spec.
    """
    from aiop.cache import Store

    tag_of: dict[str, str | None] = {}  # task -> its set (acc_tag), looked up once per task
    instances: dict[tuple[str, str], set[str]] = {}  # (task, family) -> supernet weights hashes
    # "A+B" sets: (graph, task) -> tag -> kind -> value, and task -> recipe id -> a tag with it
    replicates: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    recipes: dict[str, dict[str, str]] = {}
    with Store(store_path, readonly=True) as store:
        task_meta = store.tasks()
        metric_rows: dict[tuple[str, str], dict[str, float]] = {}  # (graph, task) -> kind -> v
        graph_labels: dict[str, dict[str, float]] = {}
        config_labels: dict[tuple[str, str], dict[str, float]] = {}
        for lab in store.labels(config=""):
            if lab.kind == "flops":
                # the profiler's own count (task '') wins over an imported per-task one
                if lab.task == "" or "flops" not in graph_labels.get(lab.graph, {}):
                    graph_labels.setdefault(lab.graph, {})["flops"] = lab.value
            elif lab.kind not in _NON_METRIC_KINDS and lab.task:
                if lab.task not in tag_of:
                    tag_of[lab.task] = acc_tag(acc_mode, lab.task)
                tag = tag_of[lab.task]
                if tag is not None and REPLICATE_JOIN in tag:
                    if lab.mode in tag.split(REPLICATE_JOIN):
                        key = (lab.graph, lab.task)
                        replicates.setdefault(key, {}).setdefault(lab.mode, {})[lab.kind] = (
                            lab.value
                        )
                        if lab.extra.get("recipe"):  # secondary metrics carry none
                            recipes.setdefault(lab.task, {}).setdefault(
                                str(lab.extra["recipe"]), lab.mode
                            )
                    continue
                if tag is not None and lab.mode not in (tag, ""):
                    continue
                metric_rows.setdefault((lab.graph, lab.task), {})[lab.kind] = lab.value
                _note_instance(instances, lab)
        _warn_mixed_instances(instances)
        metric_rows.update(_mean_of_replicates(replicates, recipes, tag_of))
        tasks = sorted({task for _, task in metric_rows})
        wanted = _expand_targets(targets, tasks)
        for (g, task), kinds in metric_rows.items():
            if f"acc:{task}" not in wanted:
                continue
            metric = task_meta.get(task, {}).get("metric") or "acc"
            kind = metric if metric in kinds else ("acc" if "acc" in kinds else sorted(kinds)[0])
            graph_labels.setdefault(g, {})[f"acc:{task}"] = kinds[kind]
        if "memory" in wanted:
            for rec in store.records(device=device, mode=mode, kinds=["peak_memory_bytes"]):
                if rec.task == "" and rec.config:
                    key = (rec.graph, rec.config)
                    config_labels.setdefault(key, {})["memory"] = rec.values["peak_memory_bytes"]
        if "latency" in wanted:
            for rec in store.records(device=latency_device, mode=latency_mode, kinds=["latency_s"]):
                if rec.task == "" and rec.config:
                    key = (rec.graph, rec.config)
                    config_labels.setdefault(key, {})["latency"] = rec.values["latency_s"]
        infos = {i.fingerprint: i for i in store.graphs()}
        per_graph_configs: dict[str, list[str]] = {}
        for g, spec in sorted(config_labels):
            per_graph_configs.setdefault(g, []).append(spec)
        samples: list[Sample] = []
        for fp in sorted(infos):
            info = infos[fp]
            family = str(info.meta.get("family", ""))
            if families is not None and family not in families:
                continue
            shared = {t: v for t, v in graph_labels.get(fp, {}).items() if t in wanted}
            specs = per_graph_configs.get(fp, [])
            if not specs and not shared:
                continue
            cg = store.get_graph(fp)
            cg.meta.setdefault("fp", fp)
            if info.meta.get("model"):  # the backbone: matches one architecture's task graphs
                cg.meta.setdefault("model", str(info.meta["model"]))
            if not specs:
                samples.append(Sample(cg, MConfig(), dict(shared), family))
                continue
            for spec in specs:
                labels = {**shared, **config_labels[(fp, spec)]}
                samples.append(Sample(cg, MConfig.parse(spec), labels, family))
    log.info("loaded %d samples of %d graphs from %s", len(samples), len(infos), store_path)
    return samples


def targets_present(samples: Sequence[Sample]) -> list[str]:
    """Targets that at least one sample has, in a stable order."""
    order = {"memory": 0, "latency": 1, "flops": 2}
    found = {t for s in samples for t in s.labels}
    return sorted(found, key=lambda t: (order.get(t, 3), t))


def families_of(samples: Sequence[Sample]) -> dict[str, int]:
    """Family → number of architectures (distinct graphs)."""
    graphs: dict[str, set[str]] = {}
    for s in samples:
        graphs.setdefault(s.family, set()).add(_fp(s.cg))
    return {f: len(g) for f, g in sorted(graphs.items())}


def _fp(cg: ComputeGraph) -> str:
    fp = cg.meta.get("fp")
    if not fp:
        fp = cg.fingerprint
        cg.meta["fp"] = fp
    return str(fp)


# -- splits ---------------------------------------------------------------------------------------
_TEST_ITEM = re.compile(r"^([A-Za-z0-9_.:\-]+?)(?:#(\d+))?$")


def parse_family_test(spec: str) -> list[tuple[str, int]]:
    """``"A#20+B"`` → ``[("A", 20), ("B", 0)]``; :class:`SplitError` when malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise SplitError("-family_test is empty; expected FAMILY[#N][+FAMILY[#N]...]")
    out: list[tuple[str, int]] = []
    for item in spec.strip().split("+"):
        m = _TEST_ITEM.match(item.strip())
        if not m:
            raise SplitError(
                f"malformed -family_test item {item!r}; expected FAMILY or FAMILY#N "
                "(e.g. ofa_pn#20)"
            )
        name, n = m.group(1), int(m.group(2) or 0)
        if any(name == f for f, _ in out):
            raise SplitError(f"family {name!r} is named twice in -family_test")
        out.append((name, n))
    return out


@dataclass
class FamilySplit:
    """Training samples, and per held-out family its fine-tune (``#N``) and test samples."""

    train: list[Sample]
    finetune: dict[str, list[Sample]] = field(default_factory=dict)
    test: dict[str, list[Sample]] = field(default_factory=dict)
    finetune_graphs: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Counts of samples and architectures, for logs and result files."""

        def archs(ss: Sequence[Sample]) -> int:
            return len({_fp(s.cg) for s in ss})

        return {
            "train": {"samples": len(self.train), "architectures": archs(self.train)},
            **{
                f: {
                    "finetune_samples": len(self.finetune.get(f, [])),
                    "finetune_architectures": archs(self.finetune.get(f, [])),
                    "test_samples": len(ts),
                    "test_architectures": archs(ts),
                }
                for f, ts in self.test.items()
            },
        }


def split_by_family(
    samples: Sequence[Sample],
    test: str,
    seed: int = 0,
    *,
    train_families: Sequence[str] | None = None,
    require_train: bool = True,
) -> FamilySplit:
    """Hold out the families of ``test`` (``"A#20+B#20"``).

    Of family A, ``N`` architectures (all their configurations) form the
    fine-tune set and the rest the test set. Which architectures is decided
    by ``seed`` and A's name only — pass the same ``seed`` for every training
    seed, so every seed sees the same held-out sets. Training uses
    ``train_families`` (default: every family not held out); with ``require_train=False``
    none may be left (a study of the held-out family's own pool).
    """
    known = families_of(samples)
    held = parse_family_test(test)
    for name, n in held:
        if name not in known:
            raise SplitError(
                f"unknown family {name!r} in -family_test; "
                f"the data has {', '.join(known) or 'none'}"
            )
        if n >= known[name]:
            raise SplitError(
                f"{name}#{n} holds out all {known[name]} architectures of {name}: nothing to test"
            )
    held_names = {name for name, _ in held}
    if train_families is None:
        train_set = set(known) - held_names
    else:
        train_set = set(train_families)
        for f in train_set:
            if f not in known:
                raise SplitError(
                    f"unknown family {f!r} in -family_train; the data has {', '.join(known)}"
                )
        if train_set & held_names:
            raise SplitError(
                f"family {sorted(train_set & held_names)[0]!r} is both trained on and held out"
            )
    if not train_set and require_train:
        raise SplitError("no family is left to train on")
    split = FamilySplit(train=[s for s in samples if s.family in train_set])
    for name, n in held:
        fams = sorted({_fp(s.cg) for s in samples if s.family == name})
        rng = random.Random(f"aiop-split:{seed}:{name}")  # str seeds are stable across runs
        chosen = set(rng.sample(fams, n)) if n else set()
        split.finetune[name] = [s for s in samples if s.family == name and _fp(s.cg) in chosen]
        split.test[name] = [s for s in samples if s.family == name and _fp(s.cg) not in chosen]
        split.finetune_graphs[name] = sorted(chosen)
    return split


def leave_one_family_out(
    samples: Sequence[Sample],
    families: Sequence[str] | None = None,
    n_finetune: int = 0,
    seed: int = 0,
) -> Iterator[tuple[str, FamilySplit]]:
    """For each family (default: all): train on the others, hold it out (``#n_finetune``)."""
    known = families_of(samples)
    for family in families or list(known):
        n = n_finetune if n_finetune < known.get(family, 0) else 0
        yield family, split_by_family(samples, f"{family}#{n}" if n else family, seed)


# -- training helpers --------------------------------------------------------------------------
def make_spec(setting: str) -> GNNSpec:
    """A fresh :class:`GNNSpec` for a named setting: ``default`` or ``aiop`` (AIO-P's baseline)."""
    if setting in GNN_SETTINGS:
        return GNN_SETTINGS[setting]()
    if setting in ("graphconv", "gine", "gatv2"):
        return GNNSpec(conv=setting)
    raise ValueError(
        f"unknown GNN setting {setting!r}; choose default, aiop, graphconv, gine, gatv2"
    )


def clone_predictor(pred: Predictor) -> Predictor:
    """An independent copy of a fitted predictor that shares its (read-only) featuriser cache."""
    new = copy.copy(pred)
    new.model = copy.deepcopy(pred.model)
    new.spec = copy.deepcopy(pred.spec)
    new.normalizers = copy.deepcopy(pred.normalizers)
    new.targets = list(pred.targets)
    new.error_quantiles = copy.deepcopy(pred.error_quantiles)
    new.meta = copy.deepcopy(pred.meta)
    # fitted readout heads are replaced, never modified: new dicts keep the clone's refits apart
    new.acc_readouts = dict(pred.acc_readouts)
    return new


def finetune(
    pred: Predictor,
    samples: Sequence[Sample],
    epochs: int,
    *,
    lr: float | None = None,
    batch_size: int = 8,
    params: str = "all",
    relevel: bool | str = False,
    rank_weight: float = 0.0,
    select_folds: int = 0,
    seed: int | None = None,
) -> Predictor:
    """A copy of ``pred`` fine-tuned on ``samples``.

    The defaults are AIO-P's fine-tune (all parameters, normalisers kept, MSE, ``lr / 10``);
    AIO-P fine-tunes with batch 1, a small batch keeps the many configurations of each held-out
    architecture affordable. For ranking a new family's architectures:

    * ``params``: ``heads`` or ``last`` train only the target heads (their last layer);
    * ``relevel``: :func:`relevel_acc` first (True or ``"moments"``; ``"fit"``: its least-squares
      mode), so accuracy targets are fitted at the family's level and spread instead of
      spending the fine-tune on shifting every output;
    * ``rank_weight``: adds that weight times a pairwise logistic ranking loss (RankNet) over
      the batch's accuracy targets to the MSE;
    * ``select_folds`` (≥ 2): chooses the number of epochs (0 … ``epochs``, 0 keeping the
      re-levelled zero-shot predictor) by the out-of-fold SRCC of the accuracy targets over a
      ``select_folds``-fold split of the fine-tune architectures, then fine-tunes on all of
      them for that many epochs of the same schedule (early stopping without the test set).
    """
    if params not in FT_PARAMS:
        raise ValueError(f"unknown fine-tune params {params!r}; choose {', '.join(FT_PARAMS)}")
    new = clone_predictor(pred)
    new.epochs = epochs
    new.batch_size = batch_size
    new.lr = lr if lr is not None else pred.lr / 10
    labelled = [s for s in samples if any(t in s.labels for t in new.targets)]
    custom = params != "all" or relevel or rank_weight > 0 or select_folds >= 2
    if not custom:  # AIO-P's fine-tune, bit for bit as before
        if epochs > 0 and labelled:
            new.fit(labelled, finetune=True)  # refits the accuracy readout head on the union too
        elif labelled:
            new.fit_acc_readout(labelled, extend=True)
        return new
    seed = pred.seed if seed is None else seed
    stop = epochs
    if select_folds >= 2 and epochs > 0 and labelled:
        stop, curve = _select_epochs(
            new, labelled, epochs, params, rank_weight, select_folds, seed, relevel
        )
        new.meta.setdefault("finetune_selection", []).append(
            {"epochs": epochs, "chosen": stop, "oof_srcc": curve}
        )
    if relevel and labelled:
        relevel_acc(new, labelled, "moments" if relevel is True else str(relevel))
    if stop > 0 and labelled:
        _finetune_loop(new, labelled, epochs, stop, params, rank_weight, seed)
    if labelled:
        new.fit_acc_readout(labelled, extend=True)
    new.meta.setdefault("finetune", []).append(
        {
            "epochs": stop,
            "lr": new.lr,
            "params": params,
            "relevel": relevel,
            "rank_weight": rank_weight,
            "samples": len(labelled),
        }
    )
    return new


def _trainable(model: Any, params: str) -> list[Any]:
    """The parameters a ``params`` fine-tune updates (see :data:`FT_PARAMS`)."""
    if params == "all":
        return list(model.parameters())
    heads = model.heads if hasattr(model, "heads") else None
    if heads is None:  # a K-adapter network: the adapters' heads
        heads_list = [a.heads for a in model.adapters]
    else:
        heads_list = [heads]
    out = []
    for h in heads_list:
        for mlp in h.values():
            layers = list(mlp.parameters()) if params == "heads" else list(mlp[-1].parameters())
            out += layers
    return out


def pairwise_rank_loss(pred: Any, target: Any, groups: Any | None = None) -> Any:
    """RankNet's loss ``log(1 + exp(−(p_i − p_j)))`` averaged over the pairs with
    ``target_i > target_j`` (of the same group, when ``groups`` is given); None without pairs."""
    import torch

    diff_t = target[:, None] - target[None, :]
    mask = diff_t > 0
    if groups is not None:
        mask = mask & (groups[:, None] == groups[None, :])
    if not bool(mask.any()):
        return None
    diff_p = pred[:, None] - pred[None, :]
    return torch.nn.functional.softplus(-diff_p[mask]).mean()


def _loss_with_rank(
    pred: Predictor, out: Any, y: Any, rank_weight: float, groups: Any | None = None
) -> Any:
    loss = pred._loss(out, y)
    if rank_weight <= 0:
        return loss
    for j, t in enumerate(pred.targets):
        if not t.startswith("acc:") or t not in out:
            continue
        keep = ~y[:, j].isnan()
        g = groups[keep] if groups is not None else None
        r = pairwise_rank_loss(out[t][keep], y[keep, j], g)
        if r is not None:
            loss = rank_weight * r if loss is None else loss + rank_weight * r
    return loss


def _finetune_loop(
    pred: Predictor,
    samples: Sequence[Sample],
    epochs: int,
    stop: int,
    params: str,
    rank_weight: float,
    seed: int,
    on_epoch: Any = None,
    groups: Sequence[str] | None = None,
) -> list[float]:
    """Train ``pred.model`` in place with :meth:`Predictor._train_epochs` (Adam, cosine
    schedule over ``epochs``, stopped after ``stop`` epochs, torch and the shuffle seeded with
    ``seed``) on the ``params`` group (:data:`FT_PARAMS`) with the MSE plus ``rank_weight``
    times the ranking loss; ``on_epoch(epoch)`` runs after each epoch (and once before the
    first, with 0). Other parameters keep their values and flags. ``groups`` (one name per
    sample, e.g. its family): the ranking loss compares only samples of one group. Returns
    the per-epoch losses."""
    import torch

    model = pred._check_fitted()
    gid = None
    if groups is not None:
        names = {g: k for k, g in enumerate(dict.fromkeys(groups))}
        gid = torch.tensor([names[g] for g in groups])

    def loss_fn(out: Any, y: Any, idx: list[int]) -> Any:
        g = gid[idx] if gid is not None else None
        return _loss_with_rank(pred, out, y, rank_weight, g)

    report = pred._train_epochs(
        samples,
        epochs,
        stop=stop,
        params=_trainable(model, params),
        loss_fn=loss_fn,
        on_epoch=on_epoch,
        seed=seed,
        desc="fine-tune",
    )
    return report.train_loss


def _select_epochs(
    pred: Predictor,
    samples: Sequence[Sample],
    epochs: int,
    params: str,
    rank_weight: float,
    folds: int,
    seed: int,
    relevel: bool | str,
) -> tuple[int, list[float]]:
    """The epoch count (0 … ``epochs``) with the best out-of-fold SRCC of the accuracy
    targets (mean over them) on ``folds`` folds of ``samples``' architectures, and that curve
    (each fold's copy re-levelled on its training part when ``relevel``). Ties go to fewer
    epochs; without accuracy targets or with too few architectures, ``epochs``."""
    from scipy.stats import spearmanr

    accs = acc_targets(pred.targets)
    fps = sorted({_fp(s.cg) for s in samples})
    if not accs or len(fps) < 2 * folds:
        return epochs, []
    rng = random.Random(f"aiop-ft-folds:{seed}")
    rng.shuffle(fps)
    # out-of-fold predictions per epoch: epoch -> target -> fp -> value
    oof: list[dict[str, dict[str, float]]] = [{t: {} for t in accs} for _ in range(epochs + 1)]
    for k in range(folds):
        held = set(fps[k::folds])
        fit_on = [s for s in samples if _fp(s.cg) not in held]
        val = [s for s in samples if _fp(s.cg) in held]
        inner = clone_predictor(pred)
        if relevel:  # each fold levels on its own training architectures only
            relevel_acc(inner, fit_on, "moments" if relevel is True else str(relevel))

        def record(epoch: int, inner: Predictor = inner, val: list[Sample] = val) -> None:
            for t, pairs in collect_predictions(inner, val, accs).items():
                for fp, p in zip(pairs.graphs, pairs.y_pred):
                    oof[epoch][t][fp] = p

        _finetune_loop(inner, fit_on, epochs, epochs, params, rank_weight, seed, record)
    truth = {t: _per_graph_values(samples, t) for t in accs}
    curve = []
    for e in range(epochs + 1):
        scores = []
        for t in accs:
            keys = [fp for fp in oof[e][t] if fp in truth[t]]
            if len(keys) > 2:
                rho = spearmanr([truth[t][k] for k in keys], [oof[e][t][k] for k in keys])[0]
                scores.append(float(rho) if math.isfinite(rho) else 0.0)
        curve.append(float(np.mean(scores)) if scores else math.nan)
    valid = [(c, -e) for e, c in enumerate(curve) if math.isfinite(c)]
    if not valid:
        return epochs, curve
    return -max(valid)[1], [round(c, 4) for c in curve]


class _PredictsLike(Protocol):
    def predict(self, cg: ComputeGraph, configs: Sequence[MConfig]) -> list[dict[str, Any]]: ...


class AnalyticPredictor:
    """The analytic models alone, with ``Predictor.predict``'s result keys (the ablation):
    memory always, latency once :meth:`fit_latency` calibrated the device constants."""

    targets: tuple[str, ...] = ("memory",)

    def __init__(self) -> None:
        self.latency_model: LatencyModel | None = None
        self._caches: dict[str, PlanCache] = {}

    def _cache(self, cg: ComputeGraph) -> PlanCache:
        fp = _fp(cg)
        if fp not in self._caches:
            if len(self._caches) > 256:  # bounded: a benchmark walks many graphs
                self._caches.clear()
            self._caches[fp] = PlanCache(cg)
        return self._caches[fp]

    def fit_latency(self, samples: Sequence[Sample]) -> LatencyModel:
        """Fit the latency model's device constants on the samples' latency labels."""
        rows = [
            (latency_terms(self._cache(s.cg).latency_plan(s.config), s.config), s.labels["latency"])
            for s in samples
            if "latency" in s.labels
        ]
        if not rows:
            raise ValueError("no latency labels to calibrate the analytic latency model on")
        self.latency_model = fit_latency_constants(
            np.stack([t for t, _ in rows]), np.asarray([y for _, y in rows])
        )
        self.targets = ("memory", "latency")
        return self.latency_model

    def predict(self, cg: ComputeGraph, configs: Sequence[MConfig | str]) -> list[dict[str, Any]]:
        out = []
        cache = self._cache(cg)  # per-graph work shared by all configurations
        for c in configs:
            c = MConfig.parse(c)
            est = estimate_memory(cg, c, cache)
            r: dict[str, Any] = {
                "peak_memory_bytes": int(est.peak_memory_bytes),
                "breakdown": dict(est.breakdown),
                "flops": int(cg.total_flops),
            }
            if self.latency_model is not None:
                terms = latency_terms(cache.latency_plan(c), c)
                r["latency_s"] = float(self.latency_model.predict(terms)[0])
            out.append(r)
        return out


# -- evaluation -------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Measured and predicted values of one target, and the graph of each pair."""

    y_true: list[float] = field(default_factory=list)
    y_pred: list[float] = field(default_factory=list)
    graphs: list[str] = field(default_factory=list)


def _prediction(result: Mapping[str, Any], target: str) -> float | None:
    if target.startswith("acc:"):
        value = result.get("accuracy", {}).get(target[4:])
    else:
        value = result.get(_PRED_KEYS.get(target, target))
    return None if value is None else float(value)


def collect_predictions(
    predictor: _PredictsLike,
    samples: Sequence[Sample],
    targets: Sequence[str] | None = None,
) -> dict[str, Pairs]:
    """(measured, predicted) pairs per target; ``predict`` runs once per graph.

    Per-architecture targets (``flops``, and ``acc:*`` when constant over a
    graph's configurations) are scored once per graph, predictions averaged,
    so graphs with many configurations do not count more.
    """
    targets = list(targets) if targets is not None else targets_present(samples)
    by_graph: dict[str, list[Sample]] = {}
    for s in samples:
        by_graph.setdefault(_fp(s.cg), []).append(s)
    out = {t: Pairs() for t in targets}
    for fp, group in by_graph.items():
        preds = predictor.predict(group[0].cg, [s.config for s in group])
        for t in targets:
            rows = [
                (s.labels[t], _prediction(p, t))
                for s, p in zip(group, preds)
                if t in s.labels and math.isfinite(s.labels[t])
            ]
            rows = [(y, p) for y, p in rows if p is not None]
            if not rows:
                continue
            per_graph = t in _PER_GRAPH or (t.startswith("acc:") and len({y for y, _ in rows}) == 1)
            if per_graph:
                rows = [(rows[0][0], float(np.mean([p for _, p in rows])))]
            for y, p in rows:
                out[t].y_true.append(float(y))
                out[t].y_pred.append(float(p))
                out[t].graphs.append(fp)
    return {t: pairs for t, pairs in out.items() if pairs.y_true}


def evaluate(
    predictor: _PredictsLike,
    samples: Sequence[Sample],
    targets: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per target: the metrics of :func:`aiop.predictor.metrics.regression_metrics`."""
    pairs = collect_predictions(predictor, samples, targets)
    return {t: regression_metrics(p.y_true, p.y_pred) for t, p in pairs.items()}


# -- accuracy targets: per-family levels, fine-tuning for the ranking within a family ----------
# An accuracy label mixes a family's level (its training recipe, its data) with where an
# architecture ranks inside the family; only the latter transfers between families and only it
# is scored (SRCC within a family). ``acc_norm="family"`` therefore standardises accuracy targets
# per family for training (AIO-P's ``stand`` is per data set), and fine-tuning re-levels the
# output normaliser to the new family before it trains (:func:`relevel_acc`).
ACC_NORMS = ("global", "family")
# Which parameters a fine-tune updates: everything (AIO-P), the target heads, or the heads'
# last linear layer (a re-weighting of the frozen features).
FT_PARAMS = ("all", "heads", "last")
# How :func:`relevel_acc` maps the outputs onto a new family: moment matching or least squares.
RELEVEL_MODES = ("moments", "fit")


@dataclass(frozen=True)
class LevelStats:
    """Mean and standard deviation of a target over the architectures of one family."""

    mean: float
    std: float


def acc_targets(targets: Sequence[str]) -> list[str]:
    """The accuracy (``acc:<task>``) targets among ``targets``."""
    return [t for t in targets if t.startswith("acc:")]


def _per_graph_values(samples: Sequence[Sample], target: str) -> dict[str, float]:
    """One value per architecture (accuracy labels repeat over a graph's configurations)."""
    out: dict[str, float] = {}
    for s in samples:
        v = s.labels.get(target)
        if v is not None and math.isfinite(v):
            out.setdefault(_fp(s.cg), float(v))
    return out


def level_stats(values: Sequence[float]) -> LevelStats:
    """Mean and (population) standard deviation; std 1 when the values do not spread."""
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        raise ValueError("no values to take a level of")
    std = float(arr.std())
    return LevelStats(float(arr.mean()), std if std > 1e-12 else 1.0)


def family_stats(
    samples: Sequence[Sample], targets: Sequence[str]
) -> dict[str, dict[str, LevelStats]]:
    """``{target: {family: LevelStats}}`` over each family's architectures."""
    out: dict[str, dict[str, LevelStats]] = {}
    for t in targets:
        for fam in sorted({s.family for s in samples}):
            values = _per_graph_values([s for s in samples if s.family == fam], t)
            if values:
                out.setdefault(t, {})[fam] = level_stats(list(values.values()))
    return out


def standardize_families(
    samples: Sequence[Sample], targets: Sequence[str]
) -> tuple[list[Sample], dict[str, dict[str, LevelStats]]]:
    """Copies of ``samples`` whose ``targets`` labels are z-scores within their family, and
    the statistics used (graphs and configurations are shared, not copied)."""
    stats = family_stats(samples, targets)
    out = []
    for s in samples:
        labels = dict(s.labels)
        for t in targets:
            st = stats.get(t, {}).get(s.family)
            if st is not None and t in labels and math.isfinite(labels[t]):
                labels[t] = (labels[t] - st.mean) / st.std
        out.append(Sample(s.cg, s.config, labels, s.family))
    return out, stats


def _stand(mean: float, std: float) -> Normalizer:
    return Normalizer("stand", float(mean), float(std), fitted=True)


def fit_predictor(
    pred: Predictor,
    samples: Sequence[Sample],
    acc_norm: str = "global",
    rank_weight: float = 0.0,
) -> Any:
    """``pred.fit(samples)``, with accuracy targets standardised per family when ``acc_norm``
    is ``"family"`` (needs ``tar_norm="stand"``), and with ``rank_weight`` times a pairwise
    ranking loss on the accuracy targets of the architectures of one family in a batch added to
    the MSE when it is positive (``pred``'s epochs, batch size, learning rate and seed).

    The network then learns within-family z-scores; its accuracy normalisers are composed with
    the training families' average level and spread, so zero-shot predictions come out in the
    label's units (ranking within a family is unaffected), and ``pred.meta["acc_norm"]`` keeps
    that reference for :func:`relevel_acc`.
    """
    if acc_norm not in ACC_NORMS:
        raise ValueError(f"unknown acc_norm {acc_norm!r}; choose one of {', '.join(ACC_NORMS)}")
    accs = acc_targets([t for t in pred.targets if any(t in s.labels for s in samples)])
    if acc_norm == "family" and accs and pred.tar_norm != "stand":
        raise ValueError(f"acc_norm 'family' needs tar_norm 'stand', not {pred.tar_norm!r}")
    family = acc_norm == "family" and bool(accs)
    z, stats = standardize_families(samples, accs) if family else (list(samples), {})
    if rank_weight > 0 and accs:
        pred.build(z)
        epochs = pred.epochs
        losses = _finetune_loop(
            pred, z, epochs, epochs, "all", rank_weight, pred.seed, groups=[s.family for s in z]
        )
        report = FitReport(epochs=epochs, train_loss=losses)
    else:
        report = pred.fit(z)
    if family or (rank_weight > 0 and accs):
        pred.fit_acc_readout(samples)  # on the labels themselves, not the z-scores
    if not family:
        return report
    ref = {}
    for t, by_family in stats.items():
        avg = LevelStats(
            float(np.mean([s.mean for s in by_family.values()])),
            float(np.mean([s.std for s in by_family.values()])),
        )
        inner = pred.normalizers[t]  # fitted on the z-scores: about (0, 1)
        pred.normalizers[t] = _stand(inner.mean * avg.std + avg.mean, inner.std * avg.std)
        ref[t] = {"mean": avg.mean, "std": avg.std}
    pred.meta["acc_norm"] = {
        "kind": "family",
        "reference": ref,
        "families": {t: {f: [s.mean, s.std] for f, s in fs.items()} for t, fs in stats.items()},
    }
    return report


def relevel_acc(
    pred: Predictor, samples: Sequence[Sample], mode: str = "moments"
) -> dict[str, LevelStats]:
    """Re-level ``pred``'s accuracy normalisers (in place) to a new family's labelled
    ``samples`` by an affine map of the network's output.

    ``moments``: the output scale becomes the family's spread relative to the scale the network
    learnt in (its training families' average spread under ``acc_norm="family"``, else the
    normaliser's own), and the offset makes the mean prediction on ``samples`` equal their
    mean label; monotone increasing, so the ranking of any two architectures is unchanged.
    ``fit``: least squares of the labels on the outputs over ``samples`` (a 2-parameter
    calibration); its slope may come out negative, reversing the zero-shot ranking where the
    family ranks the other way round. Returns the family's statistics per target."""
    if mode not in RELEVEL_MODES:
        raise ValueError(f"unknown relevel mode {mode!r}; choose {', '.join(RELEVEL_MODES)}")
    out: dict[str, LevelStats] = {}
    ref = pred.meta.get("acc_norm", {}).get("reference", {})
    for t in acc_targets(pred.targets):
        values = _per_graph_values(samples, t)
        if len(values) < 2 or t not in pred.normalizers:
            continue
        if pred.normalizers[t].kind != "stand":
            log.warning("%s: normaliser %s cannot be re-levelled", t, pred.normalizers[t].kind)
            continue
        fam = level_stats(list(values.values()))
        norm = pred.normalizers[t]
        # the network's raw outputs on these architectures (normalised units)
        pairs = collect_predictions(pred, samples, [t])[t]
        raw = (np.asarray(pairs.y_pred) - norm.mean) / norm.std
        if mode == "fit" and float(raw.std()) > 1e-12:
            slope, intercept = np.polyfit(raw, np.asarray(pairs.y_true), 1)
            pred.normalizers[t] = _stand(float(intercept), float(slope))
        else:
            scale_ref = float(ref[t]["std"]) if t in ref else norm.std
            new_std = norm.std * fam.std / scale_ref
            pred.normalizers[t] = _stand(fam.mean - float(raw.mean()) * new_std, new_std)
        out[t] = fam
    return out
