"""The predictor as an HTTP service (FastAPI).

Endpoints (schemas in :mod:`aiop.service.schemas`; the document is
``docs/openapi.json``):

* ``POST /v1/graphs`` — upload a model: raw ONNX, frozen TF ``.pb`` or CG JSON
  bytes (``Content-Type: application/octet-stream``; ``?format=auto|onnx|pb|json``,
  ``&input_shape=1,3,224,224``, ``&name=...``), or JSON ``{"model": "zoo:NAME"}``
  / ``{"graph": {...}}``. Answers the graph id (the CG fingerprint); graphs
  persist in the SQLite store, each in one transaction.
* ``GET /v1/graphs/{graph_id}`` — a stored graph's summary (404 when unknown).
* ``POST /v1/predict`` — graph id or model name plus SPECs → memory with its
  breakdown, latency, FLOPs, accuracy per configuration.
* ``POST /v1/plan`` — graph + budget → ranked configurations with the
  planner's explanation.
* ``GET /v1/predictors``, ``GET /healthz``, ``GET /metrics`` (Prometheus text).

Every error is ``{"error": "...", "detail": ...}`` with a 4xx status (5xx
only for a server fault or a request that outran the request timeout, 503).
Request bodies are size-limited while they stream in (before any parsing);
uploads are parsed by :mod:`aiop.cg` only, after :mod:`aiop.service.guard`
has checked their declared sizes. With API keys configured every ``/v1`` route
and ``/metrics`` need ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``
(compared in constant time); ``/healthz`` and the OpenAPI document stay open.

Predictor work runs in a thread pool; the store is owned by one thread (SQLite
connections are per thread), with an LRU of parsed graphs in front of it.
Concurrent prediction requests for one graph are coalesced into one predictor
call (:mod:`aiop.service.batching`), and each prediction is memoised as its
JSON text per (predictor, graph, SPEC): the predictor is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiop import __version__
from aiop.service import schemas
from aiop.service.batching import PredictionBatcher
from aiop.service.errors import (
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceBusy,
    ServiceError,
    Unauthorized,
    Unprocessable,
)
from aiop.service.guard import GraphLimits, check_graph_dict, check_onnx, parse_json_bytes
from aiop.service.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

API_KEYS_ENV = "AIOP_API_KEYS"
UPLOAD_PATH = "/v1/graphs"


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask of the server."""

    max_upload_bytes: int = 256 << 20  # a ResNet-50 ONNX with weights is ~100 MB
    max_json_bytes: int = 16 << 20  # predict/plan bodies and CG JSON
    max_configs: int = 4096
    max_graph_nodes: int = 20_000
    max_tensor_elements: int = 1 << 34
    max_const_elements: int = 1 << 26
    max_batch_size: int = 65_536
    request_timeout_s: float = 120.0
    body_timeout_s: float = 30.0  # per chunk of a body: a stalled sender gets 408
    graph_cache_size: int = 128  # parsed graphs kept in memory (LRU by fingerprint)
    prediction_cache_size: int = 50_000  # (predictor, graph, SPEC) → prediction; 0: off
    workers: int = 4  # threads running predictor work

    def graph_limits(self) -> GraphLimits:
        return GraphLimits(self.max_graph_nodes, self.max_tensor_elements, self.max_const_elements)

    def public(self) -> schemas.Limits:
        d = asdict(self)
        return schemas.Limits(**{k: d[k] for k in schemas.Limits.model_fields})


# -- API keys -------------------------------------------------------------------------
def read_api_keys(file: str | os.PathLike[str] | None = None, env: bool = True) -> list[str]:
    """Keys from ``AIOP_API_KEYS`` (comma-separated) and a file (one per line, ``#`` comments)."""
    keys: list[str] = []
    if env:
        keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ServiceError(f"cannot read API keys file {path}: {exc.strerror or exc}") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if any(len(k) < 8 for k in keys):
        raise ServiceError("API keys must be at least 8 characters long")
    return keys


class KeyChecker:
    """Constant-time membership test: compares digests against every key, no early exit."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, given: str | None) -> bool:
        if not self._digests:
            return True
        digest = hashlib.sha256((given or "").encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, digest)
        return ok and given is not None


_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer API_KEY")
_HEADER_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: API_KEY")


async def authorized(
    request: Request,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    key: Annotated[str | None, Depends(_HEADER_KEY)],
) -> None:
    """The dependency of every protected route (a no-op when the server has no keys)."""
    keys: KeyChecker = request.app.state.aiop.keys
    if not keys.enabled:
        return
    given = cred.credentials if cred is not None else key
    if given is None:
        raise Unauthorized("an API key is required (Authorization: Bearer KEY or X-API-Key)")
    if not keys.check(given):
        raise Unauthorized("wrong API key")


# -- errors ------------------------------------------------------------------------------
def error_response(status: int, message: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status)


def _clean_validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without the offending input (which may be 10,000 configs)."""
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in list(errors)[:20]
    ]


def _validation_message(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid request: {where}: {first['msg']}{more}"


# -- ASGI middleware ----------------------------------------------------------------------
class MetricsAndLimitsMiddleware:
    """Outermost layer: body size/time limits while streaming, then request metrics.

    The body is read here, up to the route's limit, before the app sees it: a
    declared ``Content-Length`` over the limit is refused without reading, a
    chunked body as soon as it passes the limit, and a sender that stalls longer
    than ``body_timeout_s`` gets 408. The app then reads the buffered body.
    """

    def __init__(self, app: Any, limits: ServiceLimits, metrics: Metrics) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        self.metrics.request_started()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body_or_error = await self._read_body(scope, receive)
            if isinstance(body_or_error, ServiceError):
                exc = body_or_error
                response = error_response(exc.status, str(exc), exc.detail)
                # The rest of the body is unread: close the connection rather than let the
                # server drain (and discard) whatever the client still sends.
                response.headers["connection"] = "close"
                await response(scope, receive, send_wrapper)
                return
            await self.app(scope, self._replay(body_or_error, receive), send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(
                scope["method"], label, status["code"], time.perf_counter() - start
            )

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes | ServiceError:
        limit = (
            self.limits.max_upload_bytes
            if scope["path"].rstrip("/") == UPLOAD_PATH
            else self.limits.max_json_bytes
        )
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return ServiceError("invalid Content-Length header")
            if size > limit:
                return PayloadTooLarge(
                    f"request body of {size:,} bytes is over the limit of {limit:,} bytes",
                    {"limit_bytes": limit},
                )
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout_s)
            except TimeoutError:
                return RequestTimeout(
                    f"request body stalled for {self.limits.body_timeout_s:g} s", None
                )
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return PayloadTooLarge(
                    f"request body is over the limit of {limit:,} bytes", {"limit_bytes": limit}
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as ASGI specifies

        return replay


# -- state ---------------------------------------------------------------------------------
class ServiceState:
    """Predictors, the store (owned by one thread), the graph LRU and the metrics."""

    def __init__(
        self,
        store_path: Path,
        predictors: Mapping[str, tuple[Any, str]],
        limits: ServiceLimits,
        keys: KeyChecker,
    ) -> None:
        self.store_path = store_path
        self.predictors = dict(predictors)
        self.limits = limits
        self.keys = keys
        self.metrics = Metrics()
        self.started = time.time()
        self.batcher = PredictionBatcher(limits.max_configs, retry_alone=(Unprocessable,))
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._pools_lock = threading.Lock()
        self._store: Any = None
        self._graphs: OrderedDict[str, Any] = OrderedDict()
        self._graphs_lock = threading.Lock()
        self._names: dict[str, str] = {}  # model name → fingerprint
        # Predictions are a pure function of (predictor, graph, config): memoised, bounded.
        self._predictions: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._predictions_lock = threading.Lock()

    # store: every call runs on the single store thread
    def _open_store(self) -> Any:
        if self._store is None:
            from aiop.cache import Store

            self._store = Store(self.store_path)
        return self._store

    def pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """The store's single thread and the workers; made anew after :meth:`close`, so an
        app survives several lifespans (test clients, schemathesis, embedding servers)."""
        with self._pools_lock:
            if self._pools is None:
                self._pools = (
                    ThreadPoolExecutor(1, thread_name_prefix="aiop-store"),
                    ThreadPoolExecutor(self.limits.workers, thread_name_prefix="aiop-work"),
                )
            return self._pools

    async def in_store(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pools()[0], lambda: fn(self._open_store()))

    async def in_worker(self, fn: Callable[[], T]) -> T:
        """Run predictor work in the pool; past the request timeout answer 503."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pools()[1], fn)
        try:
            return await asyncio.wait_for(future, self.limits.request_timeout_s)
        except TimeoutError:
            raise ServiceBusy(
                f"the request did not finish within {self.limits.request_timeout_s:g} s"
            ) from None

    def close(self) -> None:
        def _close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        with self._pools_lock:
            pools, self._pools = self._pools, None
        if pools is None:
            return
        store_pool, work_pool = pools
        with contextlib.suppress(RuntimeError):
            store_pool.submit(_close).result()
        store_pool.shutdown(wait=True)
        work_pool.shutdown(wait=False, cancel_futures=True)

    # graph cache
    def cached_graph(self, fp: str) -> Any | None:
        with self._graphs_lock:
            cg = self._graphs.get(fp)
            if cg is not None:
                self._graphs.move_to_end(fp)
            return cg

    def remember_graph(self, cg: Any, fp: str) -> None:
        """Keep ``cg`` in the LRU under ``fp``, its verified content hash.

        The predictor's and the planner's caches key on ``meta["fp"]``, and hashing a
        graph costs milliseconds (9 ms for MobileNetV2): it is set here, from a hash the
        caller computed off the event loop, never taken from what an upload wrote.
        """
        cg.meta["fp"] = fp
        with self._graphs_lock:
            self._graphs[fp] = cg
            self._graphs.move_to_end(fp)
            while len(self._graphs) > self.limits.graph_cache_size:
                self._graphs.popitem(last=False)

    def predict(self, name: str, predictor: Any, cg: Any, configs: list[Any]) -> list[str]:
        """Predictions for ``configs`` in order, each as its JSON text: memoised ones, the
        rest in one predictor call (run in a worker thread: serialising happens here too)."""
        fp = graph_id(cg)
        specs = [c.format() for c in configs]
        size = self.limits.prediction_cache_size
        found: dict[str, str] = {}
        if size:
            with self._predictions_lock:
                for spec in specs:
                    hit = self._predictions.get((name, fp, spec))
                    if hit is not None:
                        found[spec] = hit
                        self._predictions.move_to_end((name, fp, spec))
        todo_specs = list(dict.fromkeys(s for s in specs if s not in found))
        self.metrics.add("prediction_cache_hits", len(specs) - len(todo_specs))
        if todo_specs:
            by_spec = dict(zip(specs, configs))
            fresh = [
                json.dumps(p, allow_nan=False)  # NaN/inf would not be JSON: a 422 instead
                for p in predictor.predict(cg, [by_spec[s] for s in todo_specs])
            ]
            found.update(zip(todo_specs, fresh))
            if size:
                with self._predictions_lock:
                    for spec, pred in zip(todo_specs, fresh):
                        self._predictions[(name, fp, spec)] = pred
                    while len(self._predictions) > size:
                        self._predictions.popitem(last=False)
        return [found[s] for s in specs]

    def predictor(self, name: str) -> Any:
        if name not in self.predictors:
            raise NotFound(f"no predictor named {name!r}; see GET /v1/predictors")
        return self.predictors[name][0]


@functools.lru_cache(maxsize=65536)
def parse_spec(spec: str) -> Any:
    """``MConfig.parse``, memoised: clients send the same SPECs over and over, and parsing
    64 of them per request on the event loop cost more than answering from the cache."""
    from aiop.mconfig import MConfig

    return MConfig.parse(spec)


def graph_id(cg: Any) -> str:
    """The fingerprint of a graph that went through :meth:`ServiceState.remember_graph`."""
    return cg.meta["fp"]


def _graph_info(cg: Any, created: bool) -> schemas.GraphInfo:
    return schemas.GraphInfo(
        graph_id=graph_id(cg),
        name=cg.name,
        source=cg.source,
        nodes=cg.num_nodes,
        edges=cg.num_edges,
        params=cg.total_params,
        flops=cg.total_flops,
        created=created,
    )


def _sanitize(cg: Any) -> Any:
    """Drop meta keys that steer aiop's own caches (an upload may carry anything there)."""
    cg.meta.pop("fp", None)
    return cg


# -- the app -----------------------------------------------------------------------------
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in (
        (400, "bad request"),
        (401, "missing or wrong API key"),
        (404, "unknown graph or predictor"),
        (408, "request body stalled"),
        (413, "body over the size limit"),
        (422, "invalid request, model or configuration"),
        (503, "did not finish within the request timeout"),
    )
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "a model file (raw bytes) or a JSON GraphUpload",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/GraphUpload"}},
        },
    }
}


def load_predictors(predictor_path: str | os.PathLike[str] | None) -> dict[str, tuple[Any, str]]:
    """``{"default": (Predictor, file)}`` from a file, or the predictor shipped with aiop."""
    from aiop.cli import default_predictor_path, load_predictor

    path = str(predictor_path) if predictor_path else None
    predictor = load_predictor(path)
    return {"default": (predictor, str(path or default_predictor_path()))}


def create_app(
    store_path: str | os.PathLike[str],
    predictor_path: str | os.PathLike[str] | None = None,
    api_keys: Iterable[str] | None = None,
    limits: ServiceLimits | None = None,
    *,
    predictors: Mapping[str, tuple[Any, str]] | None = None,
) -> FastAPI:
    """The service's ASGI app.

    ``store_path``: the SQLite store (created when missing). ``predictor_path``:
    a predictor file (default: the one shipped with aiop); ``predictors`` may
    pass already loaded ones as ``{name: (predictor, file)}`` instead.
    ``api_keys``: required keys (none: no auth).
    """
    limits = limits or ServiceLimits()
    store_path = Path(store_path)
    if not store_path.parent.is_dir():
        raise ServiceError(f"store directory {store_path.parent} does not exist")
    state = ServiceState(
        store_path,
        predictors if predictors is not None else load_predictors(predictor_path),
        limits,
        KeyChecker(api_keys or ()),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.in_store(lambda store: store.count())  # open (and create) the store now
        yield
        state.close()

    app = FastAPI(
        title="aiop predictor service",
        version=__version__,
        description="Peak training memory, latency, FLOPs and accuracy of m-configurations, "
        "predicted from a model's computational graph.",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )
    app.state.aiop = state
    app.add_middleware(MetricsAndLimitsMiddleware, limits=limits, metrics=state.metrics)
    _add_error_handlers(app)

    auth = [Depends(authorized)]

    # -- graphs ----------------------------------------------------------------------------
    async def graph_by_id(fp: str) -> Any:
        cg = state.cached_graph(fp)
        if cg is not None:
            return cg

        def load(store: Any) -> Any:
            # get_graph checks the content against the fingerprint it was stored under
            return store.get_graph(fp) if store.has_graph(fp) else None

        cg = await state.in_store(load)
        if cg is None:
            raise NotFound(f"unknown graph {fp}: upload it with POST /v1/graphs", {"graph_id": fp})
        state.remember_graph(cg, fp)
        return cg

    async def graph_by_name(model: str, input_shape: list[int] | None = None) -> tuple[Any, bool]:
        key = model if input_shape is None else f"{model}@{','.join(map(str, input_shape))}"
        fp = state._names.get(key)
        if fp is not None:
            return await graph_by_id(fp), False

        def lookup(store: Any) -> str | None:
            for info in store.graphs():
                if info.meta.get("model_key") == key:
                    return info.fingerprint
            return None

        fp = await state.in_store(lookup)
        if fp is not None:
            state._names[key] = fp
            return await graph_by_id(fp), False
        from aiop.cg import graph_for_model

        if input_shape is not None:
            check_graph_dict(
                {"nodes": [], "edges": [], "inputs": [{"shape": input_shape}], "outputs": []},
                limits.graph_limits(),
            )
        cg = await state.in_worker(lambda: graph_for_model(model, input_shape))
        created = await store_graph(cg, meta={"model_key": key})
        state._names[key] = graph_id(cg)
        return cg, created

    async def store_graph(cg: Any, meta: Mapping[str, Any] | None = None) -> bool:
        """Persist ``cg`` in one transaction; True when it was new."""

        def put(store: Any) -> tuple[bool, str]:
            fp = cg.fingerprint
            new = not store.has_graph(fp)
            store.put_graph(cg, meta=dict(meta) if meta else None)
            return new, fp

        created, fp = await state.in_store(put)
        state.remember_graph(cg, fp)
        state.metrics.add("graphs_uploaded")
        if created:
            state.metrics.add("graphs_created")
        return created

    async def resolve(ref: schemas.GraphRef) -> Any:
        if ref.graph_id is not None:
            return await graph_by_id(ref.graph_id)
        assert ref.model is not None
        return (await graph_by_name(ref.model))[0]

    def parse_upload(data: bytes, fmt: str, input_shape: list[int] | None, name: str | None) -> Any:
        from aiop.cg import ComputeGraph

        gl = limits.graph_limits()
        head = data.lstrip()[:1]
        if fmt == "auto":
            fmt = "json" if head in (b"{", b"") and data.strip() else "onnx"
        if fmt == "json":
            raw = parse_json_bytes(data)
            check_graph_dict(raw, gl)
            cg = ComputeGraph.from_dict(raw)
        elif fmt == "onnx":
            from aiop.cg import from_onnx

            proto = check_onnx(data, gl, input_shape)
            cg = from_onnx(proto, input_shape, name=name or proto.graph.name or "upload")
        else:
            from aiop.cg import from_tf_pb

            if input_shape is not None:
                check_graph_dict(
                    {"nodes": [], "edges": [], "inputs": [{"shape": input_shape}], "outputs": []},
                    gl,
                )
            cg = from_tf_pb(data, input_shape=input_shape, name=name or "tf_graph")
        if cg.num_nodes > gl.max_graph_nodes:
            raise Unprocessable(f"the graph has {cg.num_nodes:,} nodes, over the server's limit")
        if name:
            cg.name = name
        return _sanitize(cg)

    def untrusted(parse: Callable[[], Any]) -> Any:
        # Data from the network: whatever a parser raises on it is the input's fault
        # (a 4xx), but an unexpected exception type is logged in full so the bug gets fixed.
        try:
            return _sanitize(parse())
        except ValueError:
            raise
        except RecursionError:
            raise Unprocessable("the model is nested too deeply to parse") from None
        except MemoryError:
            raise PayloadTooLarge("the model needs more memory than the server allows") from None
        except Exception as exc:
            log.warning("upload parser failed with %s", type(exc).__name__, exc_info=True)
            raise Unprocessable(
                f"cannot parse the model ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    @app.post(
        "/v1/graphs",
        response_model=schemas.GraphInfo,
        dependencies=auth,
        openapi_extra=_UPLOAD_BODY,
        summary="Upload a model (ONNX, TF .pb, CG JSON) or name one; returns its graph id",
    )
    async def upload_graph(
        request: Request,
        format: str = "auto",
        input_shape: str | None = None,
        name: str | None = None,
    ) -> Any:
        if format not in ("auto", "onnx", "pb", "json"):
            raise Unprocessable(f"format must be auto, onnx, pb or json, not {format[:20]!r}")
        if name is not None and (len(name) > 200 or name.startswith(("zoo:", "family:"))):
            raise Unprocessable("name must be at most 200 characters and not a zoo:/family: name")
        shape = _parse_shape(input_shape)
        data = await request.body()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            payload = parse_json_bytes(data, "body")
            if isinstance(payload, dict) and "nodes" in payload and "graph" not in payload:
                payload = {"graph": payload}  # a bare CG, as `aiop cg --out g.json` writes it
            try:
                body = schemas.GraphUpload.model_validate(payload)
            except ValidationError as exc:
                errors = _clean_validation_errors(exc.errors())
                raise Unprocessable(_validation_message(errors), errors) from None
            if body.model is not None:
                cg, created = await graph_by_name(body.model, body.input_shape)
                return _graph_info(cg, created)
            check_graph_dict(body.graph, limits.graph_limits())
            from aiop.cg import ComputeGraph

            graph = body.graph
            cg = await state.in_worker(lambda: untrusted(lambda: ComputeGraph.from_dict(graph)))
            if name:
                cg.name = name
        else:
            if not data:
                raise Unprocessable("empty upload: send the model file as the request body")
            cg = await state.in_worker(
                lambda: untrusted(lambda: parse_upload(data, format, shape, name))
            )
        created = await store_graph(cg)
        return _graph_info(cg, created)

    @app.get("/v1/graphs/{graph_id}", response_model=schemas.GraphInfo, dependencies=auth)
    async def get_graph(graph_id: str) -> Any:
        if not _is_graph_id(graph_id):
            raise NotFound(f"unknown graph {graph_id[:40]!r} (ids are 16 hex digits)")
        return _graph_info(await graph_by_id(graph_id), False)

    # -- predictions -------------------------------------------------------------------------
    def check_configs(specs: list[str]) -> list[Any]:
        if len(specs) > limits.max_configs:
            raise PayloadTooLarge(
                f"{len(specs):,} configs in one request; the limit is {limits.max_configs:,}",
                {"max_configs": limits.max_configs},
            )
        configs = []
        for k, spec in enumerate(specs):
            if len(spec) > 256:
                raise Unprocessable(f"configs[{k}]: SPEC longer than 256 characters")
            try:
                c = parse_spec(spec)
            except ValueError as exc:
                raise Unprocessable(f"configs[{k}]: {exc}") from None
            if c.batch_size > limits.max_batch_size:
                raise Unprocessable(
                    f"configs[{k}]: bs={c.batch_size} is over the limit of {limits.max_batch_size}"
                )
            configs.append(c)
        return configs

    @app.post("/v1/predict", response_model=schemas.PredictResponse, dependencies=auth)
    async def predict(req: schemas.PredictRequest) -> Any:
        configs = check_configs(req.configs)
        predictor = state.predictor(req.predictor)
        cg = await resolve(req)

        async def run(batch: list[Any]) -> list[str]:
            def compute() -> list[str]:
                try:
                    return state.predict(req.predictor, predictor, cg, batch)
                except (ArithmeticError, ValueError) as exc:
                    raise Unprocessable(f"cannot predict for this graph: {exc}") from None

            state.metrics.add("predictor_calls")
            return await state.in_worker(compute)

        key = (req.predictor, graph_id(cg))
        try:
            results = await asyncio.wait_for(
                state.batcher.submit(key, configs, run), limits.request_timeout_s
            )
        except TimeoutError:
            raise ServiceBusy(
                f"the request did not finish within {limits.request_timeout_s:g} s"
            ) from None
        state.metrics.add("predictions", len(results))
        # Assembled from each prediction's JSON, serialised once when it was computed:
        # encoding (or validating through pydantic) thousands of records per request on the
        # event loop was the largest cost of a cached answer.
        head = json.dumps({"graph_id": graph_id(cg), "predictor": req.predictor})[:-1]
        body = f'{head}, "predictions": [{", ".join(results)}]}}'
        return Response(body, media_type="application/json")

    @app.post("/v1/plan", response_model=schemas.PlanResponse, dependencies=auth)
    async def plan(req: schemas.PlanRequest) -> Any:
        try:
            from aiop.mpopt.planner import plan as run_plan
        except ImportError:
            raise ServiceError("the planner is not available in this build", status=501) from None
        predictor = state.predictor(req.predictor)
        cg = await resolve(req)

        def run() -> dict[str, Any]:
            result = run_plan(
                cg,
                req.budget_mb,
                predictor,
                time_budget_s=req.time_budget_s,
                top_k=req.top_k,
                margin=req.margin,
                batch_size=req.batch_size,
                device=req.device,
            )
            return result.to_dict()

        result = await state.in_worker(run)
        state.metrics.add("plans")
        payload = {"graph_id": graph_id(cg), "predictor": req.predictor, **result}
        return Response(json.dumps(payload, default=str), media_type="application/json")

    # -- information -------------------------------------------------------------------------
    @app.get("/v1/predictors", response_model=schemas.PredictorsResponse, dependencies=auth)
    async def list_predictors() -> Any:
        from aiop.cg import FEATURE_VERSION

        return schemas.PredictorsResponse(
            predictors=[
                schemas.PredictorInfo(
                    name=name,
                    file=Path(file).name,  # not the server's directory layout
                    targets=list(p.targets),
                    feature_version=str(FEATURE_VERSION),
                    error_quantiles=dict(getattr(p, "error_quantiles", {}) or {}),
                )
                for name, (p, file) in state.predictors.items()
            ]
        )

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz() -> Any:
        return schemas.Health(
            status="ok",
            version=__version__,
            uptime_s=round(time.time() - state.started, 3),
            auth=state.keys.enabled,
            limits=limits.public(),
        )

    @app.get(
        "/metrics",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # GraphUpload is only referenced from the hand-written upload body: add it to the schemas.
    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = original_openapi()
            doc.setdefault("components", {}).setdefault("schemas", {})["GraphUpload"] = (
                schemas.GraphUpload.model_json_schema(ref_template="#/components/schemas/{model}")
            )
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _is_graph_id(value: str) -> bool:
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def _parse_shape(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        dims = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise Unprocessable(
            f"input_shape must be integers like 1,3,224,224, not {text[:40]!r}"
        ) from None
    if not 1 <= len(dims) <= 8 or any(d < 1 or d > 65536 for d in dims):
        raise Unprocessable("input_shape must be 1 to 8 integers in [1, 65536]")
    return dims


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_validation_errors(exc.errors())
        return error_response(422, _validation_message(errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        # CGError, MConfigError, PredictorError, CacheError, PlanError: bad input, one line.
        text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        return error_response(422, text)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the log")
