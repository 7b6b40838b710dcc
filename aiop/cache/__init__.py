"""Crash-safe SQLite store of graphs, configs and measured labels; AIO-P ``.pkl`` import/export."""

from aiop.cache.aiop_pkl import (
    ImportReport,
    aiop_graph_to_cg,
    export_aiop_pkl,
    import_aiop_pkl,
    load_aiop_pkl,
)
from aiop.cache.dirs import cache_dir
from aiop.cache.errors import CacheError
from aiop.cache.merge import MergeReport, merge_stores
from aiop.cache.store import (
    MEASUREMENT_KINDS,
    SCHEMA_VERSION,
    GraphInfo,
    LabelRecord,
    Record,
    Store,
    check_spec,
)

__all__ = [
    "MEASUREMENT_KINDS",
    "SCHEMA_VERSION",
    "CacheError",
    "GraphInfo",
    "ImportReport",
    "LabelRecord",
    "MergeReport",
    "Record",
    "Store",
    "aiop_graph_to_cg",
    "cache_dir",
    "check_spec",
    "export_aiop_pkl",
    "import_aiop_pkl",
    "load_aiop_pkl",
    "merge_stores",
]
