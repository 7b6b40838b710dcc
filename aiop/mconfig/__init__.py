"""m-hyperparameters: :class:`MConfig`, its space, and applying it to a model."""

from aiop.mconfig.apply import (
    Plan,
    apply_method,
    autocast,
    enable_checkpointing,
    is_recomputing,
    make_optimizer,
    make_scaler,
    prepare,
    split_batch,
    train_step,
)
from aiop.mconfig.config import (
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    SPEC_KEYS,
    VECTOR_NAMES,
    CGPlanner,
    MConfig,
    MConfigError,
    cg_plan,
    node_blocks,
)
from aiop.mconfig.space import MSpace

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "PRECISIONS",
    "SPEC_KEYS",
    "VECTOR_NAMES",
    "CGPlanner",
    "MConfig",
    "MConfigError",
    "MSpace",
    "Plan",
    "apply_method",
    "autocast",
    "cg_plan",
    "enable_checkpointing",
    "is_recomputing",
    "make_optimizer",
    "make_scaler",
    "node_blocks",
    "prepare",
    "split_batch",
    "train_step",
]
