"""ComputeGraph → PyG features."""

from __future__ import annotations

import math

import pytest
import torch

from aiop.cg import from_torch, to_pyg
from aiop.cg.pyg import (
    FLAG_FEATURES,
    NUM_EDGE_FEATURES,
    NUM_GRAPH_FEATURES,
    NUM_NODE_FEATURES,
    NUM_OP_SLOTS,
    NUMERIC_FEATURES,
)
from aiop.cg.vocab import OOV_INDEX, OP_VOCAB, op_index, op_kind
from aiop.models.examples import TinyResNet


@pytest.fixture(scope="module")
def cg():
    return from_torch(TinyResNet(), (1, 3, 32, 32))


def test_shapes_and_one_hot(cg):
    data = to_pyg(cg)
    assert data.x.shape == (cg.num_nodes, NUM_NODE_FEATURES)
    assert data.edge_index.shape == (2, cg.num_edges)
    assert data.edge_attr.shape == (cg.num_edges, NUM_EDGE_FEATURES)
    assert data.graph_attr.shape == (1, NUM_GRAPH_FEATURES)
    one_hot = data.x[:, :NUM_OP_SLOTS]
    assert torch.equal(one_hot.sum(1), torch.ones(cg.num_nodes))
    assert torch.equal(one_hot.argmax(1), data.op_index)
    assert data.op_index.tolist() == [op_index(n.op) for n in cg.nodes]
    assert data.config.shape == (1, 0)
    # edges point forward, as in the CG
    assert bool((data.edge_index[0] < data.edge_index[1]).all())


def test_numeric_features_follow_the_documented_scaling(cg):
    data = to_pyg(cg)
    conv_i = next(i for i, n in enumerate(cg.nodes) if n.op == "Conv")
    conv = cg.nodes[conv_i]
    feats = dict(zip(NUMERIC_FEATURES, data.x[conv_i, NUM_OP_SLOTS:].tolist()))
    assert feats["flops"] == pytest.approx(math.log10(1 + conv.flops) / 12, rel=1e-6)
    assert feats["params"] == pytest.approx(math.log10(1 + conv.params) / 9, rel=1e-6)
    assert feats["c_in"] == pytest.approx(math.log2(1 + 3) / 12, rel=1e-6)
    assert feats["c_out"] == pytest.approx(math.log2(1 + 16) / 12, rel=1e-6)
    assert feats["h_out"] == pytest.approx(math.log2(1 + 32) / 10, rel=1e-6)
    assert feats["kernel"] == pytest.approx(math.log2(1 + 3) / 4, rel=1e-6)
    assert feats["depthwise"] == 0.0
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.5
    flags = data.x[:, NUM_OP_SLOTS + len(NUMERIC_FEATURES) :]
    assert flags.shape[1] == len(FLAG_FEATURES)
    assert torch.equal(flags[:, 0], torch.ones(cg.num_nodes))  # trainable by default
    assert torch.equal(flags[:, 1], torch.zeros(cg.num_nodes))


class _Config:
    """A stand-in m-configuration: first half frozen, second half recomputed."""

    def node_flags(self, cg):
        n = cg.num_nodes
        return {
            "trainable": [i >= n // 2 for i in range(n)],
            "recomputed": [i >= 3 * n // 4 for i in range(n)],
        }

    def as_vector(self):
        return [1.0, 2.0, 3.0]


def test_config_flags_and_vector(cg):
    data = to_pyg(cg, _Config())
    start = NUM_OP_SLOTS + len(NUMERIC_FEATURES)
    n = cg.num_nodes
    assert data.x[:, start].tolist() == [float(i >= n // 2) for i in range(n)]
    assert data.x[:, start + 1].tolist() == [float(i >= 3 * n // 4) for i in range(n)]
    assert data.config.tolist() == [[1.0, 2.0, 3.0]]


def test_bad_flags_are_rejected(cg):
    class Bad(_Config):
        def node_flags(self, cg):
            return {"trainable": [True], "recomputed": [False]}

    with pytest.raises(ValueError, match="one value per node"):
        to_pyg(cg, Bad())


def test_batches_with_pyg_loader(cg):
    from torch_geometric.loader import DataLoader

    other = from_torch(TinyResNet(width=8), (1, 3, 32, 32))
    loader = DataLoader([to_pyg(cg), to_pyg(other)], batch_size=2)
    batch = next(iter(loader))
    assert batch.num_graphs == 2
    assert batch.x.shape[0] == cg.num_nodes + other.num_nodes
    assert batch.graph_attr.shape == (2, NUM_GRAPH_FEATURES)


def test_vocabulary_is_consistent():
    assert len(set(OP_VOCAB)) == len(OP_VOCAB)
    assert op_index("NotAnOp") == OOV_INDEX == len(OP_VOCAB)
    assert op_kind("Conv") == "conv" and op_kind("Relu") == "activation"
    assert op_kind("Resize") == "layout" and op_kind("NotAnOp") == "other"
