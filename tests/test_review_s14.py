"""Review leftovers (s14): a closed stdout, the benchmarks' result writer, frozen shares."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from script_helpers import load_script

from aiop import cli
from aiop.cg import graph_for_model
from aiop.mconfig import MConfig
from aiop.mpopt.planner import frozen_shares

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


# -- aiop … | head: a closed stdout ends the command quietly -------------------------------


def _run_into_closed_pipe(*args: str, unbuffered: bool) -> subprocess.CompletedProcess[bytes]:
    """Run the console entry with its stdout a pipe whose reader is already gone.

    A pipe is block-buffered (the output fails at the final flush) unless
    ``PYTHONUNBUFFERED`` is set (it fails at the first write); both are tried.
    """
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # every write to the pipe now fails with EPIPE
    try:
        code = "import sys; from aiop.cli import main; sys.exit(main())"  # the console script
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("AIOP_DEBUG", None)
        env.pop("PYTHONUNBUFFERED", None)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_fd)


PREDICT = ["predict", "zoo:resnet18", "--config", "bs=8,mb=4", "--json"]


@pytest.mark.parametrize(
    ("args", "unbuffered", "statuses"),
    [
        (PREDICT, False, {141}),
        (PREDICT, True, {141}),
        (["--version"], False, {141}),  # argparse's output, still buffered at its SystemExit
        # argparse ignores an OSError of its own write: a help longer than the buffer
        # (written at once) or any unbuffered output keeps its status 0
        (["--help"], False, {0, 141}),
        (["--version"], True, {0}),
    ],
    ids=["predict", "predict-unbuffered", "version", "help", "version-unbuffered"],
)
def test_closed_stdout_exits_quietly(args: list[str], unbuffered: bool, statuses: set[int]) -> None:
    done = _run_into_closed_pipe(*args, unbuffered=unbuffered)
    err = done.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err  # the interpreter's own final flush
    assert done.returncode in statuses, err
    assert cli.EXIT_BROKEN_PIPE == 141


class _ClosedPipe(io.StringIO):
    """A stdout whose reader went away: writes pass, the flush fails like a pipe's."""

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_main_returns_broken_pipe_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["--version"]) == cli.EXIT_BROKEN_PIPE  # argparse prints, then exits


def test_bad_input_still_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "zoo:nope", "--config", "bs=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aiop: error:") and len(err.splitlines()) == 1


# -- benchmarks/_results.py -------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> ModuleType:
    return load_script(BENCHMARKS / "_results.py", "bench_results")


def test_write_results_format(results: ModuleType, tmp_path: Path) -> None:
    data = {"b": [1, 2.5], "a": {"x": None}}
    out = tmp_path / "deep" / "er"
    json_path, md_path = results.write_results(out, "r", data, "| a |\n|---|")
    assert (json_path, md_path) == (out / "r.json", out / "r.md")
    assert json_path.read_text() == json.dumps(data, indent=2) + "\n"
    assert md_path.read_text() == "| a |\n|---|\n"  # one trailing newline, added once
    results.write_results(out, "r", data, "x\n", indent=1)
    assert json_path.read_text() == json.dumps(data, indent=1) + "\n"
    assert md_path.read_text() == "x\n"
    # the usual permissions (umask), not a temporary file's 0600
    assert stat.S_IMODE(json_path.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.md"]  # no temporaries


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_results_keeps_earlier_files_on_failure(results: ModuleType, tmp_path: Path) -> None:
    results.write_results(tmp_path, "r", {"ok": 1}, "old")
    with pytest.raises(TypeError):
        results.write_results(tmp_path, "r", {"bad": object()}, "new")
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": 1}
    assert (tmp_path / "r.md").read_text() == "old\n"
    results.write_results(tmp_path, "r", {"obj": object()}, "new", default=lambda _: "?")
    assert json.loads((tmp_path / "r.json").read_text()) == {"obj": "?"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


@pytest.mark.parametrize("name", ["", "a/b", "../up"])
def test_write_results_rejects_paths_as_names(
    results: ModuleType, tmp_path: Path, name: str
) -> None:
    with pytest.raises(ValueError, match="plain file stem"):
        results.write_results(tmp_path, name, {}, "")


WRITERS = [
    "analytic_accuracy",
    "cg_speed",
    "kernel_latency",
    "mpopt",
    "predictor_accuracy",
    "predictor_latency",
    "predictor_speed",
    "profiler_speed",
    "service_load",
    "tasks_data",
    "to_torch_fidelity",
]


@pytest.mark.parametrize("name", WRITERS)
def test_benchmarks_load_the_shared_writer_from_their_file(name: str) -> None:
    """Tests load benchmarks from their file (``benchmarks/`` not on ``sys.path``); the
    sibling import must work then as it does under ``python benchmarks/NAME.py``."""
    module = load_script(BENCHMARKS / f"{name}.py", f"review_s14_{name}")
    assert module.write_results.__module__ == "_results"
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert ".write_text(json.dumps" not in source  # the tail goes through write_results


# -- frozen_shares: one CGPlanner for every freezing rate --------------------------------


@pytest.mark.parametrize("model", ["zoo:mobilenet_v2", "zoo:resnet18"])
def test_frozen_shares_match_one_plan_per_rate(model: str) -> None:
    cg = graph_for_model(model)
    freezes = [round(0.1 * i, 1) for i in range(11)] + [0.25, 0.33, 0.77, -0.1]
    total = sum(n.params or 0 for n in cg.nodes)
    expected = {}
    for f in freezes:  # the computation before s14: a fresh plan per freezing rate
        if f <= 0:
            expected[f] = 0.0
            continue
        trainable = MConfig(batch_size=1, freeze=f).node_flags(cg)["trainable"]
        expected[f] = sum(n.params or 0 for n, t in zip(cg.nodes, trainable) if not t) / total
    assert frozen_shares(cg, freezes) == expected
    assert len(set(expected.values())) > 5  # the rates freeze different shares
