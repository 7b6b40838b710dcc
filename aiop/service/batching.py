"""Coalescing concurrent prediction requests for one graph into one predictor call.

The predictor's cost per call is dominated by per-graph work it shares across
the configurations of that call: the analytic step plan per distinct
(freeze, ckpt, method, precision) and one GNN encoding per distinct
(freeze, ckpt, method). Sixteen clients asking 64 configurations each of the
same graph cost far less as one call of 1,024 than as sixteen calls of 64.

So requests queue per ``(predictor, graph)``; while a call for that key runs,
newcomers wait and the next call takes every queued request at once (up to
``max_batch`` configurations). An idle server adds no delay: the first request
starts a call immediately. A call that fails is retried request by request, so
one bad request (say ``ckpt`` beyond the graph's blocks) fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]


@dataclass
class _Job:
    configs: list[Any]
    future: asyncio.Future[list[Any]]


@dataclass
class _Queue:
    jobs: list[_Job] = field(default_factory=list)
    running: bool = False


class PredictionBatcher:
    """Per-key queues of prediction jobs, drained by one running call per key."""

    def __init__(
        self, max_batch: int = 4096, retry_alone: tuple[type[BaseException], ...] = (ValueError,)
    ) -> None:
        self.max_batch = max(1, max_batch)
        # errors that may belong to one job's input: the jobs of a failed call then run alone
        self.retry_alone = retry_alone
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run
        self.calls = 0  # predictor calls made (for metrics and tests)
        self.jobs = 0  # requests served

    async def submit(self, key: tuple[str, str], configs: list[Any], run: RunBatch) -> list[Any]:
        """Predictions for ``configs``, computed together with other requests of ``key``.

        ``run(configs)`` computes a batch (in a worker thread); it is called with
        the concatenated configurations of the jobs it serves.
        """
        loop = asyncio.get_running_loop()
        job = _Job(list(configs), loop.create_future())
        queue = self._queues.setdefault(key, _Queue())
        queue.jobs.append(job)
        if not queue.running:
            queue.running = True
            self._start(self._drain(key, queue, run))
        # shield: a client that gives up (timeout) must not cancel the shared call
        return await asyncio.shield(job.future)

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, queue: _Queue) -> list[_Job]:
        taken, total = [], 0
        while queue.jobs and (not taken or total + len(queue.jobs[0].configs) <= self.max_batch):
            job = queue.jobs.pop(0)
            taken.append(job)
            total += len(job.configs)
        return taken

    async def _drain(self, key: tuple[str, str], queue: _Queue, run: RunBatch) -> None:
        try:
            while queue.jobs:
                jobs = self._take(queue)
                await self._run_jobs(jobs, run)
        finally:
            queue.running = False
            if not queue.jobs:
                self._queues.pop(key, None)
            else:  # a job arrived between the last take and now
                queue.running = True
                self._start(self._drain(key, queue, run))

    async def _run_jobs(self, jobs: list[_Job], run: RunBatch) -> None:
        configs = [c for job in jobs for c in job.configs]
        self.calls += 1
        try:
            results = await run(configs)
        except Exception as exc:
            if len(jobs) == 1 or not isinstance(exc, self.retry_alone):
                for job in jobs:
                    _settle(job.future, error=exc)
                return
            log.debug("batched call of %d jobs failed (%s): retrying one by one", len(jobs), exc)
            for job in jobs:
                await self._run_jobs([job], run)
            return
        start = 0
        for job in jobs:
            _settle(job.future, result=results[start : start + len(job.configs)])
            start += len(job.configs)
        self.jobs += len(jobs)


def _settle(
    future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None
) -> None:
    if future.done():  # the waiter is gone (cancelled): nothing to deliver
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
