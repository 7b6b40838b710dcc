"""Schemathesis against the served OpenAPI document: any generated request, never a 5xx.

Every operation of ``docs/openapi.json`` gets requests generated from its
schemas (valid and invalid ones); each answer must be a non-5xx that conforms
to the documented response schema, and errors must be the JSON error body.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

from schemathesis.specs.openapi.checks import (  # noqa: E402
    ignored_auth,
    positive_data_acceptance,
)

from aiop.cg import from_torch  # noqa: E402
from aiop.cli import load_predictor  # noqa: E402
from aiop.models.examples import SmallCNN  # noqa: E402
from aiop.service.app import ServiceLimits, create_app  # noqa: E402

pytestmark = pytest.mark.slow  # about 30 s: plans and model names are built for real
KEY = "schemathesis-key-01"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    predictors = {"default": (load_predictor(None), "default_predictor.safetensors")}
    store = tmp_path_factory.mktemp("st") / "store.db"
    app = create_app(
        store, predictors=predictors, api_keys=[KEY], limits=ServiceLimits(max_json_bytes=1 << 20)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

        with TestClient(app) as client:  # runs startup; stores one graph to predict on
            cg = from_torch(SmallCNN(), (1, 1, 28, 28))
            r = client.post("/v1/graphs", json={"graph": cg.to_dict()}, headers={"X-API-Key": KEY})
            assert r.status_code == 200
            yield schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [
    ("POST", "/v1/graphs"),
    ("GET", "/v1/graphs/{graph_id}"),
    ("POST", "/v1/predict"),
    ("POST", "/v1/plan"),
    ("GET", "/v1/predictors"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]


def test_document_lists_these_operations(api_schema):
    found = set()
    for result in api_schema.get_all_operations():
        op = result.ok()
        found.add((op.method.upper(), op.path))
    assert found == set(OPERATIONS)


# schemathesis's pytest plugin does not run under pytest 9 ('Function' has no '_nodeid'):
# its Hypothesis strategies are driven directly instead.
@pytest.mark.parametrize("method,path", OPERATIONS)
def test_every_operation_never_5xx(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def check(case):
        response = case.call(headers={"X-API-Key": KEY})
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert isinstance(body.get("error"), str) and body["error"]
        # Every other check of schemathesis runs (response schemas, status codes documented,
        # invalid data rejected, ...). "Schema-valid data accepted" cannot hold for uploads:
        # any bytes match `format: binary`, and random bytes are not a model. "Invalid auth
        # refused" cannot either: every call carries the valid X-API-Key (wrong keys are
        # tested in test_service_abuse.py).
        case.validate_response(response, excluded_checks=[positive_data_acceptance, ignored_auth])

    check()
