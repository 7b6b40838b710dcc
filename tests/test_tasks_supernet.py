"""Weight-sharing supernets (aiop.tasks.supernet): slicing, inheritance, training, resume."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from aiop.cache import Store
from aiop.models.families import FAMILY_NAMES, sample_arch
from aiop.tasks import supernet as sn
from aiop.tasks.checkpoints import save_checkpoint
from aiop.tasks.labels import SupernetMismatch, inventory, label_archs
from aiop.tasks.train import TrainConfig, build_task_model

FAMILIES = list(FAMILY_NAMES)


def _tiny(family: str, **kw) -> sn.SupernetConfig:
    # 32 digits, one step an epoch: seconds, not minutes
    return sn.SupernetConfig(family, **{"epochs": 2, "n_train": 32, "n_val": 20, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_subnets_are_views_of_the_supernet(family):
    """An inherited architecture computes what functional_call on the supernet's views does,
    and its gradients land in the supernet's slices only."""
    torch.manual_seed(0)
    sup = sn.build_supernet(sn.SupernetConfig(family))
    params = dict(sup.named_parameters())
    for arch in (
        sn.smallest_arch(family),
        {**sample_arch(family, 5), "resolution": 32},
        {**sample_arch(family, 11), "resolution": 32},
    ):
        sub = sn._subnet(arch, sn.SupernetConfig(family))
        sn.inherit(sub, dict(sup.state_dict()), arch, head=True)
        sub.eval()
        x = torch.rand(2, 3, 32, 32)
        views = sn.subnet_tensors(sub, params, arch)
        assert torch.equal(sub(x), torch.func.functional_call(sub, views, (x,)))
    # the smallest architecture's stem conv is the leading corner of the supernet's
    arch = sn.smallest_arch(family)
    sub = sn._subnet(arch, sn.SupernetConfig(family))
    sup.zero_grad()
    sub.train()
    out = torch.func.functional_call(sub, sn.subnet_tensors(sub, params, arch), (x,))
    out.sum().backward()
    name = next(n for n, _ in sub.named_parameters() if n.startswith("stem"))
    grad = params[name].grad
    sliced = sn.slice_like(grad, dict(sub.named_parameters())[name].shape)
    assert sliced.abs().sum() > 0
    assert grad.abs().sum() == pytest.approx(sliced.abs().sum().item())


def test_block_map_and_kernel_centre():
    arch = {**sample_arch("ofa_mbv3", 0), "d": [2, 3, 4, 2, 2]}
    assert sn._block_map(arch) == [0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 14, 17, 18]
    pn = {**sample_arch("ofa_pn", 0), "d": [2, 2, 2, 2, 2]}
    assert sn._block_map(pn)[-1] == 21  # the 320-wide block
    res = {**sample_arch("ofa_resnet", 0), "d": [0, 0, 1, 2, 0]}
    assert sn._block_map(res) == [0, 1, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    assert sn.supernet_key(res, "stem.1.conv.weight") == "stem.2.conv.weight"
    k = torch.arange(49.0).reshape(1, 1, 7, 7)
    assert torch.equal(sn.slice_like(k, (1, 1, 3, 3)), k[:, :, 2:5, 2:5])
    with pytest.raises(sn.SupernetError, match="cannot slice"):
        sn.slice_like(k, (1, 1, 9, 9))


def test_train_resume_is_identical_and_inheritance_is_used(tmp_path, monkeypatch):
    """A run killed after its first epoch resumes to the very weights of an unkilled run; a
    ``init="supernet"`` task model starts from them, training the supernet only once."""
    cfg = _tiny("ofa_pn")
    whole = tmp_path / "whole.safetensors"
    meta = sn.train_supernet(cfg, whole)
    assert meta["complete"] and meta["epochs_done"] == 2 and meta["steps"] == 2
    assert 0.0 <= meta["top1_largest"] <= 1.0 and 0.0 <= meta["top1_smallest"] <= 1.0

    killed = tmp_path / "killed.safetensors"
    real_save = sn.save_supernet

    def save_then_die(model, meta, path, opt=None):
        real_save(model, meta, path, opt)
        raise KeyboardInterrupt

    monkeypatch.setattr(sn, "save_supernet", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sn.train_supernet(cfg, killed)
    monkeypatch.setattr(sn, "save_supernet", real_save)
    _, partial = sn.load_supernet(killed, cfg)
    assert partial["epochs_done"] == 1 and not partial["complete"]
    sn.train_supernet(cfg, killed)
    a, _ = sn.load_supernet(whole, cfg)
    b, _ = sn.load_supernet(killed, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the identity hashes weights, not the file (whose metadata holds training seconds)
    ident = sn.checkpoint_identity(whole)
    assert ident == sn.checkpoint_identity(killed) and ident["key"] == cfg.key()
    assert len(ident["weights_sha256"]) == 16
    other = tmp_path / "other.safetensors"
    sn.train_supernet(_tiny("ofa_pn", seed=1), other)
    assert sn.checkpoint_identity(other)["weights_sha256"] != ident["weights_sha256"]

    # a recipe's init="supernet": trained into the cache once, then read back
    monkeypatch.setenv("AIOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sn, "supernet_config", lambda family: _tiny(family))
    model = build_task_model("family:ofa_pn:3", "classification", init="supernet")
    path = sn.cache_path(_tiny("ofa_pn"))
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    state, _ = sn.load_supernet(path)
    name = next(n for n, p in model.named_parameters() if n.startswith("blocks.3") and p.dim() == 4)
    expect = sn.subnet_tensors(model, state, model.arch, names=[name])[name]
    assert torch.equal(dict(model.named_parameters())[name], expect)
    build_task_model("family:ofa_pn:4", "semantic", init="supernet")
    assert path.stat().st_mtime_ns == stamp  # reused, not retrained

    # an inherited label records which trained supernet it came from
    db = tmp_path / "labels.db"
    tiny = TrainConfig(epochs=1, n_train=32, n_val=16, batch_size=16, init="supernet")
    report = label_archs(
        db, ["family:ofa_pn:5"], ["classification"], tiny, width=16, progress=False
    )
    assert len(report.labelled) == 1 and not report.failed
    with Store(db, readonly=True) as s:
        (rec,) = list(s.labels(kind="acc"))
    assert rec.extra["supernet"] == sn.checkpoint_identity(path)
    assert path.stat().st_mtime_ns == stamp

    # another trained instance of the same config (as another machine's floating point
    # gives; here: nudged weights) must not add to that set, whose labels it would rank
    # differently; under another tag it may, and nothing is lost
    state, meta = sn.load_supernet(path)
    state = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(state, meta, path)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    with pytest.raises(SupernetMismatch, match="holds ofa_pn labels inherited from supernet"):
        label_archs(db, ["family:ofa_pn:6"], ["classification"], tiny, width=16, progress=False)
    other = label_archs(
        db, ["family:ofa_pn:6"], ["classification"], tiny, width=16, progress=False, tag="b"
    )
    assert len(other.labelled) == 1
    with Store(db, readonly=True) as s:
        modes = sorted(r.mode for r in s.labels(kind="acc"))
    assert modes == ["b", "individual"]
    sets = {x.tag: x.supernets for x in inventory(db)}
    nudged = sn.checkpoint_identity(path)["weights_sha256"]
    assert sets == {"individual": [rec.extra["supernet"]["weights_sha256"]], "b": [nudged]}


def test_bad_input(tmp_path):
    with pytest.raises(sn.SupernetError, match="unknown family"):
        sn.SupernetConfig("ofa_vit")
    with pytest.raises(sn.SupernetError, match="epochs"):
        sn.SupernetConfig("ofa_mbv3", epochs=0)
    with pytest.raises(sn.SupernetError, match="does not exist"):
        sn.load_supernet(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(sn.SupernetError, match="not a safetensors"):
        sn.load_supernet(junk)
    cfg = _tiny("ofa_mbv3", epochs=1)
    path = tmp_path / "s.safetensors"
    sn.train_supernet(cfg, path)
    with pytest.raises(sn.SupernetError, match="another config"):
        sn.load_supernet(path, _tiny("ofa_mbv3", epochs=1, seed=1))
    zoo = build_task_model("zoo:mobilenet_v2", "classification")
    with pytest.raises(ValueError, match="supernet"):
        sn.inherit_spec(zoo, cfg)
    with pytest.raises(ValueError, match="unknown backbone init"):
        TrainConfig(init="imagenet")
    with pytest.raises(ValueError, match="unknown backbone init"):
        build_task_model("family:ofa_mbv3:0", "classification", init="imagenet")


def test_random_architectures_always_fit(tmp_path):
    """Every sampled architecture of every family is a slice of its supernet."""
    rng = random.Random(0)
    for family in FAMILIES:
        sup = dict(sn.build_supernet(sn.SupernetConfig(family)).state_dict())
        for _ in range(5):
            arch = {**sample_arch(family, rng.randrange(10**6)), "resolution": 32}
            sub = sn._subnet(arch, sn.SupernetConfig(family))
            sn.inherit(sub, sup, arch, head=True)


def test_two_processes_train_one_supernet_once(tmp_path, monkeypatch):
    """ensure_supernet holds a lock while it trains: a second caller waits and reuses."""
    import threading
    import time

    cfg = _tiny("ofa_mbv3", epochs=1)
    calls = []
    real = sn.train_supernet

    def slow_train(c, path, progress=False):
        calls.append(path)
        time.sleep(0.5)  # long enough for the other caller to find the lock taken
        return real(c, path)

    monkeypatch.setattr(sn, "train_supernet", slow_train)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(sn.ensure_supernet(cfg, tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and paths[0] == paths[1] == sn.cache_path(cfg, tmp_path)


def test_command_line(tmp_path, capsys):
    """``python -m aiop.tasks.supernet``: trains into the cache once, reuses, one-line errors."""
    import json

    argv = ["-family", "ofa_pn", "-epochs", "1", "-n_train", "32", "-cache_dir", str(tmp_path)]
    assert sn.main([*argv, "-q", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["complete"] and meta["config"]["n_train"] == 32
    stamp = (tmp_path / "supernets").stat().st_mtime_ns
    assert sn.main([*argv, "-q"]) == 0  # already there: nothing trained
    assert "ofa_pn: " in capsys.readouterr().out
    assert (tmp_path / "supernets").stat().st_mtime_ns == stamp
    for bad, message in [
        (["-family", "ofa_vit"], "unknown family"),
        (["-family", "ofa_pn", "-epochs", "0"], "epochs >= 1"),
        (["-family", "ofa_pn", "-epochs", "x"], "invalid int"),
    ]:
        try:
            code = sn.main(bad)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (bad, err)


def test_supernet_instances_benchmark(tmp_path, monkeypatch, capsys):
    """Two tiny instances (two seeds) label the same architectures: a report with their
    identities and the Spearman between them; a rerun resumes from the label log."""
    from script_helpers import load_script

    bench = load_script("benchmarks/supernet_instances.py", "supernet_instances")
    monkeypatch.setenv("AIOP_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--family", "ofa_pn", "--epochs", "1", "--seeds", "0", "1", "--num_archs", "3"]
    argv += ["--supernet_n_train", "32", "--label_n_train", "32", "-q"]
    argv += ["--out", str(tmp_path), "--name", "si"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "si.json").read_text())
    assert list(result["labels"]) == ["e1-s0", "e1-s1"]
    assert all(len(v) == 3 for v in result["labels"].values())
    a, b = (result["supernets"][k]["weights_sha256"] for k in ("e1-s0", "e1-s1"))
    assert a != b  # two seeds, two instances
    (pair,) = result["pairs"]
    assert pair["a"] == "e1-s0" and -1.0 <= pair["spearman"] <= 1.0
    log = (tmp_path / "si_labels.jsonl").read_text().splitlines()
    assert len(log) == 6
    assert bench.main(argv) == 0  # resumes: every label is logged, nothing trains again
    assert (tmp_path / "si_labels.jsonl").read_text().splitlines() == log
    capsys.readouterr()
    assert bench.main(["--family", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
