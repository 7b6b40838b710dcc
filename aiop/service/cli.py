"""Subcommands of ``aiop`` that this subpackage owns: ``aiop serve``.

``aiop.cli`` calls :func:`register` while it builds its parser; keep imports at
module level light (argparse only) so ``aiop --help`` stays fast.

    aiop serve --host 127.0.0.1 --port 8000 [--store PATH] [--predictor FILE]
               [--api-keys-file F] [--allow-unauthenticated]

API keys come from ``--api-keys-file`` (one per line) and the ``AIOP_API_KEYS``
environment variable (comma-separated). Without any key the server only binds
to a loopback address, unless ``--allow-unauthenticated`` says otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from aiop.service.app import ServiceLimits, create_app, read_api_keys
    from aiop.service.errors import ServiceError

    keys = read_api_keys(args.api_keys_file)
    if not keys and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise ServiceError(
            f"refusing to serve on {args.host} without API keys: set {'AIOP_API_KEYS'} or "
            "--api-keys-file, or pass --allow-unauthenticated"
        )
    if not 0 <= args.port <= 65535:
        raise ServiceError(f"--port must be in 0..65535, not {args.port}")
    limits = ServiceLimits(
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_configs=args.max_configs,
        request_timeout_s=args.timeout,
        workers=args.workers,
        prediction_cache_size=args.prediction_cache,
    )
    app = create_app(args.store, args.predictor, api_keys=keys, limits=limits)
    import uvicorn

    logging.getLogger("aiop").info(
        "serving on http://%s:%d (store %s, auth %s)",
        args.host,
        args.port,
        args.store,
        "on" if keys else "off",
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_keep_alive=30,
    )
    return 0


def register(sub: Any, model_help: str) -> None:
    """Add this subpackage's subcommands to ``aiop``'s subparsers."""
    del model_help
    p = sub.add_parser("serve", help="serve the predictor over HTTP (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default="aiop-service.db", help="SQLite store of uploaded graphs")
    p.add_argument("--predictor", help="predictor file (default: the one shipped with aiop)")
    p.add_argument("--api-keys-file", help="file of API keys, one per line (also $AIOP_API_KEYS)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host without API keys",
    )
    p.add_argument("--max-upload-mb", type=float, default=256.0, help="largest model upload")
    p.add_argument("--max-configs", type=int, default=4096, help="most configs per request")
    p.add_argument("--timeout", type=float, default=120.0, help="request timeout in seconds")
    p.add_argument("--workers", type=int, default=4, help="threads running predictions")
    p.add_argument(
        "--prediction-cache",
        type=int,
        default=50_000,
        help="predictions memoised per (predictor, graph, config); 0 turns it off",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)
