"""Errors raised on bad model specifications."""

from __future__ import annotations


class ModelSpecError(ValueError):
    """An unknown or malformed model name, family, arch config or build option."""
