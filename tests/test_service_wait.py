"""``wait_until_healthy``: a healthy server, a server that dies while starting, a timeout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aiop.service.client import wait_until_healthy
from aiop.service.errors import RemoteUnavailable


class _Health(BaseHTTPRequestHandler):
    """Answers 503 to the first ``/healthz`` calls, then 200 (a server still loading)."""

    calls = 0

    def do_GET(self) -> None:  # http.server calls it by this name
        type(self).calls += 1
        ok = self.path == "/healthz" and type(self).calls > 2
        body = json.dumps({"status": "ok"} if ok else {"status": "starting"}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


def test_waits_through_unhealthy_answers() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert wait_until_healthy(url, timeout=10, interval=0.01) == {"status": "ok"}
        assert _Health.calls == 3
    finally:
        server.shutdown()


def test_dead_process_fails_at_once_with_its_stderr() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('port in use'); sys.exit(3)"],
        stderr=subprocess.PIPE,
    )
    proc.wait(30)
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=r"exited with code 3.*port in use"):
        wait_until_healthy("http://127.0.0.1:9", proc, timeout=60)
    assert time.monotonic() - t0 < 5


def test_timeout_names_the_last_failure() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteUnavailable, match=r"not healthy after 0.3 s \(Connect"):
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout=0.3, interval=0.05)
