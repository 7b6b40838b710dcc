"""Checkpoints of aiop.tasks (shared heads, supernets): one safetensors file, JSON metadata.

Written atomically (a temporary file in the same folder, then a rename), so a killed
run never leaves half a checkpoint; read back with the format checked, so a file of
another kind fails with a one-line error naming what it is not.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike[str]
) -> Path:
    """Write ``tensors`` with ``meta`` (JSON under the ``aiop`` key) to ``path``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"aiop": json.dumps(meta, sort_keys=True)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    fmt: str,
    what: str,
    error: type[ValueError],
    *,
    tensors: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint whose metadata names format ``fmt``; ``error``
    (one line, naming ``what`` the file should be) when it is missing or not one. With
    ``tensors=False`` only the header is read (the tensors come back empty)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("aiop")
            keys = f.keys() if tensors else []
            state = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path}: not a safetensors {what} checkpoint ({exc})") from None
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path}: not an aiop {what} checkpoint (no {fmt} metadata)")
    return state, meta
