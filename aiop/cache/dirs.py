"""Where aiop keeps what it makes once and reuses (trained models, supernets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$AIOP_CACHE_DIR`` or ``~/.cache/aiop`` (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("AIOP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aiop"
