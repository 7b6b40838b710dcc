"""The predictor shipped in the package loads and answers for every MODEL form."""

from __future__ import annotations

import json

import torch

from aiop.cg import export_onnx_bytes
from aiop.cli import default_predictor_path, main
from aiop.models.examples import TinyResNet
from aiop.predictor.api import Predictor


def test_packaged_predictor_loads_and_predicts(tmp_path, capsys):
    path = default_predictor_path()
    assert path.is_file(), "aiop/data/default_predictor.safetensors must ship with the package"
    predictor = Predictor.load(path)
    assert "memory" in predictor.targets and predictor.error_quantiles.get("memory")
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(export_onnx_bytes(TinyResNet(), (torch.randn(1, 3, 32, 32),)))
    for model in (str(onnx_path), "family:ofa_pn:3"):
        assert (
            main(["predict", model, "--config", "bs=32,mb=8", "--config", "bs=32", "--json"]) == 0
        )
        small, big = json.loads(capsys.readouterr().out)
        assert 0 < small["peak_memory_bytes"] < big["peak_memory_bytes"]
        assert small["flops"] > 0 and set(small["breakdown"]) >= {"params", "activations"}
