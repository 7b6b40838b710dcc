"""scripts/run_profiler.py: resumable after kill -9, skips finished work, bad input exits 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiop.cache import CacheError, Store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_profiler.py"
CONFIGS = "bs=8;bs=16,mb=4;bs=8,freeze=0.5;bs=8,ckpt=1"
ARGS = ["-models", "family:ofa_pn:1", "-profiler", "memory", "-configs", CONFIGS, "-q"]


def _run(store: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "-cache_file", str(store), *ARGS, *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def _rows(store: Path) -> dict[tuple[str, str, str], float]:
    with Store(store, readonly=True) as s:
        return {(r.graph, r.config, r.kind): r.value for r in s.labels(kind="peak_memory_bytes")}


def _rows_so_far(store: Path) -> int:
    """Rows a running writer has committed; 0 while it is still creating the file."""
    try:
        return len(_rows(store)) if store.exists() else 0
    except CacheError:  # the writer has created the file but not yet its schema
        return 0


@pytest.mark.slow
def test_kill_minus_nine_then_resume_matches_uninterrupted(tmp_path):
    whole = tmp_path / "whole.db"
    assert _run(whole).returncode == 0
    expected = _rows(whole)
    assert len(expected) == 4

    cut = tmp_path / "cut.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-cache_file", str(cut), *ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _rows_so_far(cut) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _rows(cut)
    assert 1 <= len(partial) < 4, "the kill should land mid-run"
    resumed = _run(cut)
    assert resumed.returncode == 0
    assert "skipped" in resumed.stdout
    assert _rows(cut) == expected  # meta mode is deterministic: same rows, same values
    with Store(cut, readonly=True) as s:
        assert s.integrity_check() == "ok"


@pytest.mark.parametrize(
    "payload,extra,message",
    [
        (b"not a database at all" * 10, [], "SQLite"),
        (None, ["-configs", "random:x"], "random:N"),
        (None, ["-configs", "bs=8,mb=3"], "mb=3"),
        (None, ["-batch_sizes", "0"], "-batch_sizes"),
    ],
)
def test_bad_input_exits_2_and_keeps_the_file(tmp_path, payload, extra, message):
    store = tmp_path / "s.db"
    if payload is not None:
        store.write_bytes(payload)
    before = store.read_bytes() if store.exists() else None
    proc = _run(store, *extra)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    if before is not None:
        assert store.read_bytes() == before
    else:
        assert not store.exists()  # nothing written


@pytest.mark.slow
def test_select_and_batch_sizes_pick_graphs_and_configs(tmp_path):
    store = tmp_path / "s.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "-cache_file", str(store), "-q", "-profiler", "memory"]
    add = subprocess.run(
        [*cmd, "-models", "family:ofa_pn:1", "zoo:resnet18", "-configs", "bs=8", "-select", "none"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert (
        add.returncode == 2 and "matches no graph" in add.stderr
    )  # the graphs are added, not profiled
    run = subprocess.run(
        [*cmd, "-select", "family:*", "-configs", "random:2", "-batch_sizes", "8"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with Store(store, readonly=True) as s:
        names = {i.fingerprint: i.name for i in s.graphs()}
        rows = list(s.labels(kind="peak_memory_bytes"))
    assert len(names) == 2
    assert {names[r.graph] for r in rows} == {"family:ofa_pn:1"}
    assert len(rows) == 2 and all(r.config.startswith("bs=8,") for r in rows)
