"""Drawing computational graphs: DOT text, rendered pictures, errors and the script."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from script_helpers import load_script
from torch import nn

from aiop.cg.draw import (
    KIND_COLORS,
    RECOMPUTED_BORDER,
    draw,
    draw_many,
    human_bytes,
    human_count,
    human_flops,
    to_dot,
)
from aiop.cg.graph import CGError, ComputeGraph, Edge, Node, TensorSpec
from aiop.cg.torch_import import from_torch
from aiop.cg.vocab import op_kind

REPO = Path(__file__).resolve().parents[1]
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz 'dot' binary not installed")
SVG_NS = "{http://www.w3.org/2000/svg}"
# The module object (``aiop.cg.draw`` is also a function name in ``aiop.cg``).
draw_mod = importlib.import_module("aiop.cg.draw")


@pytest.fixture(scope="module")
def cnn() -> ComputeGraph:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return from_torch(model, (1, 3, 16, 16), name="tiny_cnn")


def chain(n: int) -> ComputeGraph:
    """A synthetic chain of ``n`` nodes (Input, then Relus), fast to build at any size."""
    shape = (1, 8, 4, 4)
    nodes = [Node("x", "Input", "Input", [], [shape], ["float32"])]
    nodes += [Node(f"r{i}", "Relu", "Relu", [shape], [shape], ["float32"]) for i in range(1, n)]
    edges = [Edge(i, i + 1, shape) for i in range(n - 1)]
    return ComputeGraph(
        nodes, edges, [TensorSpec("x", shape)], [TensorSpec("y", shape)], name=f"chain{n}"
    )


def node_lines(dot: str) -> dict[str, str]:
    """DOT statement of each graph node ``nK``."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^\s*(n\d+) \[.*$", dot, re.M)}


# -- formatting ------------------------------------------------------------------
def test_human_numbers() -> None:
    assert human_bytes(1 * 32 * 56 * 56 * 4) == "392 KiB"
    assert human_bytes(100) == "100 B"
    assert human_bytes(3 * 1024**3) == "3 GiB"
    assert human_flops(1_234_567) == "1.23 MFLOPs"
    assert human_flops(640) == "640 FLOPs"
    assert human_count(4640) == "4.64k"


# -- DOT ----------------------------------------------------------------------------
def test_dot_has_every_node_with_colour_and_label(cnn: ComputeGraph) -> None:
    dot = to_dot(cnn)
    lines = node_lines(dot)
    assert set(lines) == {f"n{i}" for i in range(cnn.num_nodes)}
    for i, node in enumerate(cnn.nodes):
        line = lines[f"n{i}"]
        assert f"<B>{node.op}</B>" in line
        assert KIND_COLORS[op_kind(node.op)] in line
        assert "×".join(map(str, node.output_shapes[0])) in line
        assert ("params" in line) == (node.params > 0)
        assert ("FLOPs" in line) == (node.flops > 0)
    conv = next(i for i, n in enumerate(cnn.nodes) if n.op == "Conv")
    assert "1×8×16×16" in lines[f"n{conv}"]
    # Legend cluster: one sample per kind present, nothing for kinds absent.
    kinds = {op_kind(n.op) for n in cnn.nodes}
    assert "cluster_legend" in dot
    for kind in KIND_COLORS:
        assert (f"legend_{kind} " in dot) == (kind in kinds)
    assert "legend_frozen" not in dot and "legend_recomputed" not in dot
    # Small graph: every edge carries its tensor size.
    assert dot.count(" -> n") == cnn.num_edges
    first = cnn.edges[0]
    assert f'label="{human_bytes(first.bytes)}"' in dot


def test_edge_labels_only_on_small_graphs() -> None:
    small, big = to_dot(chain(20)), to_dot(chain(200))
    assert 'label="512 B"' in small
    assert "512 B" not in big.replace('tooltip="1×8×4×4 float32, 512 B"', "")
    assert len(node_lines(big)) == 200


def test_flags_change_style(cnn: ComputeGraph) -> None:
    n = cnn.num_nodes
    frozen_upto = n // 2
    flags = {
        "trainable": [i >= frozen_upto for i in range(n)],
        "recomputed": [i == n - 1 for i in range(n)],
    }
    plain = node_lines(to_dot(cnn))
    dot = to_dot(cnn, flags)
    styled = node_lines(dot)
    for i in range(n):
        name = f"n{i}"
        assert ("dashed" in styled[name]) == (i < frozen_upto)
        assert ("peripheries=2" in styled[name]) == (i == n - 1)
        assert "dashed" not in plain[name] and "peripheries" not in plain[name]
    assert RECOMPUTED_BORDER in styled[f"n{n - 1}"]
    assert f"frozen ({frozen_upto})" in dot and "recomputed (1)" in dot


def test_bad_flags_and_rankdir(cnn: ComputeGraph) -> None:
    with pytest.raises(CGError, match="3 values"):
        to_dot(cnn, {"trainable": [True] * 3})
    with pytest.raises(CGError, match="rankdir"):
        to_dot(cnn, rankdir="XY")
    assert "rankdir=LR" in to_dot(cnn, rankdir="LR")


def test_too_large_graph_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CGError) as exc:
        draw(chain(50), tmp_path / "g.dot", max_nodes=40)
    message = str(exc.value)
    assert "50 nodes" in message and "max_nodes=50" in message and "\n" not in message
    assert not (tmp_path / "g.dot").exists()


def test_unknown_suffix(cnn: ComputeGraph, tmp_path: Path) -> None:
    for name in ("g.jpg", "g"):
        with pytest.raises(CGError, match=r"\.svg, \.png, \.pdf or \.dot"):
            draw(cnn, tmp_path / name)


def test_dot_file_needs_no_binary(
    cnn: ComputeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(draw_mod.shutil, "which", lambda _name: None)
    out = draw(cnn, tmp_path / "g.dot")
    assert out.read_text(encoding="utf-8") == to_dot(cnn)
    with pytest.raises(CGError, match=r"apt-get install graphviz") as exc:
        draw(cnn, tmp_path / "g.svg")
    assert "\n" not in str(exc.value)
    with pytest.raises(CGError, match=r"apt-get install graphviz"):
        draw_many([cnn], tmp_path / "out", "png")


# -- rendering ------------------------------------------------------------------------
@needs_dot
def test_svg_for_small_cnn(cnn: ComputeGraph, tmp_path: Path) -> None:
    flags = {"trainable": [i > 2 for i in range(cnn.num_nodes)]}
    out = draw(cnn, tmp_path / "cnn.svg", node_flags=flags)
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG_NS}svg"
    groups = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "node"]
    titles = [g.find(f"{SVG_NS}title").text for g in groups]
    graph_nodes = [t for t in titles if re.fullmatch(r"n\d+", t)]
    legend = [t for t in titles if t.startswith("legend_")]
    assert len(graph_nodes) == cnn.num_nodes
    assert len(legend) == len({op_kind(n.op) for n in cnn.nodes}) + 1  # + frozen
    edges = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "edge"]
    assert len(edges) == cnn.num_edges  # the legend's invisible edges are not drawn
    assert "Conv" in out.read_text(encoding="utf-8")


@needs_dot
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_raster_and_pdf(cnn: ComputeGraph, tmp_path: Path, suffix: str, magic: bytes) -> None:
    out = draw(cnn, tmp_path / f"cnn{suffix}", rankdir="LR")
    assert out.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"cnn{suffix}"]  # no temp files left


# -- many graphs and the script -------------------------------------------------------------
def test_draw_many_limit_and_names(cnn: ComputeGraph, tmp_path: Path) -> None:
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    cnn.save(graphs / "a.json")
    chain(5).save(graphs / "b.json.gz")
    (graphs / "notes.txt").write_text("not a graph")
    drawn = draw_many([graphs, cnn, cnn], tmp_path / "out", "dot", progress=False)
    assert [p.name for p in drawn] == ["a.dot", "b.dot", "tiny_cnn.dot", "tiny_cnn_2.dot"]
    assert drawn.failed == []
    limited = draw_many([graphs], tmp_path / "out2", "dot", limit=1, progress=False)
    assert [p.name for p in limited] == ["a.dot"]
    missing = draw_many([tmp_path / "nope.json"], tmp_path / "out3", "dot", progress=False)
    assert list(missing) == [] and "no such file" in missing.failed[0][1]
    with pytest.raises(CGError, match="unknown drawing format"):
        draw_many([cnn], tmp_path / "out4", "gif")


def test_draw_many_from_cache_store(cnn: ComputeGraph, tmp_path: Path) -> None:
    store_mod = pytest.importorskip("aiop.cache.store", reason="aiop.cache.Store not available")
    db = tmp_path / "cache.db"
    with store_mod.Store(db) as store:
        store.put_graph(cnn)
        store.put_graph(chain(4))
    drawn = draw_many([db], tmp_path / "out", "dot", progress=False)
    assert drawn.failed == []
    assert sorted(p.name for p in drawn) == sorted(
        [f"tiny_cnn_{cnn.fingerprint}.dot", f"chain4_{chain(4).fingerprint}.dot"]
    )


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/visualize_cgs.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_dot
def test_script_skips_corrupt_file(cnn: ComputeGraph, tmp_path: Path) -> None:
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    cnn.save(graphs / "good.json")
    (graphs / "corrupt.json").write_text('{"nodes": [1, 2')
    out = tmp_path / "figs"
    proc = run_script("-input", str(graphs), "-output_dir", str(out), "-format", "svg")
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.svg"]
    ET.parse(out / "good.svg")
    assert "corrupt.json" in proc.stderr and "Traceback" not in proc.stderr
    assert "drew 1 graph(s)" in proc.stdout


def load_visualize_cgs():
    return load_script("scripts/visualize_cgs.py", "visualize_cgs")


def test_script_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_visualize_cgs()  # in-process: a subprocess per case would cost seconds of imports
    good = tmp_path / "g.json"
    chain(3).save(good)
    for args in (
        ["-input", str(tmp_path / "missing"), "-output_dir", str(tmp_path)],
        ["-input", str(good), "-output_dir", str(tmp_path), "-format", "gif"],
        ["-input", str(good), "-output_dir", str(tmp_path), "-limit", "0"],
        ["-output_dir", str(tmp_path)],
        ["-input", str(good), "-output_dir", str(good)],  # a file, not a folder
    ):
        try:
            code = script.main(args)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, args
        assert len(err.strip().splitlines()) == 1, err


def test_script_in_process_dot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "g.json"
    chain(3).save(good)
    args = ["-input", str(good), "-output_dir", str(tmp_path / "o"), "-q", "-format", "dot"]
    code = load_visualize_cgs().main(args)
    assert code == 0
    assert (tmp_path / "o" / "g.dot").is_file()
    assert "drew 1 graph(s)" in capsys.readouterr().out


def test_package_draw_stays_callable(tmp_path: Path) -> None:
    from aiop.cg import draw as pkg_draw  # after aiop.cg.draw was imported as a module

    assert pkg_draw(chain(3), tmp_path / "c.dot").is_file()


@needs_dot
def test_dot_failure_is_one_line() -> None:
    with pytest.raises(CGError, match="graphviz dot failed") as exc:
        draw_mod.render("digraph { a -> ", "svg")
    assert "\n" not in str(exc.value)
