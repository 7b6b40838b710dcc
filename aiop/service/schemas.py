"""Pydantic schemas of the HTTP API (request and response bodies).

These models are the contract: FastAPI validates requests against them and
builds the OpenAPI document (``docs/openapi.json``) from them. Field limits
that depend on the server's configuration (maximum configs per request, upload
size) are enforced by the app, not here, so the document does not change with
a server's settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Graph ids are CG fingerprints: 16 lowercase hex digits.
GRAPH_ID_PATTERN = r"^[0-9a-f]{16}$"
# zoo:NAME or family:FAMILY:SEED; names only (never a server path).
MODEL_NAME_PATTERN = r"^(zoo:[A-Za-z0-9_.-]{1,64}|family:[A-Za-z0-9_.-]{1,64}:[0-9]{1,9})$"


class _Strict(BaseModel):
    # Unknown fields are an error: a typo ("config" for "configs") must not pass silently.
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a one-line message and optional structured detail."""

    error: str = Field(description="one-line, human-readable reason")
    detail: Any = Field(default=None, description="structured detail (e.g. validation errors)")


class GraphRef(_Strict):
    """Which graph a request is about: a stored graph id or a model name."""

    graph_id: str | None = Field(
        default=None, pattern=GRAPH_ID_PATTERN, description="fingerprint from POST /v1/graphs"
    )
    model: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="zoo:NAME or family:FAMILY:SEED (built and stored on first use)",
        examples=["zoo:mobilenet_v2", "family:ofa_mbv3:7"],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> GraphRef:
        if (self.graph_id is None) == (self.model is None):
            raise ValueError("give exactly one of graph_id or model")
        return self


class GraphUpload(_Strict):
    """JSON body of ``POST /v1/graphs``: a model name, or a CG in aiop's JSON form."""

    model: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="zoo:NAME or family:FAMILY:SEED",
        examples=["zoo:resnet18"],
    )
    graph: dict[str, Any] | None = Field(
        default=None, description="a computational graph as written by ComputeGraph.to_dict()"
    )
    input_shape: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="N,C,H,W for a model name (default: the model's own input at batch 1)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> GraphUpload:
        if (self.model is None) == (self.graph is None):
            raise ValueError("give exactly one of model or graph")
        if self.input_shape is not None and any(d < 1 or d > 65536 for d in self.input_shape):
            raise ValueError("input_shape dimensions must be in [1, 65536]")
        return self


class GraphInfo(BaseModel):
    """A stored graph."""

    graph_id: str = Field(description="the CG fingerprint")
    name: str
    source: str
    nodes: int
    edges: int
    params: int
    flops: int
    created: bool = Field(default=False, description="true when this request stored it")


class PredictRequest(GraphRef):
    """``POST /v1/predict``: one graph, many m-configurations."""

    configs: list[str] = Field(
        min_length=1,
        description="SPEC strings, e.g. bs=32,mb=8,freeze=0.5,ckpt=2,method=lite+bias",
        examples=[["bs=64,mb=16", "bs=64,freeze=0.5,ckpt=2"]],
    )
    predictor: str = Field(default="default", max_length=64, description="see GET /v1/predictors")


class Breakdown(BaseModel):
    """Bytes of the analytic estimate's parts at its peak."""

    model_config = ConfigDict(extra="allow")
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporary: int = 0
    inputs: int = 0


class Prediction(BaseModel):
    """What the predictor says about one configuration."""

    config: str = Field(description="canonical SPEC")
    peak_memory_bytes: int
    peak_memory_bytes_analytic: int
    breakdown: Breakdown
    latency_s: float | None = None
    flops: int = Field(description="forward FLOPs per sample (2 × MACs)")
    params: int
    trainable_params: int
    flops_predicted: float | None = None
    accuracy: dict[str, float] | None = None


class PredictResponse(BaseModel):
    graph_id: str
    predictor: str
    predictions: list[Prediction]


class PlanRequest(GraphRef):
    """``POST /v1/plan``: the best configurations under a memory budget."""

    budget_mb: float = Field(gt=0, le=1e9, description="memory budget in MiB")
    top_k: int = Field(default=10, ge=1, le=1000)
    time_budget_s: float | None = Field(default=None, gt=0, le=3600)
    margin: float | None = Field(default=None, ge=0, lt=1, description="safety margin (fraction)")
    batch_size: int | None = Field(default=None, ge=1, le=65536)
    predictor: str = Field(default="default", max_length=64)
    # built-in devices only: a server never reads a device file a client names
    device: Literal["cpu", "cuda", "edge"] | None = Field(
        default=None, description="the device planned for (aiop.mpopt.device); default: none"
    )


class PlanResponse(BaseModel):
    """The planner's result (``PlanResult.to_dict()``) with the graph it was made for."""

    model_config = ConfigDict(extra="allow")
    graph_id: str
    predictor: str
    budget_mb: float
    chosen: dict[str, Any] | None = None
    ranked: list[dict[str, Any]] = Field(default_factory=list)
    explanation: str = ""


class PredictorInfo(BaseModel):
    name: str
    file: str
    targets: list[str]
    feature_version: str
    error_quantiles: dict[str, dict[str, float]] = Field(default_factory=dict)


class Limits(BaseModel):
    """The server's limits (also in ``GET /healthz``, so clients can batch to fit)."""

    max_upload_bytes: int
    max_json_bytes: int
    max_configs: int
    max_graph_nodes: int
    max_tensor_elements: int
    max_const_elements: int
    max_batch_size: int
    request_timeout_s: float
    body_timeout_s: float


class PredictorsResponse(BaseModel):
    predictors: list[PredictorInfo]


class Health(BaseModel):
    status: str
    version: str
    uptime_s: float
    auth: bool
    limits: Limits
