"""Load a script of ``scripts/`` or ``benchmarks/`` as a module, to call its ``main`` in the
test's process (the data sets and models it builds are then shared with the test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, name: str) -> ModuleType:
    """The module of ``path`` (relative to the repository, or absolute), registered in
    ``sys.modules`` under ``name`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
