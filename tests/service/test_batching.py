"""Pure batching logic: the MicroBatcher with an injected batch function (no engine)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.service.batching import MicroBatcher
from app.service.errors import ClientGone, Overloaded, RequestTimedOut


class Recorder:
    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.gate = gate

    def __call__(self, items: list) -> list:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        return [item * 10 for item in items]


def make(fn, **kw) -> MicroBatcher:
    options = {"max_batch_size": 4, "max_wait_ms": 20, "queue_size": 16} | kw
    batcher = MicroBatcher(fn, **options)
    batcher.start()
    return batcher


def test_batch_closes_when_full_before_the_deadline():
    fn = Recorder()
    batcher = make(fn, max_batch_size=4, max_wait_ms=5_000)

    async def main():
        started = time.perf_counter()
        with batcher.incoming():  # another request on its way: the batch stays open
            results = await asyncio.gather(*(batcher.submit_many([i], 10) for i in range(4)))
        return results, time.perf_counter() - started

    try:
        results, elapsed = asyncio.run(main())
    finally:
        batcher.stop()
    assert [r[0].value for r in results] == [0, 10, 20, 30]
    assert [len(b) for b in fn.batches] == [4]
    assert all(r[0].batch_size == 4 for r in results)
    assert elapsed < 2.0  # did not wait for the 5 s deadline


def test_batch_closes_at_the_deadline_from_the_first_item():
    fn = Recorder()
    batcher = make(fn, max_batch_size=64, max_wait_ms=100)

    async def main():
        started = time.perf_counter()
        with batcher.incoming():  # another request on its way: the batch stays open
            results = await asyncio.gather(*(batcher.submit_many([i], 10) for i in range(3)))
        return results, time.perf_counter() - started

    try:
        results, elapsed = asyncio.run(main())
    finally:
        batcher.stop()
    assert [len(b) for b in fn.batches] == [3]
    assert 0.09 <= elapsed < 2.0
    assert all(r[0].queued_s >= 0.05 for r in results)


def test_a_lone_request_does_not_wait_for_the_deadline():
    fn = Recorder()
    batcher = make(fn, max_batch_size=8, max_wait_ms=2_000)

    async def main():
        started = time.perf_counter()
        with batcher.incoming() as mark:
            result = await batcher.submit_many([7], 10, incoming=mark)
        first = time.perf_counter() - started
        started = time.perf_counter()
        again = await batcher.submit_many([8], 10)  # no mark at all
        return result, first, again, time.perf_counter() - started

    try:
        result, first, again, second = asyncio.run(main())
    finally:
        batcher.stop()
    assert result[0].value == 70 and again[0].value == 80
    assert fn.batches == [[7], [8]]
    assert batcher.preparing == 0
    assert first < 0.5 and second < 0.5  # nothing else on its way: closed at once, not at 2 s


def test_a_request_being_prepared_keeps_the_batch_open():
    fn = Recorder()
    batcher = make(fn, max_batch_size=8, max_wait_ms=2_000)

    async def late(mark):
        await asyncio.sleep(0.1)  # "decoding"
        return await batcher.submit_many([2], 10, incoming=mark)

    async def main():
        started = time.perf_counter()
        with batcher.incoming() as mark:
            second = asyncio.ensure_future(late(mark))
            first = await batcher.submit_many([1], 10)
            results = first, await second
        return results, time.perf_counter() - started

    try:
        (first, second), elapsed = asyncio.run(main())
    finally:
        batcher.stop()
    assert fn.batches == [[1, 2]]
    assert first[0].batch_size == 2 and second[0].value == 20
    assert first[0].queued_s >= 0.05  # item 1 waited for item 2
    assert elapsed < 1.5  # closed once nothing more was on its way, not at 2 s


def test_a_mark_released_without_submitting_wakes_the_worker():
    fn = Recorder()
    batcher = make(fn, max_batch_size=8, max_wait_ms=2_000)

    async def main():
        started = time.perf_counter()
        with batcher.incoming():  # e.g. a request whose image fails to decode
            pending = asyncio.ensure_future(batcher.submit_many([1], 10))
            await asyncio.sleep(0.1)
            assert not pending.done()
            assert batcher.preparing == 1
        result = await pending
        return result, time.perf_counter() - started

    try:
        result, elapsed = asyncio.run(main())
    finally:
        batcher.stop()
    assert result[0].value == 10
    assert batcher.preparing == 0
    assert elapsed < 1.5


def test_overloaded_request_releases_its_mark():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = make(fn, max_batch_size=1, max_wait_ms=0, queue_size=1)

    async def main():
        first = asyncio.ensure_future(batcher.submit_many([1], 10))
        await asyncio.sleep(0.1)  # the worker holds item 1 (blocked on the gate)
        with pytest.raises(Overloaded), batcher.incoming() as mark:
            await batcher.submit_many([2, 3], 10, incoming=mark)
        gate.set()
        return await first

    try:
        first = asyncio.run(main())
    finally:
        gate.set()
        batcher.stop()
    assert first[0].value == 10
    assert batcher.preparing == 0


def test_batch_size_is_capped():
    fn = Recorder()
    batcher = make(fn, max_batch_size=3, max_wait_ms=50)

    async def main():
        return await batcher.submit_many(list(range(7)), 10)

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert [r.value for r in results] == [i * 10 for i in range(7)]
    assert [len(b) for b in fn.batches] == [3, 3, 1]


def test_a_failing_item_fails_only_its_request():
    def fn(items):
        return [ValueError(f"bad {i}") if i == 2 else i for i in items]

    batcher = make(fn, max_batch_size=8, max_wait_ms=50)

    async def main():
        return await asyncio.gather(*(batcher.submit_many([i], 10) for i in range(4)),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert isinstance(results[2], ValueError)
    assert [r[0].value for i, r in enumerate(results) if i != 2] == [0, 1, 3]


def test_wrong_result_count_fails_the_batch_and_the_worker_survives():
    calls = []

    def fn(items):
        calls.append(len(items))
        return [] if len(calls) == 1 else items

    batcher = make(fn, max_batch_size=2, max_wait_ms=10)

    async def main():
        with pytest.raises(RuntimeError, match="returned 0 results"):
            await batcher.submit_many([1, 2], 10)
        return await batcher.submit_many([5], 10)

    try:
        again = asyncio.run(main())
    finally:
        batcher.stop()
    assert again[0].value == 5


def test_full_queue_answers_overloaded_at_once_without_queueing():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = make(fn, max_batch_size=1, max_wait_ms=0, queue_size=2)

    async def main():
        first = asyncio.ensure_future(batcher.submit_many([1], 10))
        await asyncio.sleep(0.1)  # the worker holds item 1 (blocked on the gate)
        queued = asyncio.ensure_future(batcher.submit_many([2, 3], 10))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await batcher.submit_many([4], 10)
        refused_in = time.perf_counter() - started
        gate.set()
        return await first, await queued, info.value, refused_in

    try:
        first, queued, error, refused_in = asyncio.run(main())
    finally:
        gate.set()
        batcher.stop()
    assert error.retry_after_s >= 1
    assert refused_in < 0.05
    assert [r.value for r in queued] == [20, 30]
    assert all(4 not in b for b in fn.batches)


def test_requests_whose_client_left_are_dropped_before_compute():
    gate = threading.Event()
    fn = Recorder(gate)
    dropped = []

    class Observer:
        def batch_done(self, size, queued_s, compute_s):
            pass

        def dropped(self, reason, count):
            dropped.append((reason, count))

    batcher = make(fn, max_batch_size=1, max_wait_ms=0, observer=Observer())

    async def gone():  # the client has hung up already
        return None

    async def main():
        first = asyncio.ensure_future(batcher.submit_many([1], 10))
        await asyncio.sleep(0.1)
        with pytest.raises(ClientGone):
            await batcher.submit_many([2], 10, client_gone=gone)
        gate.set()
        await first
        return await batcher.submit_many([3], 10)

    try:
        last = asyncio.run(main())
    finally:
        gate.set()
        batcher.stop()
    assert last[0].value == 30
    assert fn.batches == [[1], [3]]
    assert dropped == [("client_gone", 1)]


def test_timeout_then_late_result_is_ignored():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = make(fn, max_batch_size=1, max_wait_ms=0)

    async def main():
        with pytest.raises(RequestTimedOut):
            await batcher.submit_many([1], 0.1)
        gate.set()
        # The worker finishes item 1 after its caller left; it must not crash.
        return await batcher.submit_many([2], 10)

    try:
        result = asyncio.run(main())
    finally:
        gate.set()
        batcher.stop()
    assert result[0].value == 20


def test_refuses_bad_parameters():
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, max_batch_size=0, max_wait_ms=1, queue_size=1)
