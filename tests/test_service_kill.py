"""A real ``aiop serve`` process: killed with SIGKILL during uploads, the store stays whole.

Also streams a 1 GiB body at the real server (uvicorn) to show the size limit
stops it early and the server keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from aiop.cache import Store
from aiop.cg import from_torch
from aiop.models.examples import SmallCNN
from aiop.service.client import wait_until_healthy
from aiop.service.errors import RemoteUnavailable

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "aiop.cli", "serve", "--port", str(port), "--store", str(store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AIOP_API_KEYS", None)
    proc = subprocess.Popen([*cmd, *extra], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout=120)
    except RemoteUnavailable as exc:
        proc.kill()
        raise AssertionError(str(exc)) from None
    return proc, url


def variants(n: int) -> list[dict]:
    """``n`` distinct graphs (different input batch → different fingerprint), as CG JSON."""
    base = from_torch(SmallCNN(), (1, 1, 28, 28)).to_dict()
    out = []
    for k in range(n):
        g = {**base, "inputs": [{**base["inputs"][0], "shape": [k + 1, 1, 28, 28]}]}
        g.pop("fingerprint")
        out.append(g)
    return out


def test_kill_during_uploads_leaves_no_half_written_graph(tmp_path):
    store = tmp_path / "store.db"
    graphs = variants(400)
    proc, url = start_server(store)
    acked: dict[str, int] = {}
    failures: list[str] = []
    stop = threading.Event()

    def uploader(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            for k in range(offset, len(graphs), 4):
                if stop.is_set():
                    return
                try:
                    r = client.post("/v1/graphs", json={"graph": graphs[k]})
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    return
                assert r.status_code == 200, r.text
                acked[r.json()["graph_id"]] = k

    threads = [threading.Thread(target=uploader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(acked) < 40 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: uploads are in flight
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 40, f"only {len(acked)} uploads acknowledged before the kill"
    assert len(acked) < len(graphs), "the kill came after every upload finished"

    # The store after the crash: sound, every acknowledged graph present and whole.
    with Store(store) as s:
        assert s.integrity_check() == "ok"
        stored = [info.fingerprint for info in s.graphs()]
        assert set(acked) <= set(stored)
        for fp in stored:
            assert s.get_graph(fp).fingerprint == fp  # content hash matches its id

    proc, url = start_server(store, "--max-upload-mb", "8")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for fp in stored:
                r = client.get(f"/v1/graphs/{fp}")
                assert r.status_code == 200 and r.json()["graph_id"] == fp
            for fp in list(acked)[:5]:
                r = client.post("/v1/predict", json={"graph_id": fp, "configs": ["bs=8,mb=4"]})
                assert r.status_code == 200, r.text
            # uploads go on where they stopped
            r = client.post("/v1/graphs", json={"graph": graphs[-1]})
            assert r.status_code == 200
        _one_gigabyte_against_real_server(url)
    finally:
        proc.terminate()
        proc.wait(30)


def _one_gigabyte_against_real_server(url: str) -> None:
    """Stream 1 GiB (chunked, generated on the fly) to ``/v1/graphs``: 413 long before the end."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"\0" * (1 << 20)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/graphs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < (1 << 30):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what we want
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    assert sent < (64 << 20), f"the server read {sent:,} bytes past its 8 MiB limit"
    if answer:  # the 413 may be lost when the reset overtakes it; the server must still serve
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
