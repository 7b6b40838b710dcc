"""The m-hyperparameter space: MPOptimizer's grid crossed with TinyTL methods and precisions.

MPOptimizer searches (micro-batch, accumulation) pairs whose product is the
batch — (1, 256), (2, 128), ... (256, 1) — freezing rates in steps of 10 %,
and checkpoint segments up to about √L for L blocks. :class:`MSpace` is that
grid, crossed with train methods, precisions and optimizers; iterate it or
:meth:`MSpace.sample` from it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiop.mconfig.config import METHODS, PRECISIONS, MConfig, MConfigError


def _powers_of_two_up_to(n: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(n)) + 1) if n % 2**i == 0)


@dataclass(frozen=True)
class MSpace:
    """A grid of m-configurations (the cross product of its fields)."""

    batch_sizes: tuple[int, ...] = (256,)
    # None: every power of two that divides the batch size, from 1 to the batch size.
    micro_batches: tuple[int, ...] | None = None
    freezes: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    segments: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    precisions: tuple[str, ...] = PRECISIONS
    optimizers: tuple[str, ...] = ("sgd",)
    _mbs: dict[int, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise MConfigError("the space needs at least one batch size")
        for bs in self.batch_sizes:
            mbs = self.micro_batches or _powers_of_two_up_to(bs)
            mbs = tuple(mb for mb in mbs if 1 <= mb <= bs and bs % mb == 0)
            if not mbs:
                raise MConfigError(f"no micro-batch size in {self.micro_batches} divides bs={bs}")
            self._mbs[bs] = mbs
        # Validate every other axis once through a representative config.
        for f, k, m, p, o in itertools.product(
            self.freezes, self.segments, self.methods, self.precisions, self.optimizers
        ):
            MConfig(freeze=f, ckpt=k, method=m, prec=p, opt=o)
            break
        for values, name in (
            (self.freezes, "freezes"),
            (self.segments, "segments"),
            (self.methods, "methods"),
            (self.precisions, "precisions"),
            (self.optimizers, "optimizers"),
        ):
            if not values:
                raise MConfigError(f"the space has no {name}")

    @classmethod
    def for_model(cls, n_blocks: int, batch_size: int = 256, **kwargs: object) -> MSpace:
        """MPOptimizer's grid for a model of ``n_blocks`` blocks: segments 0..⌊√n_blocks⌋."""
        max_k = max(1, math.isqrt(max(n_blocks, 1)))
        return cls(batch_sizes=(batch_size,), segments=tuple(range(max_k + 1)), **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        rest = (
            len(self.freezes)
            * len(self.segments)
            * len(self.methods)
            * len(self.precisions)
            * len(self.optimizers)
        )
        return sum(len(self._mbs[bs]) for bs in self.batch_sizes) * rest

    def __iter__(self) -> Iterator[MConfig]:
        for bs in self.batch_sizes:
            for mb, f, k, m, p, o in itertools.product(
                self._mbs[bs],
                self.freezes,
                self.segments,
                self.methods,
                self.precisions,
                self.optimizers,
            ):
                yield MConfig(
                    batch_size=bs, micro_batch=mb, freeze=f, ckpt=k, method=m, prec=p, opt=o
                )

    def sample(self, n: int, seed: int = 0, unique: bool = True) -> list[MConfig]:
        """``n`` configs, each axis drawn uniformly (without repeats when ``unique``)."""
        rng = random.Random(seed)
        size = len(self)
        if unique and n >= size:
            return list(self)
        out: list[MConfig] = []
        seen: set[MConfig] = set()
        while len(out) < n:
            bs = rng.choice(self.batch_sizes)
            cfg = MConfig(
                batch_size=bs,
                micro_batch=rng.choice(self._mbs[bs]),
                freeze=rng.choice(self.freezes),
                ckpt=rng.choice(self.segments),
                method=rng.choice(self.methods),
                prec=rng.choice(self.precisions),
                opt=rng.choice(self.optimizers),
            )
            if unique and cfg in seen:
                continue
            seen.add(cfg)
            out.append(cfg)
        return out
