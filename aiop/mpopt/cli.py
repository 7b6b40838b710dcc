"""Subcommands of ``aiop`` that this subpackage owns.

``aiop.cli`` calls :func:`register` while it builds its parser; keep imports at
module level light (argparse only) so ``aiop --help`` stays fast.
"""

from __future__ import annotations

from typing import Any


def register(sub: Any, model_help: str) -> None:
    """Add this subpackage's subcommands to ``aiop``'s subparsers."""
    del sub, model_help  # no subcommands yet
