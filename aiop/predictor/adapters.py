"""K-adapters (AIO-P): new task families on top of a frozen, fitted predictor.

The base GNN stays frozen. Each task family gets an *adapter*: a GNN of the
base's depth whose layer ``i`` reads ``concat[adapter_{i−1}, base_i]`` (the
adapter's previous node states and the base's node states after layer ``i``)
and a new head per target on ``concat[base embedding, adapter embedding,
configuration, analytic features]``. The prediction is the mean of the K
adapters' heads (each averaged only over the adapters trained on that target).

Fine-tuning on a few architectures of a new family, AIO-P's ``-k_adapt``:

* ``0``: the heads only;
* ``1``: the heads and the base GNN;
* ``2``: the heads, the base GNN and the adapter GNNs;
* ``3``: the heads and the adapter GNNs.

:class:`KAdapterPredictor` is a :class:`~aiop.predictor.api.Predictor`, so
``predict``, ``calibrate`` and :func:`aiop.predictor.train.evaluate` work on it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aiop.cg.pyg import NUM_NODE_FEATURES
from aiop.predictor.api import (
    FitReport,
    Predictor,
    PredictorError,
    Sample,
    file_header,
    read_weights,
    train_epochs,
    write_weights,
)
from aiop.predictor.model import (
    ACTIVATIONS,
    GNNSpec,
    GraphEncoder,
    PerformanceGNN,
    _make_conv,
    batch_of,
    pool_nodes,
    target_heads,
)

log = logging.getLogger(__name__)

K_ADAPT_MODES: dict[int, tuple[str, ...]] = {
    0: ("heads",),
    1: ("heads", "base"),
    2: ("heads", "base", "adapters"),
    3: ("heads", "adapters"),
}
FORMAT = "aiop-kadapter-predictor"


def base_states(encoder: GraphEncoder, data: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The base's node states after each layer, and its graph embedding.

    Mirrors :meth:`GraphEncoder.forward` step by step (a test checks that the
    embedding equals ``encoder(data)``).
    """
    spec = encoder.spec
    x = encoder.embed(data.x)
    residual = spec.conv != "graphconv"
    states = []
    for conv, norm in zip(encoder.convs, encoder.norms):
        if spec.conv == "graphconv":
            h = conv(x, data.edge_index)
        else:
            h = conv(x, data.edge_index, data.edge_attr)
        h = encoder.dropout(encoder.act(norm(h)))
        x = x + h if residual else h
        states.append(x)
    pooled = pool_nodes(spec, x, batch_of(data, x), encoder.attention)
    return states, torch.cat([pooled, data.graph_attr], dim=1)


class Adapter(nn.Module):
    """One task family's adapter GNN and its heads."""

    def __init__(self, spec: GNNSpec, base_out_dim: int, targets: Sequence[str]) -> None:
        super().__init__()
        from torch_geometric.nn import AttentionalAggregation

        self.spec = spec
        h = spec.hidden
        act = ACTIVATIONS[spec.activation]
        self.embed = nn.Sequential(nn.Linear(NUM_NODE_FEATURES, h), act())
        # concat[adapter_{i-1}, base_i] (2h wide) is projected to h before the conv
        self.mix = nn.ModuleList(nn.Linear(2 * h, h) for _ in range(spec.layers))
        self.convs = nn.ModuleList(_make_conv(spec.conv, h) for _ in range(spec.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(spec.layers))
        self.act = act()
        self.attention = (
            AttentionalAggregation(nn.Linear(h, 1)) if spec.pool == "attention" else None
        )
        self.out_dim = h * (2 if spec.pool == "sum+mean" else 1)
        in_dim = base_out_dim + self.out_dim + spec.config_dim + spec.analytic_dim
        self.heads = target_heads(in_dim, spec.head_hidden, targets)

    def gnn_parameters(self) -> Iterable[nn.Parameter]:
        """Everything but the heads."""
        for name, p in self.named_parameters():
            if not name.startswith("heads."):
                yield p

    def encode(self, data: Any, states: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.embed(data.x)
        residual = self.spec.conv != "graphconv"
        for base_i, mix, conv, norm in zip(states, self.mix, self.convs, self.norms):
            z = mix(torch.cat([x, base_i], dim=1))
            if self.spec.conv == "graphconv":
                h = conv(z, data.edge_index)
            else:
                h = conv(z, data.edge_index, data.edge_attr)
            h = self.act(norm(h))
            x = x + h if residual else h
        return pool_nodes(self.spec, x, batch_of(data, x), self.attention)


class KAdapterNet(nn.Module):
    """A base :class:`PerformanceGNN` plus K adapters.

    ``encode`` returns ``concat[base embedding, adapter_1 ... adapter_K
    embeddings]`` and ``heads_forward`` splits it again, so
    :meth:`Predictor.predict` drives this module like a plain GNN.
    """

    def __init__(
        self,
        base: PerformanceGNN,
        families: Sequence[str],
        targets: Sequence[str],
        trained: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.spec = base.spec
        self.families = list(families)
        self.targets = list(targets)
        # per family: the targets its adapter was trained on (averaging uses only those)
        self.trained = {f: list((trained or {}).get(f, [])) for f in self.families}
        self.adapters = nn.ModuleList(
            Adapter(base.spec, base.encoder.out_dim, targets) for _ in self.families
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``heads`` (the adapters' heads), ``base`` (base GNN), ``adapters`` (their GNNs)."""
        return {
            "heads": [p for a in self.adapters for p in a.heads.parameters()],
            "base": list(self.base.parameters()),
            "adapters": [p for a in self.adapters for p in a.gnn_parameters()],
        }

    def encode(self, data: Any) -> torch.Tensor:
        states, emb = base_states(self.base.encoder, data)
        return torch.cat([emb, *(a.encode(data, states) for a in self.adapters)], dim=1)

    def _split(self, embedding: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        d = self.base.encoder.out_dim
        base, parts, start = embedding[:, :d], [], d
        for a in self.adapters:
            parts.append(embedding[:, start : start + a.out_dim])
            start += a.out_dim
        return base, parts

    def adapter_forward(
        self,
        k: int,
        base_emb: torch.Tensor,
        adapter_emb: torch.Tensor,
        config: torch.Tensor,
        analytic: torch.Tensor,
        targets: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        z = torch.cat([base_emb, adapter_emb, config, analytic], dim=1)
        heads = self.adapters[k].heads
        return {t: heads[t](z).squeeze(1) for t in targets or self.targets}

    def heads_forward(
        self,
        embedding: torch.Tensor,
        config: torch.Tensor,
        analytic: torch.Tensor,
        targets: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The K heads' predictions (normalised), averaged per target."""
        base, parts = self._split(embedding)
        outs = [self.adapter_forward(k, base, e, config, analytic) for k, e in enumerate(parts)]
        result = {}
        for t in targets or self.targets:
            ks = [k for k, f in enumerate(self.families) if t in self.trained[f]]
            ks = ks or list(range(len(self.families)))
            result[t] = torch.stack([outs[k][t] for k in ks]).mean(0)
        return result

    def forward(
        self, data: Any, config: torch.Tensor, analytic: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.encode(data), config, analytic)


class KAdapterPredictor(Predictor):
    """A fitted base :class:`Predictor` (frozen) plus one adapter per task family.

    ``fit(samples)`` trains an adapter and its heads on the samples of each
    family in ``families`` (every family present when None), ``k_epochs``
    epochs each; :meth:`finetune` adapts to a new family's ``#N`` samples in a
    ``-k_adapt`` mode. The base predictor passed in is never modified.
    """

    def __init__(
        self,
        base: Predictor | None = None,
        families: Sequence[str] | None = None,
        k_epochs: int = 40,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        grad_clip: float = 5.0,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            spec=None,
            targets=list(base.targets) if base is not None else [],
            tar_norm=base.tar_norm if base is not None else "stand",
            epochs=k_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            seed=seed,
            progress=progress,
        )
        self.base = base
        self.families = list(families) if families is not None else None
        self.k_epochs = k_epochs
        if base is not None:
            self._featurizer = base._featurizer  # share the graph cache
            # the base's targets are ratios to its analytic estimates: keep them
            self.analytic = base.analytic
            self.latency_model = base.latency_model

    # -- training ---------------------------------------------------------------------------
    def fit(self, samples: Sequence[Sample], finetune: bool = False) -> FitReport:
        """Train one adapter per family on that family's samples (the base stays frozen)."""
        from torch_geometric.data import Batch

        if finetune:
            return self.finetune(samples, k_adapt=0, epochs=self.k_epochs)
        if self.base is None or self.base.model is None:
            raise PredictorError("K-adapters need a fitted base predictor")
        if not samples:
            raise PredictorError("no samples to fit the adapters on")
        present = sorted({s.family for s in samples})
        families = self.families if self.families is not None else present
        missing = [f for f in families if f not in present]
        if missing:
            raise PredictorError(f"no samples of adapter family {missing[0]!r}")
        if not families:
            raise PredictorError("no family to train an adapter on")
        self.normalizers = copy.deepcopy(self.base.normalizers)
        if "acc_norm" in self.base.meta:  # the accuracy outputs' reference level (train.py)
            self.meta["acc_norm"] = copy.deepcopy(self.base.meta["acc_norm"])
        new = [t for t in _targets_of(samples) if t not in self.base.targets]
        self.targets = list(self.base.targets) + new
        trained = {
            f: [t for t in self.targets if any(t in s.labels for s in samples if s.family == f)]
            for f in families
        }
        base_model = copy.deepcopy(self.base.model)
        spec = copy.deepcopy(base_model.spec)
        self.spec = spec
        self.model = KAdapterNet(base_model, families, self.targets, trained)
        self.families = list(families)
        graphs, cfg, ana, y = self._tensors(samples)
        report = FitReport(epochs=self.k_epochs)
        t0 = time.perf_counter()
        for k, family in enumerate(families):
            rows = [i for i, s in enumerate(samples) if s.family == family]
            adapter = self.model.adapters[k]

            def loss_fn(idx: list[int], rows=rows, k=k) -> torch.Tensor | None:
                ids = [rows[i] for i in idx]
                batch = Batch.from_data_list([graphs[i] for i in ids])
                with torch.no_grad():  # the base is frozen: no graph through it
                    states, emb = base_states(self.model.base.encoder, batch)
                a_emb = self.model.adapters[k].encode(batch, states)
                out = self.model.adapter_forward(k, emb, a_emb, cfg[ids], ana[ids])
                return self._loss(out, y[ids])

            sub = train_epochs(
                self.model,
                list(adapter.parameters()),
                loss_fn,
                len(rows),
                epochs=self.k_epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                weight_decay=self.weight_decay,
                grad_clip=self.grad_clip,
                seed=self.seed + k,
                progress=self.progress,
                desc=f"adapter {family}",
            )
            report.train_loss += sub.train_loss
        report.seconds = time.perf_counter() - t0
        self.meta["k_adapter"] = {"families": families, "trained": trained}
        return report

    def finetune(
        self,
        samples: Sequence[Sample],
        k_adapt: int = 0,
        epochs: int = 10,
        *,
        lr: float | None = None,
        batch_size: int = 8,
    ) -> FitReport:
        """Fine-tune in place on ``samples`` in a ``-k_adapt`` mode (see the module docstring)."""
        from torch_geometric.data import Batch

        if k_adapt not in K_ADAPT_MODES:
            raise PredictorError(f"-k_adapt must be one of {sorted(K_ADAPT_MODES)}, not {k_adapt}")
        model = self._check_fitted()
        assert isinstance(model, KAdapterNet)
        labelled = [s for s in samples if any(t in s.labels for t in self.targets)]
        if not labelled or epochs <= 0:
            return FitReport(epochs=0)
        groups = model.parameter_groups()
        params = [p for g in K_ADAPT_MODES[k_adapt] for p in groups[g]]
        graphs, cfg, ana, y = self._tensors(labelled)
        base_frozen = "base" not in K_ADAPT_MODES[k_adapt]

        def loss_fn(idx: list[int]) -> torch.Tensor | None:
            batch = Batch.from_data_list([graphs[i] for i in idx])
            with torch.set_grad_enabled(not base_frozen):
                states, emb = base_states(model.base.encoder, batch)
            parts = [a.encode(batch, states) for a in model.adapters]
            out = model.heads_forward(torch.cat([emb, *parts], 1), cfg[idx], ana[idx])
            return self._loss(out, y[idx])

        report = train_epochs(
            model,
            params,
            loss_fn,
            len(labelled),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr if lr is not None else self.lr / 10,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            seed=self.seed,
            progress=self.progress,
            desc=f"fine-tune (k_adapt {k_adapt})",
        )
        self.meta.setdefault("finetune", []).append(
            {"k_adapt": k_adapt, "epochs": epochs, "samples": len(labelled)}
        )
        return report

    def clone(self) -> KAdapterPredictor:
        """An independent copy (the featuriser cache is shared)."""
        new = copy.copy(self)
        new.model = copy.deepcopy(self.model)
        new.normalizers = copy.deepcopy(self.normalizers)
        new.targets = list(self.targets)
        new.meta = copy.deepcopy(self.meta)
        return new

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file (format ``aiop-kadapter-predictor``); read with :meth:`load`."""
        model = self._check_fitted()
        assert isinstance(model, KAdapterNet)
        path = Path(path)
        meta = {
            **file_header(FORMAT),
            "config": json.dumps(
                {
                    **self._state_dict_json(),
                    "families": model.families,
                    "trained": model.trained,
                }
            ),
        }
        return write_weights(path, model.state_dict(), meta)

    @classmethod
    def load(cls, path: str | Path) -> KAdapterPredictor:
        path = Path(path)
        meta, state = read_weights(path, FORMAT)
        try:
            config = json.loads(meta["config"])
            spec = GNNSpec.from_dict(config["spec"])
            net = KAdapterNet(
                PerformanceGNN(spec), config["families"], config["targets"], config["trained"]
            )
            net.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise PredictorError(
                f"{path}: corrupt K-adapter metadata ({str(exc).splitlines()[0]})"
            ) from None
        pred = cls(families=config["families"])
        pred._restore_state_json(config)
        net.eval()
        pred.model = net
        return pred


def _targets_of(samples: Sequence[Sample]) -> list[str]:
    found: dict[str, None] = {}
    for s in samples:
        for t, v in s.labels.items():
            if v is not None and math.isfinite(v):
                found[t] = None
    return list(found)
