"""Fill a store with ground truth: graphs of models, and profiler labels per configuration.

``add_models`` puts the training CG of each ``MODEL`` (``zoo:``/``family:``
names, or ``.onnx`` files) into the store, remembering in the graph's meta how
to rebuild the model. ``profile_store`` then measures every (graph, config)
that lacks a label — one transaction per record, so a killed run loses at most
the record in flight and a re-run resumes where it stopped.

Labels are stored under ``device``:

* ``meta`` (mode ``meta``): ``peak_memory_bytes`` with its breakdown, ``flops``,
  ``params`` and the profiler's other numbers;
* ``cpu`` / ``cuda`` (mode ``real`` / ``cuda``): the same measured on real
  tensors, plus ``latency_s`` when latency is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiop.cache.errors import CacheError
from aiop.cache.store import Store

log = logging.getLogger(__name__)

PROFILERS = ("memory", "latency", "flops", "params")
_KIND_OF = {
    "memory": "peak_memory_bytes",
    "latency": "latency_s",
    "flops": "flops",
    "params": "params",
}


@dataclass
class RunReport:
    """What one ``profile_store`` run did."""

    measured: int = 0
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (graph, config, reason)


def device_label(mode: str) -> str:
    return {"meta": "meta", "real": "cpu", "cuda": "cuda"}[mode]


def add_models(
    store: Store,
    models: Iterable[str],
    *,
    family: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Put the training CG of every model into the store; returns their fingerprints."""
    from tqdm import tqdm

    from aiop.cg import graph_for_model

    fps = []
    models = list(models)
    for spec in tqdm(models, desc="graphs", disable=not progress, leave=False):
        cg = graph_for_model(spec)
        fam = family or (spec.split(":")[1] if spec.startswith("family:") else "zoo")
        meta = {"model": spec, "family": fam}
        fps.append(store.put_graph(cg, name=spec, meta=meta))
    return fps


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def configs_for_graph(
    fingerprint: str,
    how: str,
    n_blocks: int,
    *,
    batch_sizes: Sequence[int] = (16, 64, 256),
    precisions: Sequence[str] = ("fp32", "bf16"),
) -> list[str]:
    """The configurations to measure for one graph.

    ``grid`` is MPOptimizer's grid (every micro-batch, freezing 0–100 % by 10 %,
    segments 0..√L, every method and precision); ``random:N`` draws N of it,
    deterministically per graph; a comma-free list ``spec;spec;...`` is taken as is.
    """
    from aiop.mconfig import MConfig, MConfigError, MSpace

    max_k = max(0, math.isqrt(max(n_blocks, 0)))
    space = MSpace(
        batch_sizes=tuple(batch_sizes),
        segments=tuple(range(max_k + 1)),
        precisions=tuple(precisions),
        optimizers=("sgd", "adam", "adamw"),
    )
    if how == "grid":
        return [c.format() for c in space]
    if how.startswith("random:"):
        try:
            n = int(how.split(":", 1)[1])
        except ValueError:
            raise CacheError(f"-configs random:N needs an integer N, not {how!r}") from None
        return [c.format() for c in space.sample(n, seed=_seed_of(fingerprint))]
    try:
        return [MConfig.parse(s).format() for s in how.split(";") if s.strip()]
    except MConfigError as exc:
        raise CacheError(f"bad -configs value: {exc}") from None


def _n_blocks(cg: Any) -> int:
    from aiop.mconfig.config import node_blocks

    known = [b for b in node_blocks(cg) if b is not None]
    return max(known) + 1 if known else 0


def _factory(meta: dict[str, Any]) -> str | Callable[[], Any]:
    model = meta.get("model")
    if not model:
        raise CacheError("graph has no 'model' in its meta: cannot rebuild it to profile")
    if meta.get("task"):
        # A task graph is backbone + head; its 'model' names only the backbone, and
        # profiling that would file the backbone's memory under the task graph.
        raise CacheError(
            f"graph of {model} with a {meta['task']} head: profile it with"
            " scripts/run_train_cgs_on_task.py, not run_profiler.py"
        )
    if str(model).startswith(("zoo:", "family:")):
        return str(model)
    path = Path(model)
    if not path.is_file():
        raise CacheError(f"model file {model} is gone")
    from aiop.cg.to_torch import module_from_file  # CG → PyTorch for users' files

    return lambda: module_from_file(path)


def _build(factory: str | Callable[[], Any]) -> Any:
    if isinstance(factory, str):
        from aiop.models import build

        return build(factory)
    return factory()


def profile_store(
    path: str | Path,
    profilers: Sequence[str] = ("memory", "flops", "params"),
    *,
    mode: str = "meta",
    configs: str = "random:16",
    reprofile: bool = False,
    graphs: Sequence[str] | None = None,
    latency_steps: int = 5,
    latency_warmup: int = 2,
    batch_sizes: Sequence[int] = (16, 64, 256),
    progress: bool = True,
    on_record: Callable[[str, str], None] | None = None,
) -> RunReport:
    """Measure every (graph, config) of the store that lacks the asked labels."""
    from tqdm import tqdm

    from aiop.profiler import count_flops, profile, tool_version

    unknown = sorted(set(profilers) - set(PROFILERS))
    if unknown:
        raise CacheError(f"unknown profiler(s) {unknown}; choose from {', '.join(PROFILERS)}")
    if mode not in ("meta", "real", "cuda"):
        raise CacheError(f"unknown mode {mode!r}; choose meta, real or cuda")
    if "latency" in profilers and mode == "meta":
        raise CacheError("latency needs real steps: use -mode real (or cuda)")
    kinds = [_KIND_OF[p] for p in profilers if p in ("memory", "latency")] or ["peak_memory_bytes"]
    device = device_label(mode)
    report = RunReport()
    with Store(path) as store:
        infos = [i for i in store.graphs() if graphs is None or i.fingerprint in graphs]
        work: list[tuple[str, str, dict[str, Any]]] = []
        for info in infos:
            cg = store.get_graph(info.fingerprint)
            specs = configs_for_graph(
                info.fingerprint, configs, _n_blocks(cg), batch_sizes=batch_sizes
            )
            todo = (
                specs
                if reprofile
                else [
                    c
                    for _, c in store.missing_pairs(
                        [info.fingerprint], specs, kinds, device=device, mode=mode
                    )
                ]
            )
            report.skipped += len(specs) - len(todo)
            work.extend((info.fingerprint, c, info.meta) for c in todo)
        per_graph = [k for k in ("flops", "params") if k in profilers]
        if per_graph:  # FLOPs and params do not depend on the configuration: once per graph
            for info in tqdm(infos, desc="flops/params", disable=not progress, leave=False):
                if not reprofile and all(
                    store.has_label(info.fingerprint, "", k) for k in per_graph
                ):
                    continue
                try:
                    count = count_flops(_build(_factory(info.meta)))
                except (ValueError, RuntimeError) as exc:
                    report.failed.append((info.fingerprint, "", str(exc).splitlines()[0]))
                    continue
                values = {"flops": count.flops, "params": count.params_thop or count.params_cg}
                labels = [(k, values[k], {"flops_cg": count.flops_cg}) for k in per_graph]
                store.put_labels(info.fingerprint, "", labels, tool_version=tool_version())
                report.measured += 1
        config_kinds = [k for k in ("memory", "latency") if k in profilers]
        bar = tqdm(work if config_kinds else [], desc=f"profile ({mode})", disable=not progress)
        for fp, spec, meta in bar:
            try:
                model = _factory(meta)
                result = profile(
                    model,
                    spec,
                    mode=mode,
                    latency="latency" in profilers,
                    flops=False,
                    latency_steps=latency_steps,
                    latency_warmup=latency_warmup,
                    name=str(meta.get("model", fp)),
                )
            except (ValueError, RuntimeError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("%s %s: %s", meta.get("model", fp), spec, reason)
                report.failed.append((fp, spec, reason))
                continue
            record = result.to_dict()
            store.put_record(fp, spec, record, device=device, mode=mode)
            report.measured += 1
            if on_record is not None:
                on_record(fp, spec)
    return report
