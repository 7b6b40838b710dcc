"""Prometheus metrics in the text exposition format (version 0.0.4), without a dependency.

Counters and a latency histogram per ``(method, route, status)``; labels use
the route *template* (``/v1/graphs/{graph_id}``), never the raw path, so a
client cannot grow the label set without bound.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field

# Seconds; chosen around the service's targets (p99 < 250 ms for predictions).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.n += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"


class Metrics:
    """Thread-safe registry of the service's metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._counters: dict[str, int] = {
            "predictions": 0,
            "graphs_uploaded": 0,
            "graphs_created": 0,
            "plans": 0,
            "predictor_calls": 0,
            "prediction_cache_hits": 0,
        }
        self.in_flight = 0
        self.started = time.time()

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            key = (method, route, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault((method, route), _Histogram()).observe(seconds)
            if status >= 400:
                ekey = (route, str(status))
                self._errors[ekey] = self._errors.get(ekey, 0) + 1

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + value

    def render(self) -> str:
        """The exposition text."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP aiop_http_requests_total HTTP requests by method, route and status.",
                "# TYPE aiop_http_requests_total counter",
            ]
            for (m, r, s), n in sorted(self._requests.items()):
                out.append(f"aiop_http_requests_total{_labels(method=m, route=r, status=s)} {n}")
            out += [
                "# HELP aiop_http_errors_total HTTP answers with status >= 400.",
                "# TYPE aiop_http_errors_total counter",
            ]
            for (r, s), n in sorted(self._errors.items()):
                out.append(f"aiop_http_errors_total{_labels(route=r, status=s)} {n}")
            out += [
                "# HELP aiop_http_request_duration_seconds Time from request to response.",
                "# TYPE aiop_http_request_duration_seconds histogram",
            ]
            for (m, r), h in sorted(self._latency.items()):
                cumulative = 0
                for bound, count in zip((*BUCKETS, float("inf")), h.counts):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lab = _labels(method=m, route=r, le=le)
                    out.append(f"aiop_http_request_duration_seconds_bucket{lab} {cumulative}")
                lab = _labels(method=m, route=r)
                out.append(f"aiop_http_request_duration_seconds_sum{lab} {h.total:.6f}")
                out.append(f"aiop_http_request_duration_seconds_count{lab} {h.n}")
            for name, n in sorted(self._counters.items()):
                out += [f"# TYPE aiop_{name}_total counter", f"aiop_{name}_total {n}"]
            out += [
                "# TYPE aiop_http_requests_in_flight gauge",
                f"aiop_http_requests_in_flight {self.in_flight}",
                "# TYPE aiop_uptime_seconds gauge",
                f"aiop_uptime_seconds {time.time() - self.started:.3f}",
            ]
        return "\n".join(out) + "\n"
