"""The GNN that predicts training performance from a CG and an m-configuration.

``PerformanceGNN`` = a :class:`GraphEncoder` (node embedding → stacked message
passing → pooling) whose graph embedding is joined with the configuration
vector and the analytic features before one small MLP head per target.

Encoders (``GNNSpec.conv``):

* ``graphconv``: AIO-P's k-GNN baseline (``GraphConv``, no edge features);
  :meth:`GNNSpec.aiop_baseline` gives its exact setting: 6 layers, 32 wide,
  tanh, mean pooling;
* ``gine``: GINE with the edge feature (tensor bytes), residual connections;
* ``gatv2``: GATv2 attention with edge features.

Pooling: ``mean``, ``sum``, ``attention`` (PyG's ``AttentionalAggregation``) or
``sum+mean`` (both, concatenated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from aiop.cg.pyg import (
    NUM_EDGE_FEATURES,
    NUM_GRAPH_FEATURES,
    NUM_NODE_FEATURES,
    NUM_OP_SLOTS,
    NUMERIC_FEATURES,
)

CONVS = ("graphconv", "gine", "gatv2")
POOLS = ("mean", "sum", "attention", "sum+mean")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass
class GNNSpec:
    """Hyperparameters of :class:`PerformanceGNN` (stored in the predictor file)."""

    conv: str = "gine"
    layers: int = 4
    hidden: int = 64
    pool: str = "sum+mean"
    activation: str = "relu"
    dropout: float = 0.0
    # node positions: 0 = none (AIO-P, the shipped predictor); K > 0 adds each node's relative
    # place in its graph's topological order and in its stage (nodes of one output resolution),
    # with K sin/cos frequencies of each (node_positions), to its features. Message passing
    # over a few hops cannot tell the 2nd block of a stage from the 4th; under weight sharing
    # that slot decides which weights an architecture inherits.
    pos_enc: int = 0
    head_hidden: int = 64
    config_dim: int = 17
    analytic_dim: int = 9
    targets: list[str] = field(default_factory=lambda: ["memory", "latency", "flops"])

    @classmethod
    def aiop_baseline(cls, **overrides: Any) -> GNNSpec:
        """AIO-P's predictor: 6 × GraphConv, 32 wide, tanh, mean pooling."""
        base = {
            "conv": "graphconv",
            "layers": 6,
            "hidden": 32,
            "pool": "mean",
            "activation": "tanh",
        }
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        if self.conv not in CONVS:
            raise ValueError(f"unknown conv {self.conv!r}; choose one of {CONVS}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {POOLS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.layers < 1 or self.hidden < 1:
            raise ValueError("layers and hidden must be positive")
        if not 0 <= self.pos_enc <= 16:
            raise ValueError(f"pos_enc must be between 0 and 16, got {self.pos_enc}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GNNSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def pool_nodes(
    spec: GNNSpec, x: torch.Tensor, batch: torch.Tensor, attention: nn.Module | None
) -> torch.Tensor:
    """One vector per graph from node states, by ``spec.pool``."""
    from torch_geometric.nn import global_add_pool, global_mean_pool

    if spec.pool == "mean":
        return global_mean_pool(x, batch)
    if spec.pool == "sum":
        return global_add_pool(x, batch)
    if spec.pool == "attention":
        assert attention is not None
        return attention(x, batch)
    # sum pooling scaled down: graph sizes span 10–1,000 nodes
    return torch.cat([global_add_pool(x, batch) / 100.0, global_mean_pool(x, batch)], 1)


def batch_of(data: Any, x: torch.Tensor) -> torch.Tensor:
    """The graph index of every node (all zeros for a single, unbatched graph)."""
    batch = getattr(data, "batch", None)
    return (
        batch if batch is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    )


def _relative_index(group: torch.Tensor) -> torch.Tensor:
    """Each node's place among the nodes of its group, in node order, scaled to [0, 1]."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices  # node order kept within each group
    starts = torch.cumsum(counts, 0) - counts
    index = torch.empty_like(order)
    index[order] = torch.arange(order.numel(), device=order.device) - starts[inverse[order]]
    return (index / (counts[inverse] - 1).clamp(min=1)).to(torch.float32)


def node_positions(x: torch.Tensor, batch: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``[N, 2 + 4 * frequencies]`` positions of every node (nodes in topological order, as
    :func:`aiop.cg.to_pyg` lays them out): t, its relative place in its graph, and s, its
    place among the graph's nodes of the same output resolution (its stage), each with
    sin/cos(2^k π ·) for k < ``frequencies``."""
    h_out = x[:, NUM_OP_SLOTS + NUMERIC_FEATURES.index("h_out")]
    stage = torch.round(h_out * 1000).long()  # equal sizes, equal scaled features
    t = _relative_index(batch)
    s = _relative_index(batch * 100_000 + stage)
    cols = [t[:, None], s[:, None]]
    if frequencies:
        k = math.pi * 2.0 ** torch.arange(frequencies, device=x.device)
        for v in (t, s):
            angles = v[:, None] * k
            cols += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(cols, dim=1)


def target_heads(in_dim: int, hidden: int, targets: list[str]) -> nn.ModuleDict:
    """One small MLP per target, reading the joined graph/config/analytic vector."""
    return nn.ModuleDict(
        {
            t: nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 1),
            )
            for t in targets
        }
    )


def _make_conv(kind: str, hidden: int) -> nn.Module:
    from torch_geometric.nn import GATv2Conv, GINEConv, GraphConv

    if kind == "graphconv":
        return GraphConv(hidden, hidden, aggr="add")
    if kind == "gine":
        mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        return GINEConv(mlp, edge_dim=NUM_EDGE_FEATURES, train_eps=True)
    return GATv2Conv(hidden, hidden // 4, heads=4, edge_dim=NUM_EDGE_FEATURES)


class GraphEncoder(nn.Module):
    """Node features → ``layers`` message-passing steps → one vector per graph."""

    def __init__(self, spec: GNNSpec) -> None:
        super().__init__()
        from torch_geometric.nn import AttentionalAggregation

        self.spec = spec
        act = ACTIVATIONS[spec.activation]
        pos_dim = 2 + 4 * spec.pos_enc if spec.pos_enc else 0
        self.embed = nn.Sequential(nn.Linear(NUM_NODE_FEATURES + pos_dim, spec.hidden), act())
        self.convs = nn.ModuleList(_make_conv(spec.conv, spec.hidden) for _ in range(spec.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(spec.hidden) for _ in range(spec.layers))
        self.act = act()
        self.dropout = nn.Dropout(spec.dropout)
        self.attention = (
            AttentionalAggregation(nn.Linear(spec.hidden, 1)) if spec.pool == "attention" else None
        )
        self.out_dim = spec.hidden * (2 if spec.pool == "sum+mean" else 1) + NUM_GRAPH_FEATURES

    def forward(self, data: Any) -> torch.Tensor:
        batch = batch_of(data, data.x)
        x = data.x
        if self.spec.pos_enc:
            x = torch.cat([x, node_positions(x, batch, self.spec.pos_enc)], dim=1)
        x = self.embed(x)
        residual = self.spec.conv != "graphconv"  # the AIO-P baseline stays as published
        for conv, norm in zip(self.convs, self.norms):
            if self.spec.conv == "graphconv":
                h = conv(x, data.edge_index)
            else:
                h = conv(x, data.edge_index, data.edge_attr)
            h = self.dropout(self.act(norm(h)))
            x = x + h if residual else h
        pooled = pool_nodes(self.spec, x, batch, self.attention)
        return torch.cat([pooled, data.graph_attr], dim=1)


class PerformanceGNN(nn.Module):
    """Graph embedding + configuration + analytic features → one output per target."""

    def __init__(self, spec: GNNSpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        self.encoder = GraphEncoder(spec)
        in_dim = self.encoder.out_dim + spec.config_dim + spec.analytic_dim
        self.heads = target_heads(in_dim, spec.head_hidden, spec.targets)

    def encode(self, data: Any) -> torch.Tensor:
        """``[num_graphs, encoder.out_dim]`` embeddings of a PyG batch."""
        return self.encoder(data)

    def heads_forward(
        self,
        embedding: torch.Tensor,
        config: torch.Tensor,
        analytic: torch.Tensor,
        targets: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predictions (normalised) for rows of (embedding, config, analytic)."""
        z = torch.cat([embedding, config, analytic], dim=1)
        return {t: self.heads[t](z).squeeze(1) for t in targets or self.spec.targets}

    def forward(
        self, data: Any, config: torch.Tensor, analytic: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.encode(data), config, analytic)
