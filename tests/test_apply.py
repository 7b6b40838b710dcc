"""apply: a config trains a model for real, with the same gradients as plain training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aiop.mconfig import MConfig, MConfigError, make_optimizer, prepare, split_batch, train_step
from aiop.mconfig.apply import CheckpointedBlocks, disable_checkpointing
from aiop.mconfig.config import method_trains
from aiop.models.base import BlockNet, parameterised_modules


class GNResNet(BlockNet):
    """A small residual net with GroupNorm and dropout (per-sample normalisation, so
    micro-batching must not change its gradients)."""

    input_size = (3, 12, 12)
    num_classes = 7

    def __init__(self, n_blocks: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())

        class Res(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(8, 8, 3, padding=1)
                self.norm = nn.GroupNorm(2, 8)
                self.drop = nn.Dropout(0.2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x + self.drop(torch.relu(self.norm(self.conv(x))))

        self.blocks = nn.ModuleList(Res() for _ in range(n_blocks))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7))


class BNNet(BlockNet):
    """A small CNN with BatchNorm."""

    input_size = (3, 10, 10)
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
            for _ in range(4)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_grads(model: nn.Module, batch, seed: int = 1) -> dict[str, torch.Tensor]:
    (inputs, targets) = batch
    torch.manual_seed(seed)
    model.loss(model(*inputs), targets).backward()
    return _grads(model)


@pytest.mark.parametrize("mb", [16, 8, 4, 1])
@pytest.mark.parametrize("ckpt", [0, 1, 2, 3, 6])
def test_gradients_equal_full_batch(mb: int, ckpt: int) -> None:
    torch.manual_seed(0)
    base = GNResNet().eval()  # eval: dropout off, so micro-batches see the same function
    batch = base.make_batch(16, generator=torch.Generator().manual_seed(0))
    ref = _reference_grads(copy.deepcopy(base), batch)
    model = copy.deepcopy(base)
    cfg = MConfig(batch_size=16, micro_batch=mb, ckpt=ckpt)
    plan = prepare(model, cfg)
    model.eval()
    assert plan.effective_segments == ckpt
    loss = train_step(model, None, cfg, batch)  # no optimizer: gradients stay in .grad
    got = _grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        full = base.loss(base(*batch[0]), batch[1])
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)


def test_checkpointing_with_dropout_and_batchnorm_matches_plain() -> None:
    """Checkpoint recomputation replays dropout's RNG and leaves BN statistics as one pass."""
    torch.manual_seed(0)
    for base in (GNResNet().train(), BNNet().train()):
        batch = base.make_batch(8, generator=torch.Generator().manual_seed(1))
        plain = copy.deepcopy(base)
        ref = _reference_grads(plain, batch, seed=5)
        model = copy.deepcopy(base)
        cfg = MConfig(batch_size=8, ckpt=2)
        prepare(model, cfg)
        torch.manual_seed(5)
        train_step(model, None, cfg, batch)
        got = _grads(model)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
        for (name, b1), b2 in zip(plain.named_buffers(), model.buffers()):
            torch.testing.assert_close(b1, b2, msg=name)  # running stats updated once


def test_frozen_gradients_match_too() -> None:
    torch.manual_seed(0)
    base = GNResNet().eval()
    batch = base.make_batch(8, generator=torch.Generator().manual_seed(2))
    cfg = MConfig(batch_size=8, micro_batch=2, freeze=0.5, ckpt=2)
    model = copy.deepcopy(base)
    plan = prepare(model, cfg)
    model.eval()
    ref_model = copy.deepcopy(base)
    for name, p in ref_model.named_parameters():
        p.requires_grad_(name in plan.trainable_params)
    ref = _reference_grads(ref_model, batch)
    train_step(model, None, cfg, batch)
    got = _grads(model)
    assert got.keys() == ref.keys() == set(plan.trainable_params)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


def test_freezing_walks_layers_in_forward_order() -> None:
    model = GNResNet()
    units = parameterised_modules(model)
    plan = prepare(model, MConfig(freeze=0.5))
    n = plan.n_frozen_units
    assert len(units) == 15 and n == 8  # 7.5 rounds half up
    for k, (_, m) in enumerate(units):
        assert all(p.requires_grad == (k >= n) for p in m.parameters(recurse=False))
    # stem conv, stem norm, then (conv, norm) per block: blocks 0..2 frozen, block 3 half
    assert plan.first_trainable_block is not None and plan.first_trainable_block > 0


def test_freezing_follows_execution_not_registration_order() -> None:
    class Down(nn.Module):  # registers ``skip`` last but runs it first, like ResNet
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.skip = nn.Conv2d(6, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.skip(x)
            return s + self.conv(x)

    model = BNNet()
    model.blocks[0] = Down()
    state = torch.get_rng_state()
    plan = prepare(model, MConfig(freeze=0.3))  # 11 layers → 3 frozen
    assert torch.equal(state, torch.get_rng_state())  # the order probe left the RNG alone
    assert plan.units[:4] == ["stem.0", "stem.1", "blocks.0.skip", "blocks.0.conv"]
    assert not model.blocks[0].skip.weight.requires_grad
    assert model.blocks[0].conv.weight.requires_grad
    assert model.training


def test_segments_cover_only_trainable_blocks_and_are_capped() -> None:
    model = GNResNet(n_blocks=6)
    # 15 layers; freeze 0.8 → 12 frozen: stem (2) and blocks 0..4 (10); only block 5 + head train
    plan = prepare(model, MConfig(freeze=0.8, ckpt=3))
    assert plan.first_trainable_block == 5
    assert plan.segments == [(5, 6)]  # ckpt capped to the one trainable block
    assert isinstance(model.blocks, CheckpointedBlocks)
    plan = prepare(model, MConfig(ckpt=0))
    assert type(model.blocks) is nn.ModuleList and plan.segments == []


def test_checkpointing_keeps_names_and_state_dict() -> None:
    model = GNResNet()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    prepare(model, MConfig(ckpt=3))
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    assert len(model.blocks) == 6 and isinstance(model.blocks[0], nn.Module)
    disable_checkpointing(model)
    assert type(model.blocks) is nn.ModuleList


def test_too_many_segments_is_a_clear_error() -> None:
    with pytest.raises(MConfigError, match="more checkpoint segments than the 4 blocks"):
        prepare(BNNet(), MConfig(ckpt=5))


def test_optimizers_and_a_real_step_change_weights() -> None:
    for opt in ("sgd", "adam", "adamw"):
        torch.manual_seed(0)
        model = BNNet()
        cfg = MConfig(batch_size=8, micro_batch=4, ckpt=2, opt=opt)
        prepare(model, cfg)
        optimizer = make_optimizer(model, cfg)
        assert optimizer is not None
        before = [p.detach().clone() for p in model.parameters()]
        batch = model.make_batch(8, generator=torch.Generator().manual_seed(0))
        loss = train_step(model, optimizer, cfg, batch)
        assert torch.isfinite(loss)
        assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert len(optimizer.state) == sum(1 for _ in model.parameters())


def test_all_frozen_is_a_forward_only_step() -> None:
    model = BNNet()
    cfg = MConfig(batch_size=4, freeze=1.0, ckpt=2)
    plan = prepare(model, cfg)
    assert plan.trainable_params == [] and plan.segments == []
    assert make_optimizer(model, cfg) is None
    loss = train_step(model, None, cfg, model.make_batch(4))
    assert torch.isfinite(loss) and not loss.requires_grad


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_autocast_precisions_train(prec: str) -> None:
    torch.manual_seed(0)
    model = GNResNet()
    cfg = MConfig(batch_size=4, micro_batch=2, ckpt=2, prec=prec, opt="adam")
    prepare(model, cfg)
    optimizer = make_optimizer(model, cfg)
    seen: list[torch.dtype] = []
    handle = model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = train_step(model, optimizer, cfg, model.make_batch(4))
    handle.remove()
    assert torch.isfinite(loss)
    assert seen and seen[0] == {"bf16": torch.bfloat16, "fp16": torch.float16}[prec]


def test_split_batch_gives_views() -> None:
    cfg = MConfig(batch_size=8, micro_batch=2)
    (x,), y = BNNet().make_batch(8)
    parts = split_batch(((x,), y), cfg)
    assert len(parts) == 4
    assert all(p[0][0].shape[0] == 2 and p[0][0].data_ptr() != 0 for p in parts)
    assert parts[1][0][0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), y)


def test_method_rules() -> None:
    assert method_trains("full", "blocks.0.conv.weight", False, False)
    assert not method_trains("last", "blocks.0.conv.bias", False, False)
    assert method_trains("last", "head.fc.weight", True, False)
    assert method_trains("bias", "blocks.0.conv.bias", False, False)
    assert not method_trains("bias", "blocks.0.conv.weight", False, False)
    assert method_trains("norm+last", "blocks.0.bn.weight", False, True)
    assert method_trains("lite", "blocks.0.lite_residual.conv.weight", False, False)
    assert not method_trains("lite", "blocks.0.conv.bias", False, False)
    assert method_trains("lite+bias", "blocks.0.conv.bias", False, False)


@pytest.mark.parametrize("method", ["full", "last", "bias", "lite", "lite+bias", "norm+last"])
def test_tinytl_methods_train(method: str) -> None:
    tinytl = pytest.importorskip("aiop.models.tinytl", reason="aiop.models.tinytl not written yet")
    assert hasattr(tinytl, "set_train_method")
    torch.manual_seed(0)
    model = BNNet()
    cfg = MConfig(batch_size=4, micro_batch=2, ckpt=2, method=method)
    plan = prepare(model, cfg)
    assert plan.trainable_params, method
    last = parameterised_modules(model)[-1][1]
    assert all(p.requires_grad for p in last.parameters(recurse=False))
    if method == "full":
        assert not plan.frozen_params
    else:
        assert plan.frozen_params
    optimizer = make_optimizer(model, cfg)
    assert torch.isfinite(train_step(model, optimizer, cfg, model.make_batch(4)))
