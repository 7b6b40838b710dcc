"""The one training loop (:func:`aiop.predictor.api.train_epochs`): every way into it trains
bit for bit alike, so ``Predictor.fit`` and the fine-tunes cannot drift apart."""

from __future__ import annotations

import pytest
import torch

from aiop.cg import from_torch
from aiop.mconfig import MConfig
from aiop.models.examples import SmallCNN, TinyResNet
from aiop.predictor.analytic import estimate_memory
from aiop.predictor.api import Predictor, Sample
from aiop.predictor.model import GNNSpec
from aiop.predictor.train import _finetune_loop

T = "acc:cls"
EPOCHS = 3


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    out = []
    for family, cls in (("cnn", SmallCNN), ("res", TinyResNet)):
        for width in (8, 12, 16):
            model = cls(width=width)
            cg = from_torch(model, (1, *model.input_size), name=f"{family}{width}")
            cg.meta["fp"] = cg.fingerprint
            for spec in ("bs=8", "bs=16,freeze=0.5"):
                peak = estimate_memory(cg, spec).peak_memory_bytes * (1.1 + width / 100)
                labels = {"memory": peak, "flops": float(cg.total_flops), T: width / 100}
                out.append(Sample(cg, MConfig.parse(spec), labels, family))
    return out


def _pred(epochs: int, dropout: float = 0.0) -> Predictor:
    spec = GNNSpec(conv="graphconv", layers=2, hidden=8, head_hidden=8, dropout=dropout)
    return Predictor(
        spec=spec, targets=["memory", "flops", T], epochs=epochs, batch_size=4, progress=False
    )


def _same_weights(a: Predictor, b: Predictor) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fit_is_an_untrained_fit_then_the_shared_loop(samples, dropout):
    full = _pred(EPOCHS, dropout)
    report = full.fit(samples)
    split = _pred(0, dropout)
    assert split.fit(samples).train_loss == []
    # fit seeds torch before building the network: the loop continues that stream (dropout)
    again = split._train_epochs(samples, EPOCHS, seed_torch=False)
    _same_weights(full, split)
    assert again.train_loss == report.train_loss and len(report.train_loss) == EPOCHS
    assert not split.model.training and all(p.requires_grad for p in split.model.parameters())


def test_fit_equals_the_fine_tune_loop_with_all_parameters_and_no_ranking(samples):
    # the path fit_predictor(rank_weight > 0) and the custom fine-tunes take, at rank weight 0
    full = _pred(EPOCHS)
    report = full.fit(samples)
    other = _pred(0)
    other.fit(samples)
    losses = _finetune_loop(other, samples, EPOCHS, EPOCHS, "all", 0.0, other.seed)
    _same_weights(full, other)
    assert losses == report.train_loss


def test_stopping_early_is_the_start_of_the_full_schedule(samples):
    base = _pred(0)
    base.fit(samples)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def snap(epoch: int, pred: Predictor) -> None:
        assert not pred.model.training  # callbacks see the model in eval mode
        seen[epoch] = {k: v.clone() for k, v in pred.model.state_dict().items()}

    full = _pred(0)
    full.fit(samples)
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    all_losses = _finetune_loop(
        full, samples, EPOCHS, EPOCHS, "heads", 1.0, 5, lambda e: snap(e, full)
    )
    assert sorted(seen) == list(range(EPOCHS + 1))
    assert all(torch.equal(before[k], v) for k, v in seen[0].items())
    short = _pred(0)
    short.fit(samples)
    losses = _finetune_loop(short, samples, EPOCHS, 1, "heads", 1.0, 5)
    assert losses == all_losses[:1]
    state = short.model.state_dict()
    assert all(torch.equal(seen[1][k], state[k]) for k in state)
    # the encoder was frozen (only the heads train) and its flags are restored
    enc = [k for k in state if k.startswith("encoder.")]
    assert enc and all(torch.equal(before[k], state[k]) for k in enc)
    assert all(p.requires_grad for p in short.model.parameters())


def test_diverged_training_is_an_error_not_nan_weights(samples):
    from aiop.predictor.api import PredictorError

    pred = Predictor(
        spec=GNNSpec(conv="graphconv", layers=2, hidden=8, head_hidden=8),
        targets=[T],
        epochs=2,
        batch_size=4,
        lr=float("inf"),  # the first step makes every weight non-finite
        progress=False,
    )
    with pytest.raises(PredictorError, match=r"training diverged.*lower the learning rate"):
        pred.fit(samples)


@pytest.mark.parametrize("pos_enc", [1, 3])
def test_positional_encoding_tells_slots_apart(samples, pos_enc):
    from torch_geometric.data import Batch

    from aiop.cg.pyg import to_pyg
    from aiop.predictor.model import GraphEncoder, node_positions

    spec = GNNSpec(conv="gine", layers=1, hidden=8, pos_enc=pos_enc)
    graphs = [to_pyg(samples[0].cg), to_pyg(samples[-1].cg)]
    batch = Batch.from_data_list(graphs)
    pos = node_positions(batch.x, batch.batch, pos_enc)
    assert pos.shape == (batch.num_nodes, 2 + 4 * pos_enc)
    for g in range(2):  # t runs 0 → 1 through each graph's nodes in order
        t = pos[batch.batch == g, 0]
        assert t[0] == 0 and t[-1] == 1 and bool((t[1:] > t[:-1]).all())
    s = pos[:, 1]  # within each stage (one output size) the place runs 0 → 1 in order too
    assert float(s.min()) == 0 and float(s.max()) == 1
    # one graph alone or in a batch: the same positions (no leak between graphs)
    alone = node_positions(graphs[1].x, torch.zeros(graphs[1].num_nodes, dtype=torch.long), 3)
    assert torch.equal(alone[:, :2], pos[batch.batch == 1][:, :2])
    out = GraphEncoder(spec)(batch)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_positional_encoding_round_trips_and_defaults_off(samples, tmp_path):
    assert GNNSpec().pos_enc == 0  # the shipped predictor's setting: no positions
    with pytest.raises(ValueError, match="pos_enc"):
        GNNSpec(pos_enc=-1).validate()
    spec = GNNSpec(conv="graphconv", layers=2, hidden=8, head_hidden=8, pos_enc=2)
    pred = Predictor(spec=spec, targets=[T], epochs=2, batch_size=4, progress=False)
    pred.fit(samples)
    path = pred.save(tmp_path / "p.safetensors")
    again = Predictor.load(path)
    assert again.spec.pos_enc == 2
    cg = samples[0].cg
    assert again.predict(cg, [MConfig()]) == pred.predict(cg, [MConfig()])


def test_build_is_fit_without_training():
    """``build`` gives the network ``fit`` starts from (same seed, same initial weights) and
    the normalisers ``fit`` fits, and trains nothing."""
    import torch

    from aiop.cg import from_torch
    from aiop.mconfig import MConfig
    from aiop.models.examples import SmallCNN
    from aiop.predictor.api import Predictor, Sample
    from aiop.predictor.model import GNNSpec

    cg = from_torch(SmallCNN(width=8), (1, *SmallCNN().input_size))
    samples = [Sample(cg, MConfig.parse(f"bs={b}"), {"acc:cls": 0.5 + b / 100}) for b in (4, 8)]

    def make() -> Predictor:
        spec = GNNSpec(conv="graphconv", layers=1, hidden=4, head_hidden=4)
        return Predictor(spec=spec, targets=["acc:cls"], epochs=0, progress=False)

    built, fitted = make(), make()
    built.build(samples)
    fitted.fit(samples)
    assert built.normalizers["acc:cls"].to_dict() == fitted.normalizers["acc:cls"].to_dict()
    for (name, a), b in zip(built.model.state_dict().items(), fitted.model.state_dict().values()):
        assert torch.equal(a, b), name
