"""scripts/make_cg.py: graphs of files and model names, one bad model skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from aiop.cg import ComputeGraph, export_onnx_bytes
from aiop.models.examples import TinyResNet

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_cg.py"


def test_make_cg_writes_graphs_and_skips_bad_ones(tmp_path):
    model = TinyResNet()
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(export_onnx_bytes(model, (torch.randn(1, 3, 32, 32),)))
    out = tmp_path / "cgs"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "-models", str(onnx_path), "family:ofa_pn:0",
         str(tmp_path / "missing.onnx"), "-output_dir", str(out), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "missing.onnx" in proc.stderr and "built 2 graph(s), 1 failed" in proc.stdout
    cg = ComputeGraph.load(out / "tiny.json.gz")
    assert cg.total_params == sum(p.numel() for p in model.parameters())
    assert (out / "family_ofa_pn_0.json.gz").is_file()


def test_make_cg_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "-models", "zoo:resnet18"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
