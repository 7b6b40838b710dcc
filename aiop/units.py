"""Human-readable numbers, one format everywhere (tables, drawings, reports).

Memory uses binary multiples with IEC names (``KiB``), counts and FLOPs use
decimal prefixes; three significant digits.
"""

from __future__ import annotations


def human_flops(flops: float) -> str:
    """``1234567`` → ``'1.23 MFLOPs'`` (decimal prefixes, like FLOP counters print)."""
    value = float(flops)
    for prefix in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f} {prefix}FLOPs" if prefix == "" else f"{value:.3g} {prefix}FLOPs"
        value /= 1000
    raise AssertionError("unreachable")


def human_count(count: float) -> str:
    """``23456`` → ``'23.5k'``."""
    value = float(count)
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f}" if prefix == "" else f"{value:.3g}{prefix}"
        value /= 1000
    raise AssertionError("unreachable")


def human_bytes(nbytes: float) -> str:
    """``401408`` → ``'392 KiB'`` (binary multiples, as memory is counted)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
