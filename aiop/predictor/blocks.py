"""A fixed-length readout of a CG's block structure, derived from the graph alone.

Under weight sharing (OFA's supernets, which every family label in this project
inherits from) an architecture's accuracy depends on *which slot* each block
occupies: the 2nd block of stage 3 inherits other weights than the 4th. Sum and
mean pooling of node embeddings hide the slot, and a message-passing network over
a few hops cannot tell it (measured: ``benchmarks/results/acc_predictor_v4_joint``).
This readout lays the blocks out by (stage, place in stage) instead:

* a **block** is anchored on each spatial convolution (kernel > 1) of the main path:
  the depthwise convolution of an inverted residual, the 3 × 3 convolution of a
  bottleneck, a stem or head convolution. Convolutions downstream of a global pooling
  up to the ``Mul`` that rescales the main path (squeeze-excite) or to the end (the
  classifier) are off the main path, whatever their map size: at 32 px the last stage
  of a MobileNetV3 runs on 1 × 1 maps too. A block's features are the kernel, the
  anchor's channels (the block's expanded width), the *width* (the output channels of
  the next main-path convolution when it is 1 × 1, the block's projection; the anchor's
  own channels otherwise) and their ratio (the expand ratio);
* a **stage** is a maximal run of consecutive blocks with one output resolution and
  one width; its features are its number of blocks, its width and its resolution.

The vector holds :data:`MAX_STAGES` stages of :data:`MAX_BLOCKS` blocks (blocks past
those bounds are dropped, empty slots are zeros), then the graph's input resolution,
log FLOPs, log parameters and its number of stages, then ``log(1 + count)`` of every op
of the vocabulary (the graph's signature: squeeze-excite, hard-swish … tell families
apart; measured, a forest over three families ranked held-out ofa_mbv3 / ofa_pn
classification labels about 0.01 SRCC better with them, the blocks already telling the
families apart). Nothing in it reads an architecture
encoding, a module name or a family: an ONNX import of the same network gives the same
vector. :data:`READOUT_VERSION` changes whenever the layout does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from aiop.cg.graph import ComputeGraph, Node
from aiop.cg.vocab import OP_VOCAB

READOUT_VERSION = 1
MAX_STAGES = 8
MAX_BLOCKS = 6
BLOCK_FIELDS = ("present", "kernel", "log2_mid", "expand")
STAGE_FIELDS = ("blocks", "log2_width", "log2_resolution")
GRAPH_FIELDS = ("input_resolution", "log_flops", "log_params", "stages")


def _names() -> tuple[str, ...]:
    names = [
        f"s{s}.b{b}.{f}" for s in range(MAX_STAGES) for b in range(MAX_BLOCKS) for f in BLOCK_FIELDS
    ]
    names += [f"s{s}.{f}" for s in range(MAX_STAGES) for f in STAGE_FIELDS]
    return (*names, *GRAPH_FIELDS, *(f"ops.{op}" for op in OP_VOCAB))


READOUT_NAMES: tuple[str, ...] = _names()


@dataclass(frozen=True)
class Block:
    """One block of a CG: its anchor convolution and its projection's width."""

    node: int  # index of the anchor node in ``cg.nodes``
    kernel: int
    mid: int  # channels of the anchor convolution
    width: int  # channels after the block's projection
    stride: int
    resolution: int  # output height of the anchor


GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"})


def _kernel(node: Node) -> int | None:
    """The kernel of a convolution on an N, C, H, W map; None for any other node."""
    if node.op != "Conv" or not node.output_shapes or len(node.output_shapes[0]) != 4:
        return None
    return int(max(node.attrs.get("kernel_shape") or [1]))


def _off_main_path(cg: ComputeGraph) -> set[int]:
    """Nodes downstream of a global pooling, up to (not through) a ``Mul``."""
    succ: dict[int, list[int]] = {}
    for e in cg.edges:
        succ.setdefault(e.src, []).append(e.dst)
    stack = [i for i, n in enumerate(cg.nodes) if n.op in GLOBAL_POOLS]
    seen = set(stack)
    while stack:
        for j in succ.get(stack.pop(), []):
            if j not in seen and cg.nodes[j].op != "Mul":
                seen.add(j)
                stack.append(j)
    return seen


def find_blocks(cg: ComputeGraph) -> list[Block]:
    """The blocks of ``cg`` in topological order (see the module docstring)."""
    off = _off_main_path(cg)
    convs = [
        (i, k) for i, n in enumerate(cg.nodes) if i not in off and (k := _kernel(n)) is not None
    ]
    blocks: list[Block] = []
    for pos, (i, kernel) in enumerate(convs):
        if kernel <= 1:
            continue
        node = cg.nodes[i]
        mid = int(node.output_shapes[0][1])
        width = mid
        if pos + 1 < len(convs) and convs[pos + 1][1] == 1:  # else: the next block's anchor
            width = int(cg.nodes[convs[pos + 1][0]].output_shapes[0][1])
        blocks.append(
            Block(
                node=i,
                kernel=kernel,
                mid=mid,
                width=width,
                stride=int(max(node.attrs.get("strides") or [1])),
                resolution=int(node.output_shapes[0][2]),
            )
        )
    return blocks


def find_stages(blocks: list[Block]) -> list[list[Block]]:
    """Maximal runs of consecutive blocks with one resolution and one width."""
    stages: list[list[Block]] = []
    for b in blocks:
        if stages and (stages[-1][-1].resolution, stages[-1][-1].width) == (b.resolution, b.width):
            stages[-1].append(b)
        else:
            stages.append([b])
    return stages


def block_readout(cg: ComputeGraph) -> np.ndarray:
    """The ``[len(READOUT_NAMES)]`` float64 readout of ``cg``."""
    stages = find_stages(find_blocks(cg))
    per_block = np.zeros((MAX_STAGES, MAX_BLOCKS, len(BLOCK_FIELDS)))
    per_stage = np.zeros((MAX_STAGES, len(STAGE_FIELDS)))
    for s, stage in enumerate(stages[:MAX_STAGES]):
        per_stage[s] = [len(stage), math.log2(stage[0].width), math.log2(stage[0].resolution)]
        for b, block in enumerate(stage[:MAX_BLOCKS]):
            per_block[s, b] = [1.0, block.kernel, math.log2(block.mid), block.mid / block.width]
    shape = cg.inputs[0].shape if cg.inputs else ()
    resolution = float(shape[-1]) if len(shape) == 4 else 0.0
    tail = [
        resolution,
        math.log(1.0 + cg.total_flops),
        math.log(1.0 + cg.total_params),
        float(len(stages)),
    ]
    counts = Counter(n.op for n in cg.nodes)
    ops = np.log1p([counts.get(op, 0) for op in OP_VOCAB])
    return np.concatenate([per_block.ravel(), per_stage.ravel(), tail, ops])


__all__ = [
    "BLOCK_FIELDS",
    "GRAPH_FIELDS",
    "MAX_BLOCKS",
    "MAX_STAGES",
    "READOUT_NAMES",
    "READOUT_VERSION",
    "STAGE_FIELDS",
    "Block",
    "block_readout",
    "find_blocks",
    "find_stages",
]
