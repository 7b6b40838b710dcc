"""Model zoo, elastic architecture families and TinyTL modules (plain PyTorch).

* ``build("zoo:NAME", num_classes=, in_chans=, width_mult=, resolution=)`` and
  ``build("family:FAMILY:SEED", num_classes=10, in_chans=3, resolution=None)``.
* ``sample``, ``sample_arch``, ``build_arch``, ``arch_stats``, ``balanced_sample``.
* ``zoo_table()`` for ``aiop zoo list``.
* TinyTL: :mod:`aiop.models.tinytl`.
"""

from aiop.models.base import BlockNet, count_params, parameterised_modules, split_segments
from aiop.models.errors import ModelSpecError
from aiop.models.families import (
    FAMILY_NAMES,
    arch_stats,
    balanced_sample,
    build_arch,
    describe_space,
    sample,
    sample_arch,
)
from aiop.models.tinytl import (
    TRAIN_METHODS,
    insert_lite_residual,
    replace_bn_with_gn,
    set_train_method,
)
from aiop.models.zoo import REFERENCE_PARAMS, ZOO_NAMES, build, thop_flops, zoo_table

__all__ = [
    "FAMILY_NAMES",
    "REFERENCE_PARAMS",
    "TRAIN_METHODS",
    "ZOO_NAMES",
    "BlockNet",
    "ModelSpecError",
    "arch_stats",
    "balanced_sample",
    "build",
    "build_arch",
    "count_params",
    "describe_space",
    "insert_lite_residual",
    "parameterised_modules",
    "replace_bn_with_gn",
    "sample",
    "sample_arch",
    "set_train_method",
    "split_segments",
    "thop_flops",
    "zoo_table",
]
