"""Merge caches (SQLite stores, JSON exports, trusted AIO-P pickles) into one store or file.

The counterpart of AIO-P's ``make_cg_task_cache.py``. Every input is checked
before anything is written, so a bad input leaves the output as it was.
Inputs merge one at a time, each in one transaction; a killed merge into a
store loses at most the input in flight and a re-run adds only what is missing.
Where two inputs hold the same label the first one wins (AIO-P keeps the first
of repeated graphs) unless ``replace`` is set.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiop.cache.aiop_pkl import ImportReport, export_aiop_pkl, import_entries, load_aiop_pkl
from aiop.cache.errors import CacheError
from aiop.cache.store import Store, _sqlite_uri, read_export_json

log = logging.getLogger(__name__)

_PKL = (".pkl", ".pickle")
_JSON = (".json",)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "pkl" if suffix in _PKL else "json" if suffix in _JSON else "db"


@dataclass
class MergeReport:
    """Per input, what it added; totals in the output."""

    output: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)


def _load_inputs(inputs: list[Path], trust_pickle: bool) -> list[tuple[Path, str, Any]]:
    """Check (and for pickles, read) every input; raise before anything is written."""
    loaded = []
    for path in inputs:
        if not path.is_file():
            raise CacheError(f"{path}: no such file")
        kind = _kind(path)
        if kind == "pkl":
            loaded.append((path, kind, load_aiop_pkl(path, trust_pickle=trust_pickle)))
        elif kind == "json":
            loaded.append((path, kind, read_export_json(path)))
        else:
            with Store(path, readonly=True) as src:
                bad = src.integrity_check()
            if bad != "ok":
                raise CacheError(f"{path}: damaged cache ({bad.splitlines()[0]})")
            loaded.append((path, kind, None))
    return loaded


def _merge_db(dst: Store, src_path: Path, replace: bool) -> dict[str, int]:
    """Copy every row of another store in one transaction (ATTACH, so it stays in SQLite)."""
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    conn = dst._conn
    before = dst.count()
    # Hold it open as a Store too: registers the file, so no Store opened meanwhile in
    # this process reads its header with plain I/O (see aiop.cache.store._OPEN).
    guard = Store(src_path, readonly=True)
    conn.execute("ATTACH DATABASE ? AS src", (_sqlite_uri(src_path, "ro"),))
    try:
        with dst.transaction():
            conn.execute("INSERT OR IGNORE INTO main.graphs SELECT * FROM src.graphs")
            conn.execute("INSERT OR IGNORE INTO main.configs SELECT * FROM src.configs")
            conn.execute("INSERT OR IGNORE INTO main.tasks SELECT * FROM src.tasks")
            conn.execute("INSERT OR IGNORE INTO main.devices SELECT * FROM src.devices")
            conn.execute(f"{verb} INTO main.labels SELECT * FROM src.labels")
    except sqlite3.DatabaseError as exc:
        raise CacheError(f"{src_path}: cannot merge ({exc})") from None
    finally:
        conn.execute("DETACH DATABASE src")
        guard.close()
    after = dst.count()
    return {
        "graphs_added": after["graphs"] - before["graphs"],
        "labels_added": after["labels"] - before["labels"],
    }


def merge_stores(
    inputs: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    task: str = "classification",
    metric: str = "acc",
    replace: bool = False,
    progress: bool = True,
) -> MergeReport:
    """Merge stores, ``.json`` exports and (with ``trust_pickle``) ``.pkl`` caches into ``output``.

    An output store (any name but ``.pkl``/``.json``) is added to, so merges
    resume; a ``.pkl`` or ``.json`` output is written whole, atomically.
    ``task`` is the task of AIO-P's ``acc``; ``metric`` picks which label a
    ``.pkl`` output calls ``acc``.
    """
    from tqdm import tqdm

    in_paths = [Path(p) for p in inputs]
    out_path = Path(output)
    if not in_paths:
        raise CacheError("no inputs to merge")
    resolved = {p.resolve() for p in in_paths}
    if out_path.resolve() in resolved:
        raise CacheError(f"{out_path}: the output is also an input")
    out_kind = _kind(out_path)
    if not out_path.parent.is_dir():
        raise CacheError(f"{out_path}: directory {out_path.parent} does not exist")
    if out_kind == "db" and out_path.exists():
        Store(out_path, readonly=True).close()  # refuse a foreign file before writing
    loaded = _load_inputs(in_paths, trust_pickle)

    report = MergeReport(output=str(out_path))
    with tempfile.TemporaryDirectory(prefix="aiop-merge-") as tmp:
        store_path = out_path if out_kind == "db" else Path(tmp) / "merge.db"
        with Store(store_path) as dst:
            for path, kind, payload in tqdm(loaded, desc="merge", disable=not progress or None):
                if kind == "pkl":
                    rep: ImportReport = import_entries(
                        dst, payload, source=str(path), task=task, replace=replace, progress=False,
                        batch=max(1, len(payload)),
                    )  # fmt: skip
                    added = {
                        "graphs_added": rep.graphs_added,
                        "labels_added": rep.labels_added,
                        "skipped": rep.skipped,
                    }
                elif kind == "json":
                    got = dst.import_json(path, replace=replace)
                    added = {"graphs_added": got["graphs"], "labels_added": got["labels"]}
                else:
                    added = _merge_db(dst, path, replace)
                report.inputs.append({"path": str(path), **added})
                log.info("%s: %s", path, added)
            report.totals = dst.count()
            if out_kind == "pkl":
                report.totals["entries"] = export_aiop_pkl(dst, out_path, metric=metric)
            elif out_kind == "json":
                dst.export_json(out_path)
    return report


__all__ = ["MergeReport", "merge_stores"]
