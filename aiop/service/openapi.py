"""The service's OpenAPI document, as checked into ``docs/openapi.json``.

Regenerate it after changing a route or a schema (a test compares the served
document with the file)::

    .venv/bin/python -m aiop.service.openapi docs/openapi.json

Nothing is loaded or opened: the document depends only on the routes and the
schemas, not on a server's predictor, store, keys or limits.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def openapi_document() -> dict[str, Any]:
    from aiop.service.app import create_app

    with tempfile.TemporaryDirectory() as tmp:  # the store is only opened at startup
        app = create_app(Path(tmp) / "unused.db", predictors={})
        return app.openapi()


def render() -> str:
    """The document as written to ``docs/openapi.json`` (sorted keys, trailing newline)."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if not args or args[0] == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args[0])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)  # atomic: a reader never sees half a document
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
