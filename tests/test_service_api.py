"""The HTTP service: endpoints, auth, metrics, the OpenAPI document and the client."""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest

from aiop.cg import from_torch
from aiop.cli import load_predictor
from aiop.models.examples import SmallCNN
from aiop.service.app import KeyChecker, ServiceLimits, create_app, read_api_keys
from aiop.service.client import RemotePredictor
from aiop.service.errors import RemoteError, RemoteUnavailable

with warnings.catch_warnings():  # starlette's notice about httpx2, not about our code
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def predictors():
    return {"default": (load_predictor(None), "default_predictor.safetensors")}


@pytest.fixture(scope="module")
def small_cg():
    return from_torch(SmallCNN(), (1, 1, 28, 28), name="small_cnn")


@pytest.fixture()
def client(tmp_path, predictors):
    app = create_app(tmp_path / "store.db", predictors=predictors)
    with TestClient(app) as c:
        yield c


def test_upload_onnx_then_predict_matches_local(client, predictors, small_cg):
    import torch

    from aiop.cg import export_onnx_bytes

    onnx_bytes = export_onnx_bytes(SmallCNN(), (torch.randn(1, 1, 28, 28),))
    r = client.post(
        "/v1/graphs?name=my_cnn",
        content=onnx_bytes,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["created"] is True and info["name"] == "my_cnn"
    assert info["graph_id"] == small_cg.fingerprint  # same architecture, same id
    again = client.post(
        "/v1/graphs", content=onnx_bytes, headers={"content-type": "application/octet-stream"}
    )
    assert again.json()["created"] is False

    specs = ["bs=8", "bs=16,mb=4,freeze=0.5", "bs=32,ckpt=1,method=lite+bias,opt=adam"]
    r = client.post("/v1/predict", json={"graph_id": info["graph_id"], "configs": specs})
    assert r.status_code == 200, r.text
    body = r.json()
    local = predictors["default"][0].predict(small_cg, specs)
    assert [p["config"] for p in body["predictions"]] == [p["config"] for p in local]
    for remote, mine in zip(body["predictions"], local):
        assert remote["peak_memory_bytes"] == mine["peak_memory_bytes"]
        assert remote["breakdown"] == mine["breakdown"]
        assert remote["flops"] == mine["flops"] > 0


def test_model_names_and_graph_json(client, small_cg):
    r = client.post("/v1/predict", json={"model": "family:ofa_mbv3:3", "configs": ["bs=8"]})
    assert r.status_code == 200, r.text
    fp = r.json()["graph_id"]
    assert client.get(f"/v1/graphs/{fp}").json()["name"] == "family:ofa_mbv3:3"
    # a second request by name reuses the stored graph (no new export)
    r2 = client.post("/v1/graphs", json={"model": "family:ofa_mbv3:3"})
    assert r2.json() == {**r2.json(), "graph_id": fp, "created": False}

    r = client.post("/v1/graphs", json={"graph": small_cg.to_dict()})
    assert r.status_code == 200 and r.json()["graph_id"] == small_cg.fingerprint
    bare = client.post("/v1/graphs?name=bare", json=small_cg.to_dict())  # no {"graph": ...}
    assert bare.status_code == 200 and bare.json()["graph_id"] == small_cg.fingerprint
    raw = client.post(
        "/v1/graphs?format=json",
        content=small_cg.to_json().encode(),
        headers={"content-type": "application/octet-stream"},
    )
    assert raw.status_code == 200 and raw.json()["graph_id"] == small_cg.fingerprint


def test_graphs_persist_across_restarts(tmp_path, predictors, small_cg):
    with TestClient(create_app(tmp_path / "s.db", predictors=predictors)) as c:
        assert c.post("/v1/graphs", json={"graph": small_cg.to_dict()}).status_code == 200
    with TestClient(create_app(tmp_path / "s.db", predictors=predictors)) as c:
        r = c.post("/v1/predict", json={"graph_id": small_cg.fingerprint, "configs": ["bs=4"]})
        assert r.status_code == 200
        assert c.get("/v1/graphs/0000000000000000").status_code == 404


def test_health_predictors_and_metrics(client, small_cg):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["auth"] is False
    assert health["limits"]["max_configs"] == ServiceLimits().max_configs
    preds = client.get("/v1/predictors").json()["predictors"]
    assert preds[0]["name"] == "default" and "memory" in preds[0]["targets"]
    client.post("/v1/graphs", json={"graph": small_cg.to_dict()})
    client.post("/v1/predict", json={"graph_id": small_cg.fingerprint, "configs": ["bs=8"] * 5})
    client.post("/v1/predict", json={"graph_id": small_cg.fingerprint, "configs": ["bs=0"]})
    text = client.get("/metrics").text
    assert 'aiop_http_requests_total{method="POST",route="/v1/predict",status="200"} 1' in text
    assert 'aiop_http_errors_total{route="/v1/predict",status="422"} 1' in text
    assert "aiop_predictions_total 5" in text
    assert 'aiop_http_request_duration_seconds_count{method="POST",route="/v1/predict"} 2' in text


def test_plan_endpoint(client, small_cg):
    pytest.importorskip("aiop.mpopt.planner", reason="the planner (aiop.mpopt) is not built yet")
    client.post("/v1/graphs", json={"graph": small_cg.to_dict()})
    r = client.post(
        "/v1/plan", json={"graph_id": small_cg.fingerprint, "budget_mb": 64, "top_k": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["graph_id"] == small_cg.fingerprint and body["budget_mb"] == 64
    assert 1 <= len(body["ranked"]) <= 3 and body["explanation"]
    for c in body["ranked"]:
        assert c["config"]
    # nothing fits a 0.01 MB budget: the planner's PlanError becomes a 422 with its message
    r = client.post("/v1/plan", json={"graph_id": small_cg.fingerprint, "budget_mb": 0.01})
    assert r.status_code == 422 and "smallest predicted" in r.json()["error"]
    # a built-in device reaches the planner; a device file path is never read by the server
    r = client.post(
        "/v1/plan", json={"graph_id": small_cg.fingerprint, "budget_mb": 64, "device": "edge"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["device"]["name"] == "edge" and r.json()["precision_explanation"]
    r = client.post(
        "/v1/plan",
        json={"graph_id": small_cg.fingerprint, "budget_mb": 64, "device": "/etc/passwd"},
    )
    assert r.status_code == 422


def test_api_keys(tmp_path, predictors, monkeypatch):
    app = create_app(tmp_path / "s.db", predictors=predictors, api_keys=[KEY])
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200  # open, so load balancers can probe
        assert c.get("/healthz").json()["auth"] is True
        for headers in ({}, {"X-API-Key": "wrong-key-000"}, {"Authorization": "Bearer nope"}):
            r = c.get("/v1/predictors", headers=headers)
            assert r.status_code == 401 and r.json()["error"]
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/predictors", headers={"X-API-Key": KEY}).status_code == 200
        assert (
            c.get("/v1/predictors", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        )

    checker = KeyChecker([KEY, "another-key-42"])
    assert checker.check(KEY) and checker.check("another-key-42")
    assert not checker.check(KEY[:-1]) and not checker.check("") and not checker.check(None)
    monkeypatch.setenv("AIOP_API_KEYS", f"{KEY}, second-key-123")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nthird-key-4567\n")
    assert read_api_keys(keys_file) == [KEY, "second-key-123", "third-key-4567"]
    keys_file.write_text("short\n")
    with pytest.raises(ValueError, match="at least 8"):
        read_api_keys(keys_file)


def test_openapi_document_is_checked_in(client):
    served = client.get("/openapi.json").json()
    on_disk = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == on_disk, (
        "regenerate: .venv/bin/python -m aiop.service.openapi docs/openapi.json"
    )
    assert {
        "/v1/graphs",
        "/v1/predict",
        "/v1/plan",
        "/v1/predictors",
        "/healthz",
        "/metrics",
    } <= set(served["paths"])


# -- the client against a real server on loopback -------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def live_url(tmp_path, predictors):
    import uvicorn

    app = create_app(tmp_path / "live.db", predictors=predictors, api_keys=[KEY])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_remote_predictor_matches_local(live_url, predictors, small_cg):
    specs = [f"bs={b},mb={m}" for b in (8, 16, 32) for m in (1, 2, 4, 8)]
    with RemotePredictor(live_url, api_key=KEY, chunk=5) as remote:
        got = remote.predict(small_cg, specs)  # uploads once, then 3 chunks
        assert remote.health()["auth"] is True
        assert remote.predictors()[0]["name"] == "default"
        local_quantiles = predictors["default"][0].error_quantiles
        assert remote.error_quantiles == json.loads(json.dumps(local_quantiles))
        assert "memory" in remote.targets
        with pytest.raises(RemoteError) as info:
            remote.predict(small_cg, ["bs=8,mb=3"])
        assert info.value.status == 422 and "mb=3" in str(info.value)
    local = predictors["default"][0].predict(small_cg, specs)
    assert [g["peak_memory_bytes"] for g in got] == [x["peak_memory_bytes"] for x in local]
    assert [g["config"] for g in got] == [x["config"] for x in local]

    with RemotePredictor(live_url, api_key="wrong-key-000") as bad, pytest.raises(RemoteError) as e:
        bad.predict(small_cg, ["bs=8"])
    assert e.value.status == 401 and "wrong API key" in str(e.value)


def test_client_retries_connection_errors_only():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/v1/predict":
            configs = json.loads(request.content)["configs"]
            return httpx.Response(200, json={"predictions": [{"config": c} for c in configs]})
        return httpx.Response(200, json={"limits": {"max_configs": 2}})

    remote = RemotePredictor(
        "http://aiop.invalid", backoff=0.001, retries=3, transport=httpx.MockTransport(handler)
    )
    assert [p["config"] for p in remote.predict("zoo:resnet18", ["a", "b", "c"])] == ["a", "b", "c"]
    assert calls["n"] == 2 + 1 + 2  # two refused, /healthz, two chunks of max_configs=2

    def http_error(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(404, json={"error": "no predictor named 'x'", "detail": None})

    calls["n"] = 0
    remote = RemotePredictor("http://aiop.invalid", transport=httpx.MockTransport(http_error))
    with pytest.raises(RemoteError, match=r"HTTP 404.*no predictor named"):
        remote.predictors()
    assert calls["n"] == 1  # an HTTP answer is never retried

    start = time.perf_counter()
    dead = RemotePredictor(f"http://127.0.0.1:{_free_port()}", retries=2, backoff=0.05)
    with pytest.raises(RemoteUnavailable, match="after 3 attempts"):
        dead.health()
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff doubled between attempts


def test_serve_refuses_public_host_without_keys(capsys, monkeypatch, tmp_path):
    from aiop.cli import main

    monkeypatch.delenv("AIOP_API_KEYS", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "without API keys" in err
    assert main(["serve", "--api-keys-file", str(tmp_path / "missing")]) == 2
    assert "cannot read API keys file" in capsys.readouterr().err


def test_planner_accepts_the_remote_predictor(live_url, predictors, small_cg):
    planner = pytest.importorskip("aiop.mpopt.planner", reason="aiop.mpopt is not built yet")
    local = planner.plan(small_cg, 64, predictors["default"][0], top_k=3).to_dict()
    planner.clear_cache()
    with RemotePredictor(live_url, api_key=KEY) as remote:
        through_client = planner.plan(small_cg, 64, remote, top_k=3).to_dict()
        on_server = remote.plan(small_cg, 64, top_k=3)
    for result in (through_client, on_server):
        assert result["margin"] == local["margin"]  # same calibration, fetched from the server
        assert [c["config"] for c in result["ranked"]] == [c["config"] for c in local["ranked"]]
    assert on_server["graph_id"] == small_cg.fingerprint


def test_upload_tensorflow_pb(client):
    from tf_fixtures import small_cnn

    data = small_cnn(None).SerializeToString()  # Placeholder without a static shape
    r = client.post(
        "/v1/graphs?format=pb",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and "shape" in r.json()["error"]  # the CG importer's message
    r = client.post(
        "/v1/graphs?format=pb&input_shape=1,3,32,32&name=tf_cnn",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["source"] == "tf" and info["name"] == "tf_cnn" and info["params"] > 0
    r = client.post("/v1/predict", json={"graph_id": info["graph_id"], "configs": ["bs=16,mb=4"]})
    assert r.status_code == 200 and r.json()["predictions"][0]["peak_memory_bytes"] > 0


def test_request_timeout_answers_503(tmp_path, predictors, small_cg):
    class Slow:
        targets = ("memory",)

        def predict(self, cg, configs):
            time.sleep(0.5)
            return predictors["default"][0].predict(cg, configs)

    limits = ServiceLimits(request_timeout_s=0.05)
    app = create_app(tmp_path / "s.db", predictors={"default": (Slow(), "slow")}, limits=limits)
    with TestClient(app) as c:
        c.post("/v1/graphs", json={"graph": small_cg.to_dict()})
        r = c.post("/v1/predict", json={"graph_id": small_cg.fingerprint, "configs": ["bs=8"]})
        assert r.status_code == 503 and "within 0.05 s" in r.json()["error"]
        assert c.get("/healthz").status_code == 200


def test_concurrent_requests_share_predictor_calls(tmp_path, predictors, small_cg):
    import uvicorn

    class Slow:
        targets = ("memory",)
        calls: list[int] = []  # noqa: RUF012 (one instance, written by one call at a time)

        def predict(self, cg, configs):
            self.calls.append(len(configs))
            time.sleep(0.3)  # long enough for the other requests to queue behind this call
            return predictors["default"][0].predict(cg, configs)

    slow = Slow()
    limits = ServiceLimits(prediction_cache_size=0)
    app = create_app(tmp_path / "s.db", predictors={"default": (slow, "slow")}, limits=limits)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        httpx.post(url + "/v1/graphs", json={"graph": small_cg.to_dict()}).raise_for_status()
        answers: dict[int, list] = {}

        def ask(k: int) -> None:
            specs = [f"bs={8 * (k + 1)},mb={m}" for m in (1, 2, 4, 8)]
            body = {"graph_id": small_cg.fingerprint, "configs": specs}
            r = httpx.post(url + "/v1/predict", json=body, timeout=30)
            answers[k] = [p["config"].split(",")[:2] for p in r.json()["predictions"]]

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for k in range(8):  # every request got its own configurations back, in order
            assert answers[k] == [[f"bs={8 * (k + 1)}", f"mb={m}"] for m in (1, 2, 4, 8)]
        assert sum(slow.calls) == 32 and len(slow.calls) <= 3  # not 8 calls
        metrics = httpx.get(url + "/metrics").text
        assert f"aiop_predictor_calls_total {len(slow.calls)}" in metrics
    finally:
        server.should_exit = True
        thread.join(10)
