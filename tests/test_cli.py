"""The ``aiop`` command: output forms and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aiop.cg import ComputeGraph, export_onnx_bytes
from aiop.cli import main
from aiop.models.examples import SmallCNN


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "small.onnx"
    path.write_bytes(export_onnx_bytes(SmallCNN(), (torch.randn(1, 1, 28, 28),)))
    return path


def test_cg_json_and_out(onnx_file, tmp_path, capsys):
    out = tmp_path / "g.json.gz"
    assert main(["cg", str(onnx_file), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == sum(p.numel() for p in SmallCNN().parameters())
    assert ComputeGraph.load(out).fingerprint == summary["fingerprint"]


def test_cg_table(onnx_file, capsys):
    assert main(["cg", str(onnx_file)]) == 0
    text = capsys.readouterr().out
    assert "fingerprint" in text and "FLOPs" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["cg", "/no/such/model.onnx"], "no such file"),
        (["cg", "{bad}", "--input-shape", "1,x,3"], "input-shape|no such file"),
        (["cg", "README.md"], "unknown model file type"),
    ],
)
def test_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("aiop: error:")
    assert any(m in err for m in message.split("|"))


def test_bad_input_shape(onnx_file, capsys):
    assert main(["cg", str(onnx_file), "--input-shape", "1,a"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_console_script_random_bytes(tmp_path):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(bytes(range(256)) * 8)
    proc = subprocess.run(
        [sys.executable, "-m", "aiop.cli", "cg", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
