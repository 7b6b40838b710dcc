"""The prediction batcher: concurrent requests of one graph share predictor calls."""

from __future__ import annotations

import asyncio

import pytest

from aiop.service.batching import PredictionBatcher


class Bad(ValueError):
    pass


def make_run(calls: list[list[str]], delay: float = 0.02):
    async def run(configs: list[str]) -> list[dict]:
        calls.append(list(configs))
        await asyncio.sleep(delay)  # the predictor "computing"
        if "bad" in configs:
            raise Bad("bad config")
        if "boom" in configs:
            raise RuntimeError("server trouble")
        return [{"config": c} for c in configs]

    return run


def test_concurrent_requests_are_coalesced_and_answered_in_order():
    calls: list[list[str]] = []
    batcher = PredictionBatcher(max_batch=100)

    async def main():
        run = make_run(calls)
        jobs = [[f"j{k}c{i}" for i in range(3)] for k in range(10)]
        first = asyncio.ensure_future(batcher.submit(("p", "g"), jobs[0], run))
        await asyncio.sleep(0.005)  # its call is running now
        rest = [batcher.submit(("p", "g"), j, run) for j in jobs[1:]]
        return jobs, await asyncio.gather(first, *rest)

    jobs, results = asyncio.run(main())
    for job, result in zip(jobs, results):
        assert [r["config"] for r in result] == job
    # the first request starts at once; the nine that queued meanwhile share the second call
    assert [len(c) for c in calls] == [3, 27]
    assert batcher.calls == 2 and batcher.jobs == 10


def test_max_batch_and_separate_keys():
    calls: list[list[str]] = []
    batcher = PredictionBatcher(max_batch=5)

    async def main():
        run = make_run(calls)
        same = [batcher.submit(("p", "g"), [f"a{k}", f"b{k}"], run) for k in range(6)]
        other = [batcher.submit(("p", "h"), ["x"], run)]
        return await asyncio.gather(*same, *other)

    results = asyncio.run(main())
    assert results[-1] == [{"config": "x"}]
    assert all(len(c) <= 5 for c in calls)  # never over max_batch (4 configs: 2 jobs of 2)
    assert sum(len(c) for c in calls) == 13


def test_a_bad_request_fails_alone():
    calls: list[list[str]] = []
    batcher = PredictionBatcher(max_batch=100, retry_alone=(Bad,))

    async def main():
        run = make_run(calls)
        return await asyncio.gather(
            batcher.submit(("p", "g"), ["a"], run),
            batcher.submit(("p", "g"), ["bad"], run),
            batcher.submit(("p", "g"), ["c"], run),
            return_exceptions=True,
        )

    a, bad, c = asyncio.run(main())
    assert a == [{"config": "a"}] and c == [{"config": "c"}]
    assert isinstance(bad, Bad)
    # submitted in one go, they share a call; it fails, and each runs alone
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_other_errors_fail_the_batch_without_retries():
    calls: list[list[str]] = []
    batcher = PredictionBatcher(max_batch=100, retry_alone=(Bad,))

    async def main():
        run = make_run(calls)
        first = asyncio.ensure_future(batcher.submit(("p", "g"), ["a"], run))
        await asyncio.sleep(0)
        rest = [batcher.submit(("p", "g"), [x], run) for x in ("boom", "c")]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    a, boom, c = asyncio.run(main())
    assert a == [{"config": "a"}]
    assert isinstance(boom, RuntimeError) and isinstance(c, RuntimeError)
    assert calls == [["a"], ["boom", "c"]]


def test_a_client_that_gives_up_does_not_cancel_the_shared_call():
    calls: list[list[str]] = []
    batcher = PredictionBatcher()

    async def main():
        run = make_run(calls, delay=0.1)
        impatient = batcher.submit(("p", "g"), ["a"], run)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(impatient, 0.01)
        return await batcher.submit(("p", "g"), ["b"], run)

    assert asyncio.run(main()) == [{"config": "b"}]
    assert calls == [["a"], ["b"]]
