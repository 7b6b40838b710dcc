"""Writing a benchmark's result pair: ``NAME.json`` and ``NAME.md`` in one folder.

Every benchmark ends the same way: make the folder, write the JSON record, write the
Markdown table, say where they went. :func:`write_results` does that once, with atomic
writes (a temporary file in the same folder, then :func:`os.replace`), so an interrupted
run never leaves a half-written result over an earlier good one.

Benchmarks import it as a sibling module. ``python benchmarks/x.py`` puts ``benchmarks/``
first on ``sys.path``; tests load benchmarks from their file, so each benchmark adds its
own folder to ``sys.path`` before the import (see :func:`write_results`'s callers).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "write_results"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and an atomic rename.

    The temporary file is opened with the usual mode (umask applies, unlike
    :func:`tempfile.mkstemp`'s 0600), flushed to disk before the rename, and removed if
    anything fails, so ``path`` holds either its old or its complete new content.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _with_newline(text: str) -> str:
    """``text`` ending in exactly the newlines it had, plus one if it had none."""
    return text if text.endswith("\n") else text + "\n"


def write_results(
    out_dir: str | os.PathLike[str],
    name: str,
    result: Any,
    markdown: str,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/name.json`` and ``out_dir/name.md`` atomically; return both paths.

    ``result`` is dumped with ``indent`` (2 unless a benchmark's committed files use
    another: their format stays as it was) and ``default`` (for values JSON does not
    know, e.g. ``str``). Both files end with a newline. The two paths are printed on
    stderr, so a benchmark's stdout (a table, a JSON record) stays machine-readable.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    # serialise first: a value JSON cannot write fails before either file is touched
    text = json.dumps(result, indent=indent, default=default) + "\n"
    atomic_write_text(json_path, text)
    atomic_write_text(md_path, _with_newline(markdown))
    print(f"wrote {json_path}", file=sys.stderr)
    print(f"wrote {md_path}", file=sys.stderr)
    return json_path, md_path
