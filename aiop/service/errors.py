"""Errors of the service and its client.

Every class derives from :class:`ValueError` (so ``aiop.cli`` reports it as one
line with exit code 2) and carries the HTTP status the server answers with.
"""

from __future__ import annotations

from typing import Any


class ServiceError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status it answers with."""

    status: int = 400

    def __init__(self, message: str, detail: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class RequestTimeout(ServiceError):
    status = 408


class PayloadTooLarge(ServiceError):
    status = 413


class Unprocessable(ServiceError):
    """Well-formed but unusable input: a model that does not parse, a bad SPEC, a graph too big."""

    status = 422


class ServiceBusy(ServiceError):
    """The work did not finish within the server's request timeout."""

    status = 503


class RemoteError(ValueError):
    """The server answered a client request with an error (``status`` and its message)."""

    def __init__(self, status: int, message: str, detail: Any = None, url: str = "") -> None:
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}")
        self.status = status
        self.message = message
        self.detail = detail


class RemoteUnavailable(RemoteError):
    """The server could not be reached after every retry (status 0: no HTTP answer)."""

    def __init__(self, message: str, url: str = "") -> None:
        ValueError.__init__(self, f"cannot reach the aiop service at {url}: {message}")
        self.status = 0
        self.message = message
        self.detail = None
