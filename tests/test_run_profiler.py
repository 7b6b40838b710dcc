"""scripts/run_profiler.py: resumable after kill -9, skips finished work, bad input exits 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiop.cache import Store

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
        if cut.exists() and len(_rows(cut)) >= 1:
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
