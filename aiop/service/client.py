"""``RemotePredictor``: the service's client, with the local predictor's ``predict`` interface.

>>> remote = RemotePredictor("http://127.0.0.1:8000", api_key=None)   # doctest: +SKIP
>>> remote.predict(cg, ["bs=32,mb=8", "bs=32,freeze=0.5"])            # doctest: +SKIP
[{'config': 'bs=32,mb=8,...', 'peak_memory_bytes': ..., 'breakdown': {...}, ...}]

A graph is uploaded once per fingerprint (as CG JSON, which the server parses
with :mod:`aiop.cg` only); a server that lost it (404) gets it again once.
Configurations are sent in chunks that fit the server's ``max_configs``.
Connection failures are retried with exponential backoff; an HTTP error raises
:class:`~aiop.service.errors.RemoteError` (a ``ValueError``) naming the status
and the server's message. Anything the planner or the retraining loop accepts
as a predictor (``predict(cg, configs) -> list[dict]``) accepts this.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any, Protocol

import httpx

from aiop.service.errors import RemoteError, RemoteUnavailable

log = logging.getLogger(__name__)


class _Process(Protocol):
    """What :func:`wait_until_healthy` needs of a server process (``subprocess.Popen``)."""

    returncode: int | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...


def wait_until_healthy(
    url: str, proc: _Process | None = None, timeout: float = 120.0, interval: float = 0.2
) -> dict[str, Any]:
    """Poll ``GET url/healthz`` until it answers 200; returns its JSON.

    ``proc``, the server's process if this side started it, turns a server
    that dies while starting into an immediate error (with the tail of its
    stderr when that was piped) instead of a wait until ``timeout``. Raises
    :class:`~aiop.service.errors.RemoteUnavailable` (a ``ValueError``) when the
    process exits or ``timeout`` seconds pass; it never kills ``proc``: the
    caller that started it decides.
    """
    base = url.rstrip("/")
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if proc is not None and proc.poll() is not None:
            tail = ""
            if proc.stderr is not None:
                try:
                    text = proc.stderr.read().decode(errors="replace").strip()
                except (OSError, ValueError):  # closed or non-blocking pipe
                    text = ""
                tail = f": {text[-2000:]}" if text else ""
            raise RemoteUnavailable(
                f"the server process exited with code {proc.returncode} while starting{tail}",
                base,
            )
        try:
            response = httpx.get(base + "/healthz", timeout=max(interval, 1.0))
            if response.status_code == 200:
                return response.json()
            last = f"/healthz answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise RemoteUnavailable(f"not healthy after {timeout:g} s ({last})", base)
        time.sleep(interval)


class RemotePredictor:
    """Predictions from an ``aiop serve`` server.

    ``timeout``: seconds per HTTP request; ``retries``: extra attempts after a
    connection error (waiting ``backoff``, ``2 × backoff``, ... seconds);
    ``chunk``: most configurations per request (lowered to the server's limit).
    ``api_key`` defaults to the ``AIOP_API_KEY`` environment variable. Thread-safe:
    one instance may serve several threads.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        chunk: int = 1024,
        predictor: str = "default",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the service URL must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.chunk = max(1, int(chunk))
        self.predictor = predictor
        if api_key is None:
            api_key = os.environ.get("AIOP_API_KEY") or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        self._uploaded: set[str] = set()
        self._lock = threading.Lock()
        self._max_configs: int | None = None
        self._info: dict[str, Any] | None = None

    # -- plumbing ---------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemotePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call with retries on connection errors; JSON answer, or :class:`RemoteError`."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self._client.request(method, path, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                    httpx.ReadError, httpx.WriteError) as exc:  # fmt: skip
                if attempt == self.retries:
                    raise RemoteUnavailable(
                        f"{type(exc).__name__}: {exc} (after {attempt + 1} attempts)", self.url
                    ) from None
                log.info("%s %s: %s; retrying in %.2f s", method, path, exc, delay)
                time.sleep(delay)
                delay *= 2
        if response.status_code >= 400:
            try:
                body = response.json()
                message, detail = str(body.get("error", body)), body.get("detail")
            except (ValueError, AttributeError):
                message, detail = response.text[:300] or response.reason_phrase, None
            raise RemoteError(response.status_code, message, detail, self.url + path)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (status, version, limits)."""
        return self._request("GET", "/healthz")

    def predictors(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/predictors")["predictors"]

    def _predictor_info(self) -> dict[str, Any]:
        if self._info is None:
            infos = {p["name"]: p for p in self.predictors()}
            if self.predictor not in infos:
                raise RemoteError(404, f"the server has no predictor named {self.predictor!r}")
            self._info = infos[self.predictor]
        return self._info

    @property
    def error_quantiles(self) -> dict[str, dict[str, float]]:
        """The server predictor's calibration (the planner's safety margin), as locally."""
        try:
            return dict(self._predictor_info().get("error_quantiles") or {})
        except RemoteError:
            return {}

    @property
    def targets(self) -> list[str]:
        return list(self._predictor_info().get("targets") or [])

    def _chunk_size(self) -> int:
        if self._max_configs is None:
            try:
                self._max_configs = int(self.health()["limits"]["max_configs"])
            except (RemoteError, KeyError, TypeError, ValueError):
                self._max_configs = self.chunk
        return max(1, min(self.chunk, self._max_configs))

    # -- graphs -----------------------------------------------------------------------
    def upload(self, cg: Any) -> str:
        """Store ``cg`` on the server (CG JSON); returns its graph id."""
        fp = cg.fingerprint
        info = self._request("POST", "/v1/graphs", json={"graph": cg.to_dict()})
        if info["graph_id"] != fp:
            raise RemoteError(200, f"server stored graph {info['graph_id']}, expected {fp}")
        with self._lock:
            self._uploaded.add(fp)
        return fp

    def upload_file(
        self, path: str, fmt: str = "auto", input_shape: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Upload an ONNX / TF ``.pb`` / CG JSON file as raw bytes; returns the graph's info."""
        params: dict[str, str] = {"format": fmt}
        if input_shape is not None:
            params["input_shape"] = ",".join(str(int(d)) for d in input_shape)
        with open(path, "rb") as f:
            data = f.read()
        return self._request(
            "POST",
            "/v1/graphs",
            content=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
        )

    def _ref(self, cg: Any) -> dict[str, str]:
        if isinstance(cg, str):  # a zoo:/family: name or a graph id
            return {"model": cg} if ":" in cg else {"graph_id": cg}
        fp = cg.fingerprint
        with self._lock:
            known = fp in self._uploaded
        if not known:
            self.upload(cg)
        return {"graph_id": fp}

    def _with_graph(self, cg: Any, path: str, body: dict[str, Any]) -> Any:
        ref = self._ref(cg)
        try:
            return self._request("POST", path, json={**ref, **body})
        except RemoteError as exc:
            # The server lost the graph (a new store): upload it again, once.
            if exc.status != 404 or isinstance(cg, str) or not exc.detail:
                raise
            with self._lock:
                self._uploaded.discard(cg.fingerprint)
            return self._request("POST", path, json={**self._ref(cg), **body})

    # -- the predictor interface ------------------------------------------------------
    def predict(self, cg: Any, configs: Iterable[Any]) -> list[dict[str, Any]]:
        """Predictions for every configuration of ``cg`` (a ComputeGraph, model name or id)."""
        specs = [c if isinstance(c, str) else c.format() for c in configs]
        if not specs:
            return []
        size = self._chunk_size()
        out: list[dict[str, Any]] = []
        for start in range(0, len(specs), size):
            answer = self._with_graph(
                cg,
                "/v1/predict",
                {"configs": specs[start : start + size], "predictor": self.predictor},
            )
            out.extend(answer["predictions"])
        return out

    def plan(
        self,
        cg: Any,
        budget_mb: float,
        *,
        top_k: int = 10,
        time_budget_s: float | None = None,
        margin: float | None = None,
        batch_size: int | None = None,
        device: str | None = None,
    ) -> dict[str, Any]:
        """The server's plan under ``budget_mb`` (``PlanResult.to_dict()`` plus the graph id);
        ``device`` is a built-in device name (``cpu``, ``cuda``, ``edge``)."""
        body: dict[str, Any] = {"budget_mb": budget_mb, "top_k": top_k, "predictor": self.predictor}
        for key, value in (
            ("time_budget_s", time_budget_s),
            ("margin", margin),
            ("batch_size", batch_size),
            ("device", device),
        ):
            if value is not None:
                body[key] = value
        return self._with_graph(cg, "/v1/plan", body)
