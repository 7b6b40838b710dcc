"""Tests of aiop.cache: the SQLite store, crash safety, concurrency, AIO-P pickles, merging."""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from aiop.cache import (
    CacheError,
    Store,
    aiop_graph_to_cg,
    load_aiop_pkl,
    merge_stores,
)
from aiop.cg.graph import ComputeGraph, Edge, Node, TensorSpec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_cg_task_cache.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_graph(c: int = 8, name: str | None = None) -> ComputeGraph:
    """A small conv graph; its width ``c`` changes the fingerprint."""
    x, y = (1, 3, 8, 8), (1, c, 8, 8)
    nodes = [
        Node("x", "Input", "Input", [], [x], ["float32"]),
        Node("conv", "Conv", "Conv", [x], [y], ["float32"], attrs={"kernel_shape": [3, 3]},
             params=27 * c + c, flops=2 * 27 * c * 64),
        Node("relu", "Relu", "Relu", [y], [y], ["float32"]),
    ]  # fmt: skip
    edges = [Edge(0, 1, x), Edge(1, 2, y)]
    return ComputeGraph(
        nodes, edges, [TensorSpec("x", x)], [TensorSpec("y", y)], name=name or f"conv{c}",
        source="test",
    )  # fmt: skip


def make_record(i):
    """A profiler-like result whose fields depend on each other, so a torn record shows."""
    parts = {"params": 100 + i, "grads": 100 + i, "optimizer": 200 + 2 * i,
             "activations": 1000 * i, "temporary": 7 * i, "inputs": 768}  # fmt: skip
    peak = sum(parts.values())
    return {"peak_memory_bytes": peak, "breakdown": parts, "latency_s": peak / 1e6,
            "flops": 1000.0 * i, "params": 100 + i, "mode": "meta", "device": "cpu",
            "tool_version": "test-1"}  # fmt: skip


def check_record(rec) -> None:
    values = rec.values
    assert set(values) >= {"peak_memory_bytes", "latency_s", "flops", "params"}, values
    assert rec.breakdown is not None
    assert values["peak_memory_bytes"] == sum(rec.breakdown.values())
    assert abs(values["latency_s"] - values["peak_memory_bytes"] / 1e6) < 1e-12


# The writer subprocess imports only aiop.cache (fast; no torch): the graphs are
# stored by the test beforehand and the writer works by fingerprint.
WRITER = (
    inspect.getsource(make_record)
    + """
import sys, time
from aiop.cache import Store
path, n, pause, resume = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
with Store(path) as store:
    fps = [g.fingerprint for g in store.graphs()]
    work = [(i, fps[i % len(fps)], f"bs={i // len(fps) + 1},mb=1") for i in range(n)]
    if resume:
        configs = sorted({c for _, _, c in work})
        todo = set(store.missing_pairs(fps, configs, device="cpu", mode="meta"))
        work = [w for w in work if (w[1], w[2]) in todo]
    for i, fp, config in work:
        store.put_record(fp, config, make_record(i))
        print(i, flush=True)
        if pause:
            time.sleep(pause)
"""
)


def _new_store(path: Path) -> Path:
    with Store(path) as s:
        for c in (4, 5, 6, 7):
            s.put_graph(make_graph(c))
    return path


def _writer(tmp_path: Path, db: Path, n: int, pause: float, resume: bool) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    args = [sys.executable, str(script), str(db), str(n), str(pause), "1" if resume else "0"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=ENV)


def _rows(path: Path) -> set[tuple]:
    with Store(path, readonly=True) as s:
        return {
            (r.graph, r.config, r.task, r.device, r.mode, r.kind, r.value, str(r.extra))
            for r in s.labels()
        }


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- the store ---------------------------------------------------------------------
def test_graph_round_trip_and_idempotence(tmp_path):
    g = make_graph(8)
    with Store(tmp_path / "c.db") as s:
        fp = s.put_graph(g, meta={"family": "test"})
        assert s.put_graph(g, meta={"seed": 3}) == fp == g.fingerprint
        back = s.get_graph(fp)
        assert back.to_dict() == g.to_dict()
        (info,) = list(s.graphs())
        assert (info.name, info.num_nodes, info.params) == ("conv8", 3, g.total_params)
        assert info.meta == {"family": "test", "seed": 3}
        assert s.count()["graphs"] == 1
        with pytest.raises(CacheError, match="no graph"):
            s.get_graph("0" * 16)


def test_records_labels_missing(tmp_path):
    graphs = [make_graph(c) for c in (4, 5)]
    configs = ["bs=8,mb=2", "bs=16,mb=4"]
    with Store(tmp_path / "c.db") as s:
        fps = [s.put_graph(g) for g in graphs]
        assert len(s.missing(fps, configs, device="cpu", mode="meta")) == 2 * 2 * 4
        kinds = s.put_record(graphs[0], configs[0], make_record(1))
        assert sorted(kinds) == ["flops", "latency_s", "params", "peak_memory_bytes"]
        assert s.has_label(fps[0], configs[0], "latency_s", device="cpu", mode="meta")
        assert not s.has_label(fps[0], configs[0], "latency_s", device="cpu", mode="real")
        rec = s.get_record(fps[0], configs[0], device="cpu", mode="meta")
        expect = make_record(1)
        assert rec["breakdown"] == {k: float(v) for k, v in expect["breakdown"].items()}
        assert rec["peak_memory_bytes"] == expect["peak_memory_bytes"]
        assert rec["tool_version"] == "test-1" and rec["mode"] == "meta"
        pairs = s.missing_pairs(fps, configs, device="cpu", mode="meta")
        assert (fps[0], configs[0]) not in pairs and len(pairs) == 3
        s.put_label(fps[1], configs[1], "acc", 0.7, task="cifar10")
        mem = list(s.labels(kind="peak_memory_bytes", device="cpu", mode="meta"))
        assert [(m.graph, m.config) for m in mem] == [(fps[0], configs[0])]
        assert mem[0].extra["breakdown"]["activations"] == 1000
        recs = list(s.records(device="cpu", mode="meta", kinds=["peak_memory_bytes"]))
        assert len(recs) == 1
        check_record(recs[0])
        assert s.tasks()["cifar10"]["metric"] == ""
        assert s.count() == {"graphs": 2, "configs": 2, "tasks": 1, "devices": 1, "labels": 5}
        assert s.integrity_check() == "ok"
        # re-measuring replaces; replace=False keeps the first value
        assert not s.put_label(fps[1], configs[1], "acc", 0.9, task="cifar10", replace=False)
        assert next(s.labels(kind="acc")).value == 0.7


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, fp: s.put_label(fp, "bs 8", "x", 1.0), "whitespace"),
        (lambda s, fp: s.put_label(fp, "bs=8,mb", "x", 1.0), "key=value"),
        (lambda s, fp: s.put_label(fp, "bs=8", "x", float("nan")), "finite"),
        (lambda s, fp: s.put_label(fp, "bs=8", "x", "12"), "number"),
        (lambda s, fp: s.put_label("ffffffffffffffff", "bs=8", "x", 1.0), "unknown graph"),
        (lambda s, fp: s.put_record(fp, "bs=8", {"mode": "meta"}), "no numeric"),
        (lambda s, fp: s.put_record(fp, "bs=8", {"latency_s": 1, "params": None, "x": [1]}), None),
        (lambda s, fp: s.put_record(fp, "bs=8", {"flops": 1, "peak_memory_bytes": "x"}), "number"),
        (lambda s, fp: s.put_graph({"nodes": []}), "ComputeGraph"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, call, message):
    with Store(tmp_path / "c.db") as s:
        fp = s.put_graph(make_graph())
        before = s.count()
        if message is None:  # non-numeric extras are kept as info, not an error
            call(s, fp)
            return
        with pytest.raises(CacheError, match=message) as err:
            call(s, fp)
        assert "\n" not in str(err.value)
        assert s.count() == before


def test_readonly(tmp_path):
    with pytest.raises(CacheError, match="no such cache"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    with Store(tmp_path / "c.db") as s:
        s.put_graph(make_graph())
    with Store(tmp_path / "c.db", readonly=True) as r:
        assert r.count()["graphs"] == 1
        with pytest.raises(CacheError, match="read-only"):
            r.put_graph(make_graph(5))
    with pytest.raises(CacheError, match="does not exist"):
        Store(tmp_path / "nodir" / "c.db")


def _valid_store_bytes(tmp_path: Path) -> bytes:
    src = tmp_path / "valid" / "v.db"
    src.parent.mkdir()
    with Store(src) as s:
        for c in range(4, 40):
            s.put_record(make_graph(c), "bs=8", make_record(c))
    return src.read_bytes()  # closed: the WAL is checkpointed into the file


@pytest.mark.parametrize("case", ["random", "text", "truncated", "truncated_page", "foreign"])
def test_corrupt_or_foreign_file_is_refused_untouched(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "cache.db"
    if case == "random":
        path.write_bytes(os.urandom(5000))
    elif case == "text":
        path.write_text("graph,config,peak\nabc,bs=8,123\n")
    elif case == "truncated":
        path.write_bytes(_valid_store_bytes(tmp_path)[:7000])
    elif case == "truncated_page":
        data = _valid_store_bytes(tmp_path)
        page = int.from_bytes(data[16:18], "big")
        path.write_bytes(data[: page * 2])
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE people(name TEXT)")
        conn.commit()
        conn.close()
    before = _snapshot(work)
    for readonly in (False, True):
        with pytest.raises(CacheError) as err:
            Store(path, readonly=readonly)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg
        assert _snapshot(work) == before  # same bytes, no -wal or -shm left behind


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "c.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(CacheError, match="schema 99"):
        Store(path)


def test_export_import_json(tmp_path):
    with Store(tmp_path / "a.db") as s:
        s.put_record(make_graph(4), "bs=8", make_record(2))
        s.put_label(make_graph(5), "", "acc", 0.5, task="cifar10")
        s.put_device("cpu", {"cores": 2})
        s.export_json(tmp_path / "a.json")
    with Store(tmp_path / "b.db") as t:
        assert t.import_json(tmp_path / "a.json") == {"graphs": 2, "labels": 5}
        assert t.devices()["cpu"] == {"cores": 2}
    assert _rows(tmp_path / "a.db") == _rows(tmp_path / "b.db")


# -- crash safety and concurrency ------------------------------------------------
def test_killed_writer_loses_nothing_committed_and_resumes(tmp_path):
    n = 160
    db = _new_store(tmp_path / "crash.db")
    proc = _writer(tmp_path, db, n, pause=0.003, resume=False)
    seen = 0
    for _ in proc.stdout:
        seen += 1
        if seen == 25:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        recs = list(s.records())
        assert seen <= len(recs) < n  # everything printed was committed; it was cut short
        for rec in recs:
            check_record(rec)
    resumed = _writer(tmp_path, db, n, pause=0, resume=True)
    out, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0
    assert len(out.split()) == n - len(recs)  # only the missing records were measured
    clean = _new_store(tmp_path / "clean.db")
    full = _writer(tmp_path, clean, n, pause=0, resume=False)
    full.communicate(timeout=60)
    assert full.returncode == 0
    assert _rows(db) == _rows(clean)
    assert len(_rows(db)) == 4 * n


def test_readers_never_see_half_a_record(tmp_path):
    """Reader threads here, writer process there: whole records or nothing, never fewer later.

    Two readers in one process also guard against a torn-read bug this store once had:
    plain I/O on the open file dropped SQLite's POSIX locks (see ``store._OPEN``).
    """
    n = 150
    db = _new_store(tmp_path / "live.db")
    proc = _writer(tmp_path, db, n, pause=0.001, resume=False)
    counts: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def reader(seen: list[int]) -> None:
        try:
            while proc.poll() is None:
                with Store(db, readonly=True) as r:
                    recs = list(r.records())
                    for rec in recs:
                        check_record(rec)
                        assert r.has_graph(rec.graph)
                    seen.append(len(recs))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(c,)) for c in counts]
    for t in threads:
        t.start()
    proc.communicate(timeout=60)
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[0]
    assert proc.returncode == 0
    for seen in counts:
        assert seen == sorted(seen)  # a committed record never disappears
    assert any(0 < c < n for seen in counts for c in seen), counts  # reads overlapped writes
    with Store(db, readonly=True) as r:
        assert len(list(r.records())) == n


def test_two_writer_processes(tmp_path):
    """Writers wait for each other's transactions (busy timeout) instead of failing."""
    db = _new_store(tmp_path / "two.db")
    procs = [_writer(tmp_path, db, 60, pause=0, resume=False) for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    with Store(db, readonly=True) as r:
        assert r.integrity_check() == "ok"
        recs = list(r.records())
        assert len(recs) == 60
        for rec in recs:
            check_record(rec)


# -- AIO-P pickles ---------------------------------------------------------------
def _fake_aiop_module() -> types.ModuleType:
    """Classes laid out as AIO-P's model_src.comp_graph.tf_comp_graph, to pickle test caches."""
    mod = types.ModuleType("model_src.comp_graph.tf_comp_graph")

    class Node:
        def __init__(self, str_id, label, type_idx):
            self.str_id, self.label, self.type_idx = str_id, label, type_idx
            self.resolution = self.strides = self.metadata = None

    class RegularNode(Node):
        def __init__(self, str_id, label, op_type_idx):
            super().__init__(str_id, label, 0)
            self.op_type_idx = op_type_idx

    class WeightedNode(Node):
        def __init__(self, str_id, label, op_type_idx, shape):
            super().__init__(str_id, label, 1)
            self.op_type_idx, self.shape = op_type_idx, shape

    class ComputeGraph:
        def __init__(self, name=""):
            self.name, self.input_shape = name, (1, 32, 32, 3)
            self.edge_pairs, self.regular_nodes, self.weighted_nodes = [], [], []

    for cls in (Node, RegularNode, WeightedNode, ComputeGraph):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


def _aiop_graph(mod, name: str, width: int):
    """input -> conv(3x3, bias) -> batchnorm -> relu6 -> mean -> matmul, AIO-P style."""
    cg = mod.ComputeGraph(name)
    conv = mod.WeightedNode("1|conv2d", "conv2d", 3, [3, width, 3, 3])
    conv.resolution, conv.metadata = [32, 16, 32, 16, 3, width], {"use_bias": True}
    conv.strides = (1, 2, 2, 1)
    fc = mod.WeightedNode("5|matmul", "matmul", 8, [width, 10, 0, 0])
    fc.resolution = [1, 1, 1, 1, width, 10]
    inp = mod.RegularNode("0|input", "input", 1)
    inp.resolution = [32, 32, 32, 32, 3, 3]
    bn = mod.RegularNode("2|fusedbatchnormv3", "fusedbatchnormv3", 5)
    bn.resolution = [16, 16, 16, 16, width, width]
    act = mod.RegularNode("3|relu6", "relu6", 7)
    act.resolution = [16, 16, 16, 16, width, width]
    pool = mod.RegularNode("4|mean", "mean", 19)
    pool.resolution = [16, 1, 16, 1, width, width]
    cg.weighted_nodes = [conv, fc]  # indices 0, 1
    cg.regular_nodes = [inp, bn, act, pool]  # indices 2..5
    cg.edge_pairs = [(0, 3), (2, 0), (3, 4), (4, 5), (5, 1)]
    return cg


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _write_aiop_pkl(path: Path, with_bad: bool = True) -> None:
    mod = _fake_aiop_module()
    names = ["model_src", "model_src.comp_graph", mod.__name__]
    for name in names:
        sys.modules[name] = mod
    try:
        entries = [
            {
                "compute graph": _aiop_graph(mod, f"net{w}", w),
                "acc": 0.7 + w / 1000,
                "flops": 0.05 * w,
                "n_params": 0.001 * w,
                "original config": {"ks": (3, 5), "w": w},
                "val_PCK": 80.0 + w,
                "flops_hpe": 0.1 * w,
            }
            for w in (8, 16)
        ]
        if with_bad:
            broken = _aiop_graph(mod, "broken", 4)
            broken.edge_pairs = [(0, 3), (3, 0)]  # a cycle: skipped, not imported
            entries.append({"compute graph": broken, "acc": 0.1, "flops": 1.0, "n_params": 1.0})
            entries.append({"compute graph": _Boom(), "acc": 0.2})
        path.write_bytes(pickle.dumps(entries, protocol=4))
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_pickle_is_refused_without_trust(tmp_path):
    pkl = tmp_path / "ofa_cache.pkl"
    _write_aiop_pkl(pkl)
    db = tmp_path / "c.db"
    with Store(db) as s:
        with pytest.raises(CacheError, match=r"refusing to unpickle .*--trust-pickle") as err:
            s.import_aiop_pkl(pkl)
        assert "\n" not in str(err.value)
        assert s.count()["graphs"] == 0
    with pytest.raises(CacheError, match="refusing"):
        merge_stores([pkl], tmp_path / "out.db")
    assert not (tmp_path / "out.db").exists()


def test_import_aiop_pkl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkl = tmp_path / "ofa_cache.pkl"
    _write_aiop_pkl(pkl)
    with Store(tmp_path / "c.db") as s:
        report = s.import_aiop_pkl(pkl, trust_pickle=True)
        assert (report.entries, report.graphs_added, report.skipped) == (4, 2, 2)
        assert not (tmp_path / "PWNED").exists()  # the payload was never called
        infos = {i.name: i for i in s.graphs()}
        assert set(infos) == {"net8", "net16"}
        g = s.get_graph(infos["net8"].fingerprint)
        ops = ["Input", "Conv", "BatchNormalization", "Clip", "ReduceMean", "Gemm"]
        assert [n.op for n in g.nodes] == ops
        conv = g.nodes[1]
        assert conv.params == 3 * 8 * 9 + 8 and conv.flops == 2 * 9 * 3 * 8 * 16 * 16
        assert conv.output_shapes == [(1, 8, 16, 16)] and conv.attrs["strides"] == [2, 2]
        assert g.nodes[5].params == 8 * 10
        assert infos["net8"].meta["original_config"] == {"ks": [3, 5], "w": 8}
        fp = infos["net8"].fingerprint
        labels = {(r.task, r.kind): r.value for r in s.labels(graph=fp)}
        assert labels[("classification", "acc")] == pytest.approx(0.708)
        assert labels[("classification", "flops")] == pytest.approx(0.4e9)
        assert labels[("classification", "params")] == pytest.approx(8000)
        assert labels[("pose", "val_PCK")] == 88.0
        assert labels[("pose", "flops")] == pytest.approx(0.8e9)
        # importing again adds nothing
        again = s.import_aiop_pkl(pkl, trust_pickle=True)
        assert (again.graphs_added, again.labels_added) == (0, 0)


def test_export_aiop_pkl_round_trip(tmp_path):
    pkl = tmp_path / "ofa_cache.pkl"
    _write_aiop_pkl(pkl, with_bad=False)
    out = tmp_path / "export.pkl"
    with Store(tmp_path / "c.db") as s:
        s.import_aiop_pkl(pkl, trust_pickle=True)
        assert s.export_aiop_pkl(out) == 2
        assert s.export_aiop_pkl(tmp_path / "pose.pkl", metric="val_PCK", task="pose") == 2
    entries = load_aiop_pkl(out, trust_pickle=True)
    by_name = {e["compute graph"]["name"]: e for e in entries}
    e = by_name["net16"]
    assert e["acc"] == pytest.approx(0.716)
    assert e["flops"] == pytest.approx(0.8) and e["n_params"] == pytest.approx(0.016)
    assert e["original config"] == {"ks": [3, 5], "w": 16}
    assert aiop_graph_to_cg(e["compute graph"]).fingerprint == e["fingerprint"]
    pose = {
        x["compute graph"]["name"]: x
        for x in load_aiop_pkl(tmp_path / "pose.pkl", trust_pickle=True)
    }
    assert pose["net16"]["acc"] == 96.0 and pose["net16"]["metric_map"] == "val_PCK->acc"
    assert pose["net16"]["flops"] == pytest.approx(1.6)  # the pose task's FLOPs
    # our own exports import back; a "val_PCK->acc" file's labels land on the pose task
    with Store(tmp_path / "d.db") as t:
        rep = t.import_aiop_pkl(out, trust_pickle=True)
        assert rep.graphs_added == 2 and rep.skipped == 0
        t.import_aiop_pkl(tmp_path / "pose.pkl", trust_pickle=True)
        pose_acc = sorted(r.value for r in t.labels(kind="acc", task="pose"))
        assert pose_acc == [88.0, 96.0]


def test_damaged_pickle(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04garbage" + os.urandom(64))
    with pytest.raises(CacheError, match="not a readable pickle"):
        load_aiop_pkl(bad, trust_pickle=True)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CacheError, match="list of dicts"):
        load_aiop_pkl(other, trust_pickle=True)


# -- merging and the script ------------------------------------------------------
def _two_stores(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with Store(a) as s:
        s.put_record(make_graph(4), "bs=8", make_record(1))
        s.put_label(make_graph(4), "", "acc", 0.5)
    with Store(b) as s:
        s.put_record(make_graph(4), "bs=8", {**make_record(1), "latency_s": 9.0})  # a conflict
        s.put_record(make_graph(5), "bs=16", make_record(2))
        s.put_label(make_graph(5), "", "acc", 0.6)
    return a, b


def test_merge_stores(tmp_path):
    a, b = _two_stores(tmp_path)
    pkl = tmp_path / "ofa_cache.pkl"
    _write_aiop_pkl(pkl, with_bad=False)
    out = tmp_path / "all.db"
    report = merge_stores([a, b, pkl], out, trust_pickle=True, progress=False)
    assert [r["graphs_added"] for r in report.inputs] == [1, 1, 2]
    with Store(out, readonly=True) as s:
        assert s.count()["graphs"] == 4 and s.integrity_check() == "ok"
        lat = next(s.labels(kind="latency_s", config="bs=8"))
        assert lat.value != 9.0  # the first input wins, as in AIO-P
    again = merge_stores([a, b], out, progress=False)  # resumable: nothing new
    assert all(r["labels_added"] == 0 for r in again.inputs)
    merge_stores([b], out, replace=True, progress=False)
    with Store(out, readonly=True) as s:
        assert next(s.labels(kind="latency_s", config="bs=8")).value == 9.0
    # to an AIO-P pickle and to JSON
    rep = merge_stores([a, b], tmp_path / "gpi.pkl", progress=False)
    assert rep.totals["entries"] == 2
    assert len(load_aiop_pkl(tmp_path / "gpi.pkl", trust_pickle=True)) == 2
    merge_stores([a, b], tmp_path / "all.json", progress=False)
    with Store(tmp_path / "from_json.db") as s:
        s.import_json(tmp_path / "all.json")
        assert s.count()["labels"] == 10  # b's conflicting labels are the same keys


def test_merge_bad_input_writes_nothing(tmp_path):
    a, _ = _two_stores(tmp_path)
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    out = tmp_path / "out.db"
    with pytest.raises(CacheError, match=r"junk\.db"):
        merge_stores([a, junk], out, progress=False)
    assert not out.exists()
    foreign = tmp_path / "foreign.db"
    foreign.write_bytes(os.urandom(4096))
    before = foreign.read_bytes()
    with pytest.raises(CacheError, match="not an SQLite file"):
        merge_stores([a], foreign, progress=False)
    assert foreign.read_bytes() == before
    with pytest.raises(CacheError, match="also an input"):
        merge_stores([a], a, progress=False)


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=cwd,
        timeout=60,
    )  # fmt: skip


def test_script(tmp_path):
    a, b = _two_stores(tmp_path)
    pkl = tmp_path / "ofa_cache.pkl"
    _write_aiop_pkl(pkl, with_bad=False)
    ok = _script("-inputs", str(a), str(b), "-output", str(tmp_path / "m.db"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "graphs 2" in ok.stdout
    refused = _script("-inputs", str(a), str(pkl), "-output", str(tmp_path / "n.db"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "n.db").exists()
    # AIO-P's own flags: every ofa*.pkl / .db in the directory into gpi_..._comp_graph_cache.pkl
    aiop_style = _script(
        "-cache_dir", str(tmp_path), "-family", "ofa", "-suffix", "t", "-test_metric", "val_PCK",
        "--trust-pickle", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert aiop_style.returncode == 0, aiop_style.stderr
    out = tmp_path / "gpi_ofa_val_PCK_t_comp_graph_cache.pkl"
    entries = load_aiop_pkl(out, trust_pickle=True)
    assert sorted(e["acc"] for e in entries) == [88.0, 96.0]
    usage = _script("-output", "x.db", cwd=tmp_path)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1


def test_task_graphs_are_not_profiled_as_their_backbone():
    from aiop.cache.errors import CacheError
    from aiop.cache.runner import _factory

    assert _factory({"model": "family:ofa_mbv3:0"}) == "family:ofa_mbv3:0"
    with pytest.raises(CacheError, match="pose head"):
        _factory({"model": "family:ofa_mbv3:0", "task": "pose"})
