"""Drawing computational graphs with graphviz.

:func:`to_dot` turns a :class:`~aiop.cg.graph.ComputeGraph` into DOT source
(no binary needed); :func:`draw` writes it as ``.svg``, ``.png``, ``.pdf`` (via
graphviz's ``dot`` program) or ``.dot``; :func:`draw_many` draws every graph of
files, folders or an aiop cache store, as ``scripts/visualize_cgs.py`` does.

Nodes are filled with one colour per op kind (:data:`KIND_COLORS`) and labelled
with op, first output shape, FLOPs and parameters. With an m-configuration's
``node_flags`` frozen nodes are faded and dashed, recomputed (checkpointed)
nodes get a double magenta border. A legend cluster lists what the picture uses.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import graphviz

from aiop.cg.graph import CGError, ComputeGraph, Node, Shape
from aiop.cg.vocab import op_kind
from aiop.units import human_bytes, human_count, human_flops

log = logging.getLogger(__name__)

# Light fills so black text stays readable; hues far apart so kinds are told apart
# at a glance, and none grey (grey means frozen).
KIND_COLORS: dict[str, str] = {
    "input": "#ffffff",
    "conv": "#8ecae6",
    "linear": "#c3b1e1",
    "norm": "#ffd166",
    "activation": "#a5d6a7",
    "elementwise": "#ffab91",
    "pool": "#80cbc4",
    "layout": "#fff3b0",
    "dropout": "#f4a6c6",
    "other": "#d7ccc8",
}
FROZEN_FONT = "#8a8a8a"
FROZEN_BORDER = "#9e9e9e"
RECOMPUTED_BORDER = "#c2185b"
FORMATS = ("svg", "png", "pdf", "dot")
RANKDIRS = ("TB", "LR", "BT", "RL")
# Above this many nodes edge labels turn the picture into noise.
EDGE_LABEL_MAX_NODES = 150
DEFAULT_MAX_NODES = 2000
DOT_TIMEOUT_S = 600
_FONT = "DejaVu Sans,Helvetica,Arial,sans-serif"


def format_shape(shape: Shape) -> str:
    """``(1, 32, 56, 56)`` → ``'1×32×56×56'``; a scalar is ``'scalar'``."""
    return "×".join(str(d) for d in shape) if len(shape) else "scalar"


# -- DOT -------------------------------------------------------------------------
def _check_flags(
    cg: ComputeGraph, node_flags: dict[str, list[bool]] | None
) -> dict[str, list[bool]]:
    flags: dict[str, list[bool]] = {}
    for key, values in (node_flags or {}).items():
        if key not in ("trainable", "recomputed"):
            log.debug("ignoring node flag %r: only trainable and recomputed are drawn", key)
            continue
        if len(values) != cg.num_nodes:
            raise CGError(
                f"node_flags[{key!r}] has {len(values)} values for a graph of {cg.num_nodes} nodes"
            )
        flags[key] = [bool(v) for v in values]
    return flags


def _node_label(node: Node) -> str:
    """HTML-like label: op in bold, then shape, then FLOPs / params when there are any."""
    lines = [f"<B>{html.escape(node.op)}</B>"]
    if node.output_shapes:
        shape = format_shape(node.output_shapes[0])
        extra = len(node.output_shapes) - 1
        lines.append(html.escape(shape + (f" (+{extra} out)" if extra else "")))
    stats = []
    if node.flops > 0:
        stats.append(human_flops(node.flops))
    if node.params > 0:
        stats.append(f"{human_count(node.params)} params")
    if stats:
        lines.append(html.escape(" · ".join(stats)))
    body = "<BR/>".join(f'<FONT POINT-SIZE="9">{line}</FONT>' for line in lines[1:])
    return f"<{lines[0]}<BR/>{body}>" if body else f"<{lines[0]}>"


def _node_style(kind: str, frozen: bool, recomputed: bool) -> dict[str, str]:
    fill = KIND_COLORS.get(kind, KIND_COLORS["other"])
    attrs = {"fillcolor": fill, "style": "filled,rounded"}
    if frozen:
        # Keep the kind's hue but fade it (alpha 40%), so frozen layers still read as conv/norm.
        attrs.update(
            fillcolor=fill + "66",
            style="filled,rounded,dashed",
            color=FROZEN_BORDER,
            fontcolor=FROZEN_FONT,
        )
    if recomputed:
        attrs.update(peripheries="2", color=RECOMPUTED_BORDER, penwidth="1.6")
    return attrs


def to_dot(
    cg: ComputeGraph,
    node_flags: dict[str, list[bool]] | None = None,
    *,
    rankdir: str = "TB",
    max_nodes: int = DEFAULT_MAX_NODES,
) -> str:
    """DOT source of ``cg``; ``node_flags`` as from ``MConfig.node_flags(cg)``.

    Raises :class:`CGError` for graphs above ``max_nodes``, flags of the wrong
    length or an unknown ``rankdir``.
    """
    if rankdir not in RANKDIRS:
        raise CGError(f"rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")
    if cg.num_nodes > max_nodes:
        raise CGError(
            f"graph {cg.name or cg.fingerprint} has {cg.num_nodes} nodes, more than "
            f"max_nodes={max_nodes}; raise the limit (max_nodes={cg.num_nodes}) to draw it anyway"
        )
    flags = _check_flags(cg, node_flags)
    trainable = flags.get("trainable")
    recomputed = flags.get("recomputed")

    title = cg.name or "graph"
    summary = (
        f"{title}  ·  {cg.num_nodes} nodes  ·  {human_flops(cg.total_flops)}  ·  "
        f"{human_count(cg.total_params)} params"
    )
    dot = graphviz.Digraph(name=_safe_name(title) or "cg")
    dot.attr(
        rankdir=rankdir,
        label=summary,
        labelloc="t",
        fontname=_FONT,
        fontsize="14",
        nodesep="0.25",
        ranksep="0.3",
    )
    dot.attr("node", shape="box", fontname=_FONT, fontsize="10", margin="0.08,0.04", height="0.3")
    dot.attr("edge", fontname=_FONT, fontsize="8", arrowsize="0.6", color="#555555")

    kinds_present: list[str] = []
    for i, node in enumerate(cg.nodes):
        kind = op_kind(node.op)
        if kind not in kinds_present:
            kinds_present.append(kind)
        frozen = trainable is not None and not trainable[i]
        recomp = recomputed is not None and recomputed[i]
        tooltip = node.name + (f" ({node.scope})" if node.scope else "")
        dot.node(
            f"n{i}",
            label=_node_label(node),
            tooltip=tooltip,
            **_node_style(kind, frozen, recomp),
        )

    label_edges = cg.num_nodes < EDGE_LABEL_MAX_NODES
    for e in cg.edges:
        size = human_bytes(e.bytes)
        attrs = {"tooltip": f"{format_shape(e.shape)} {e.dtype}, {size}"}
        if label_edges:
            attrs["label"] = size
        dot.edge(f"n{e.src}", f"n{e.dst}", **attrs)

    _add_legend(dot, kinds_present, trainable, recomputed)
    return dot.source


def _add_legend(
    dot: graphviz.Digraph,
    kinds: list[str],
    trainable: list[bool] | None,
    recomputed: list[bool] | None,
) -> None:
    """A cluster of sample nodes, one per kind present plus frozen / recomputed when given."""
    order = [k for k in KIND_COLORS if k in kinds]
    entries: list[tuple[str, str, dict[str, str]]] = [
        (f"legend_{k}", k, _node_style(k, False, False)) for k in order
    ]
    if trainable is not None:
        n = sum(not t for t in trainable)
        entries.append(("legend_frozen", f"frozen ({n})", _node_style("other", True, False)))
    if recomputed is not None:
        n = sum(recomputed)
        entries.append(
            ("legend_recomputed", f"recomputed ({n})", _node_style("other", False, True))
        )
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", style="rounded", color="#bbbbbb", fontsize="10")
        for name, label, style in entries:
            legend.node(name, label=label, fontsize="9", **style)
        # Invisible edges stack the samples in one column instead of one wide rank.
        for (a, _, _), (b, _, _) in itertools.pairwise(entries):
            legend.edge(a, b, style="invis")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:100]


# -- rendering ---------------------------------------------------------------------
def _format_of(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = "dot" if suffix == "gv" else suffix
    if fmt not in FORMATS:
        raise CGError(
            f"unknown drawing format {path.suffix or '(none)'!r} for {path.name}: "
            f"use .svg, .png, .pdf or .dot"
        )
    return fmt


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file so an interrupted run leaves no half picture."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def render(source: str, fmt: str) -> bytes:
    """Run ``dot`` on DOT ``source``; :class:`CGError` (one line) when it is missing or fails."""
    if fmt == "dot":
        return source.encode()
    dot = shutil.which("dot")
    if dot is None:
        raise CGError(
            f"drawing .{fmt} needs graphviz's 'dot' program: install graphviz "
            f"(apt-get install graphviz), or draw to .dot"
        )
    # subprocess rather than graphviz.pipe: it takes a timeout, and dot can crawl on huge graphs.
    try:
        proc = subprocess.run(
            [dot, f"-T{fmt}"], input=source.encode(), capture_output=True, timeout=DOT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise CGError(
            f"graphviz dot took more than {DOT_TIMEOUT_S} s; draw a smaller graph or use .dot"
        ) from None
    except OSError as exc:
        raise CGError(f"cannot run graphviz dot: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise CGError(f"graphviz dot failed: {err[0] if err else f'exit {proc.returncode}'}")
    return proc.stdout


def draw(
    cg: ComputeGraph,
    path: str | os.PathLike[str],
    node_flags: dict[str, list[bool]] | None = None,
    rankdir: str = "TB",
    max_nodes: int = DEFAULT_MAX_NODES,
) -> Path:
    """Draw ``cg`` to ``path``; the format comes from its suffix (.svg, .png, .pdf, .dot)."""
    path = Path(path)
    fmt = _format_of(path)
    source = to_dot(cg, node_flags, rankdir=rankdir, max_nodes=max_nodes)
    data = render(source, fmt)
    if not path.parent.is_dir():
        raise CGError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        _write_atomic(path, data)
    except OSError as exc:
        raise CGError(f"cannot write {path}: {exc.strerror or exc}") from None
    log.debug("drew %s (%d nodes) to %s", cg.name, cg.num_nodes, path)
    return path


# -- many graphs ---------------------------------------------------------------------
GRAPH_SUFFIXES = (".json", ".json.gz")
STORE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class _Item:
    """One graph to draw: a name for messages and output files, and how to load it."""

    label: str
    stem: str
    load: Callable[[], ComputeGraph]


class DrawnPaths(list[Path]):
    """The pictures :func:`draw_many` wrote, with ``failed``: (input, one-line reason) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[tuple[str, str]] = []


@dataclass
class _Sources:
    items: list[_Item] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _graph_stem(path: Path) -> str:
    name = path.name
    for suffix in GRAPH_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_store(path: Path) -> bool:
    if path.suffix.lower() in STORE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def _open_store(path: Path, stack: contextlib.ExitStack) -> object:
    """Open an aiop cache read-only; the import is lazy so drawing never needs the cache."""
    try:
        from aiop.cache import Store  # type: ignore[attr-defined]
    except ImportError:
        try:
            from aiop.cache.store import Store
        except ImportError as exc:
            raise CGError(f"{path}: reading a cache store needs aiop.cache ({exc})") from None
    return stack.enter_context(Store(path, readonly=True))


def _collect(
    inputs: Iterable[str | os.PathLike[str] | ComputeGraph], stack: contextlib.ExitStack
) -> _Sources:
    found = _Sources()

    def add_file(p: Path) -> None:
        found.items.append(_Item(str(p), _graph_stem(p), lambda p=p: ComputeGraph.load(p)))

    for entry in inputs:
        if isinstance(entry, ComputeGraph):
            found.items.append(
                _Item(
                    entry.name or entry.fingerprint,
                    entry.name or entry.fingerprint,
                    lambda g=entry: g,
                )
            )
            continue
        p = Path(entry)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(GRAPH_SUFFIXES)
            )
            if not files:
                found.failed.append((str(p), "no .json or .json.gz graph files in this folder"))
            for f in files:
                add_file(f)
        elif p.is_file() and _is_store(p):
            try:
                store = _open_store(p, stack)
                infos = list(store.graphs())  # type: ignore[attr-defined]
            except (CGError, ValueError, OSError) as exc:
                found.failed.append((str(p), str(exc).splitlines()[0] if str(exc) else repr(exc)))
                continue
            for info in infos:
                stem = f"{info.name}_{info.fingerprint}" if info.name else info.fingerprint
                found.items.append(
                    _Item(
                        f"{p}:{info.fingerprint}",
                        stem,
                        lambda s=store, fp=info.fingerprint: s.get_graph(fp),  # type: ignore[attr-defined]
                    )
                )
        elif p.is_file():
            add_file(p)
        else:
            found.failed.append((str(p), "no such file or folder"))
    return found


def _progress(items: list[_Item], progress: bool) -> Iterator[_Item]:
    if not progress:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="drawing", unit="graph")


def draw_many(
    paths_or_graphs: Iterable[str | os.PathLike[str] | ComputeGraph],
    out_dir: str | os.PathLike[str],
    fmt: str = "svg",
    *,
    limit: int | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    rankdir: str = "TB",
    progress: bool = True,
) -> DrawnPaths:
    """Draw graphs from files, folders of .json/.json.gz, aiop cache stores, or ComputeGraphs.

    Writes ``out_dir/<name>.<fmt>`` for each (at most ``limit``) with a tqdm bar.
    A graph that fails is logged and listed in the result's ``failed``; the
    others are still drawn. Raises :class:`CGError` only for a bad ``fmt`` or ``out_dir``.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise CGError(f"unknown drawing format {fmt!r}: use svg, png, pdf or dot")
    if limit is not None and limit < 1:
        raise CGError(f"limit must be at least 1, got {limit}")
    if fmt != "dot" and shutil.which("dot") is None:
        # Say it once up front rather than failing every graph with the same message.
        raise CGError(
            f"drawing .{fmt} needs graphviz's 'dot' program: install graphviz "
            f"(apt-get install graphviz), or use format dot"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CGError(f"cannot create output folder {out}: {exc.strerror or exc}") from None

    result = DrawnPaths()
    with contextlib.ExitStack() as stack:
        sources = _collect(paths_or_graphs, stack)
        for label, reason in sources.failed:
            log.warning("skipping %s: %s", label, reason)
        result.failed.extend(sources.failed)
        items = sources.items[:limit] if limit is not None else sources.items
        used: set[str] = set()
        for item in _progress(items, progress):
            stem = _safe_name(item.stem) or "graph"
            unique, k = stem, 2
            while unique in used:  # two inputs with the same name must not overwrite each other
                unique, k = f"{stem}_{k}", k + 1
            used.add(unique)
            try:
                cg = item.load()
                result.append(
                    draw(cg, out / f"{unique}.{fmt}", rankdir=rankdir, max_nodes=max_nodes)
                )
            except (CGError, ValueError, OSError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
                log.warning("skipping %s: %s", item.label, reason)
                result.failed.append((item.label, reason))
    return result
