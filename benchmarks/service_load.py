"""Load on the HTTP service: concurrent clients on loopback, predictions per second end to end.

    .venv/bin/python benchmarks/service_load.py [--clients 16] [--duration 30] [--batch 64]
        [--model zoo:mobilenet_v2] [--workers 4] [--url http://HOST:PORT --api-key KEY]

Starts ``aiop serve`` in a subprocess on a free loopback port (or uses
``--url``), stores the graph once, then runs ``--clients`` concurrent clients
(asyncio + httpx, one connection each) for ``--duration`` seconds, each
posting ``/v1/predict`` with ``--batch`` random configurations per request.
Counts configuration predictions answered per second, request latency
(p50/p90/p99/max) and errors; writes ``benchmarks/results/service_load.json``
and ``.md``. Targets (issue 8): ≥ 2,000 predictions/s, p99 < 250 ms, zero
errors. Client and server share the machine: the conditions (CPU count, load
average) are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from aiop.service.client import wait_until_healthy
from aiop.service.errors import RemoteUnavailable

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by a test
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_specs(rng: random.Random, n: int) -> list[str]:
    """``n`` random SPECs across the m-config space (batch, accumulation, freezing, ...)."""
    out = []
    for _ in range(n):
        bs = rng.choice([8, 16, 32, 64, 128])
        mb = rng.choice([m for m in (1, 2, 4, 8, 16, 32, 64, 128) if m <= bs])
        out.append(
            f"bs={bs},mb={mb},freeze={rng.choice([0, 0.25, 0.5, 0.75])},"
            f"ckpt={rng.choice([0, 1, 2])},method={rng.choice(['full', 'bias', 'lite+bias'])},"
            f"prec={rng.choice(['fp32', 'bf16'])},opt={rng.choice(['sgd', 'adam'])}"
        )
    return out


def start_server(
    store: Path, workers: int, cache: int, timeout: float = 180.0
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "aiop.cli", "serve", "--port", str(port), "--store", str(store)]
    cmd += ["--workers", str(workers), "--prediction-cache", str(cache)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout)
    except RemoteUnavailable as exc:
        proc.kill()
        raise SystemExit(str(exc)) from None
    return proc, url


async def client_loop(
    url: str,
    headers: dict[str, str],
    graph_id: str,
    batch: int,
    stop_at: float,
    seed: int,
    latencies: list[float],
    counts: dict[str, int],
    errors: list[str],
    pool_size: int = 0,
) -> None:
    rng = random.Random(seed)
    pool = random_specs(random.Random(12345), pool_size) if pool_size else None
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        while time.perf_counter() < stop_at:
            specs = rng.sample(pool, batch) if pool else random_specs(rng, batch)
            body = {"graph_id": graph_id, "configs": specs}
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json=body)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == batch
                if not ok:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                errors.append(f"{type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - t0
            if ok:
                latencies.append(elapsed)
                counts["predictions"] += batch
            counts["requests"] += 1


async def run_load(
    url: str,
    headers: dict[str, str],
    graph_id: str,
    clients: int,
    duration: float,
    batch: int,
    pool_size: int = 0,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"requests": 0, "predictions": 0}
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.gather(
        *(
            client_loop(
                url, headers, graph_id, batch, stop_at, k, latencies, counts, errors, pool_size
            )
            for k in range(clients)
        )
    )
    wall = time.perf_counter() - start
    lat = sorted(latencies)

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {
        "wall_s": round(wall, 3),
        "requests": counts["requests"],
        "predictions": counts["predictions"],
        "predictions_per_s": round(counts["predictions"] / wall, 1),
        "requests_per_s": round(counts["requests"] / wall, 2),
        "latency_ms": {
            "p50": q(0.50),
            "p90": q(0.90),
            "p99": q(0.99),
            "max": round(lat[-1] * 1000, 2) if lat else None,
            "mean": round(statistics.fmean(lat) * 1000, 2) if lat else None,
        },
        "errors": len(errors),
        "first_errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=64, help="configs per request")
    parser.add_argument("--model", default="zoo:mobilenet_v2")
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        help="draw configs from a fixed pool of this many SPECs (0: fresh random ones, "
        "mostly unseen); a small pool measures the service layer on cached predictions",
    )
    parser.add_argument("--workers", type=int, default=4, help="server threads for predictions")
    parser.add_argument(
        "--server-cache",
        type=int,
        default=50_000,
        help="the started server's prediction cache (0: every config computed)",
    )
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("AIOP_API_KEY"))
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load not counted")
    parser.add_argument("--out", default=str(RESULTS / "service_load.json"))
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    tmp = tempfile.TemporaryDirectory()
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(Path(tmp.name) / "store.db", args.workers, args.server_cache)
        t0 = time.perf_counter()
        info = httpx.post(
            url + "/v1/graphs", json={"model": args.model}, headers=headers, timeout=300
        )
        info.raise_for_status()
        graph = info.json()
        took = time.perf_counter() - t0
        print(f"graph {graph['graph_id']} ({graph['nodes']} nodes) stored in {took:.1f} s")
        if args.warmup > 0:
            asyncio.run(
                run_load(
                    url,
                    headers,
                    graph["graph_id"],
                    args.clients,
                    args.warmup,
                    args.batch,
                    args.pool,
                )
            )
        load_before = os.getloadavg()
        result = asyncio.run(
            run_load(
                url, headers, graph["graph_id"], args.clients, args.duration, args.batch, args.pool
            )
        )
        load_after = os.getloadavg()
        metrics = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        tmp.cleanup()
    server_5xx = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("aiop_http_requests_total") and 'status="5' in line
    )

    def counter(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(f"aiop_{name}_total ")
        )

    cache_hits = counter("prediction_cache_hits")
    predictor_calls = counter("predictor_calls")
    record = {
        "command": "python benchmarks/service_load.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "graph_nodes": graph["nodes"],
        "clients": args.clients,
        "duration_s": args.duration,
        "batch": args.batch,
        "config_pool": args.pool,
        "server_workers": args.workers,
        "server_prediction_cache": None if args.url else args.server_cache,
        "cache_hits": cache_hits,
        "predictor_calls": predictor_calls,
        "note_counters": "server counters include the warm-up",
        **result,
        "server_5xx": server_5xx,
        "targets": {
            "predictions_per_s>=2000": result["predictions_per_s"] >= 2000,
            "p99_ms<250": (result["latency_ms"]["p99"] or 1e9) < 250,
            "zero_errors": result["errors"] == 0,
        },
        "conditions": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "note": "client and server on one machine, loopback",
        },
    }
    out = Path(args.out)  # OUT.json, and OUT.md beside it
    lat = result["latency_ms"]
    md = [
        "# Service load (`benchmarks/service_load.py`)",
        "",
        f"`{record['command']}`: {args.clients} clients, {args.duration:g} s, {args.batch} configs "
        f"per request, {args.model} ({graph['nodes']} nodes), {args.workers} server workers, "
        f"prediction cache {record['server_prediction_cache']} ({cache_hits:.0f} hits; "
        f"{predictor_calls:.0f} predictor calls for the batched requests; warm-up included), "
        f"config pool {args.pool or 'none (fresh random configs)'}, "
        f"{os.cpu_count()} CPUs (load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after).",
        "",
        "| predictions/s | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | 5xx |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['predictions_per_s']:,.0f} | {result['requests_per_s']:.1f} | {lat['p50']} | "
        f"{lat['p90']} | {lat['p99']} | {lat['max']} | {result['errors']} | {server_5xx:g} |",
        "",
        "Targets: ≥ 2,000 predictions/s, p99 < 250 ms, zero errors: "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in record["targets"].items()),
        "",
    ]
    write_results(out.parent, out.with_suffix("").name, record, "\n".join(md))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
