"""Ground truth: peak training memory (meta, real CPU, CUDA), FLOPs/params, latency."""

from aiop.profiler.core import ProfileResult, profile, resolve_model, tool_version
from aiop.profiler.flops import FlopsCount, count_flops
from aiop.profiler.latency import LatencyMeasurement, measure_latency
from aiop.profiler.memory import (
    META_MICRO_BATCHES,
    MODES,
    MemoryMeasurement,
    ProfilerError,
    measure_memory,
)
from aiop.profiler.tracker import CATEGORIES, StepMemoryTracker, frozen_safe_memtracker

__all__ = [
    "CATEGORIES",
    "META_MICRO_BATCHES",
    "MODES",
    "FlopsCount",
    "LatencyMeasurement",
    "MemoryMeasurement",
    "ProfileResult",
    "ProfilerError",
    "StepMemoryTracker",
    "count_flops",
    "frozen_safe_memtracker",
    "measure_latency",
    "measure_memory",
    "profile",
    "resolve_model",
    "tool_version",
]
