"""Micro-batching: many concurrent requests, one worker thread that owns the device.

Requests are decoded and resized before they get here. `MicroBatcher.submit_many`
puts items on a bounded queue (full -> `Overloaded`, answered 429 at once); the
worker closes a batch when it holds `max_batch_size` items, when `max_wait_ms`
have passed since the batch's first item was queued, or at once when the queue
is empty and no request is still being prepared (see `MicroBatcher.incoming`),
so a lone request does not wait for company that is not coming. It drops items
whose caller has gone, calls the batch function once, and sets each caller's
future only if it is still pending. No torch or faiss work ever runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from app.service.errors import ClientGone, Overloaded, RequestTimedOut

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Returns once the client has disconnected (see routes.predict.client_gone).
ClientGoneWaiter = Callable[[], Awaitable[None]]


def _read_outcome(future: asyncio.Future[Any]) -> None:
    """Reads a finished future's error, so one no one awaits any more (cancelled work, a
    watcher) does not make asyncio log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


async def wait_or_give_up(work: Awaitable[R], timeout_s: float, client_gone: ClientGoneWaiter | None,
                          timeout_message: str) -> R:
    """`work`'s result, unless `timeout_s` passes first (RequestTimedOut) or `client_gone()`
    returns first (ClientGone). Either way out, what is still pending is cancelled: for work
    in an executor that drops it if it has not started."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_read_outcome)
    watcher = asyncio.ensure_future(client_gone()) if client_gone is not None else None
    if watcher is not None:
        watcher.add_done_callback(_read_outcome)
    try:
        waiting: set[asyncio.Future[Any]] = {task} if watcher is None else {task, watcher}
        done, _ = await asyncio.wait(waiting, timeout=max(timeout_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watcher is not None and watcher in done:
            raise ClientGone("the client disconnected before its result was ready")
        raise RequestTimedOut(timeout_message)
    finally:
        for pending in (task, watcher):
            if pending is not None and not pending.done():
                pending.cancel()


@dataclass
class Timed(Generic[R]):
    """A batch function's result for one item, with where the time went."""

    value: R
    queued_s: float
    compute_s: float
    batch_size: int


class BatchObserver(Protocol):
    def batch_done(self, size: int, queued_s: Sequence[float], compute_s: float) -> None: ...

    def dropped(self, reason: str, count: int) -> None: ...


@dataclass(eq=False)
class _Ticket(Generic[T]):
    payload: T
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    # Set from the event loop when the caller stops waiting; read by the worker.
    abandoned: threading.Event = field(default_factory=threading.Event)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():  # the caller timed out or went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set)


_STOP = object()


class Incoming:
    """One request's mark while its payloads are being prepared (see `MicroBatcher.incoming`)."""

    __slots__ = ("held", "images")

    def __init__(self, images: int = 0) -> None:
        self.held = False
        self.images = images  # queue slots reserved for this request


class MicroBatcher(Generic[T, R]):
    """Bounded queue + one worker thread running `batch_fn` on lists of payloads.

    `batch_fn(payloads) -> list` must return one entry per payload; an entry that
    is an exception instance fails only that payload's request.
    """

    def __init__(self, batch_fn: Callable[[list[T]], Sequence[R | BaseException]], *,
                 max_batch_size: int, max_wait_ms: float, queue_size: int,
                 observer: BatchObserver | None = None, name: str = "batch-worker"):
        if max_batch_size < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_ms >= 0")
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._observer = observer
        self._name = name
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Smoothed seconds per batch, for Retry-After.
        self._batch_s_ewma = 0.1
        # Requests admitted but still being prepared. The worker waits on this
        # condition for more items; every put and every release notifies it.
        self._cond = threading.Condition()
        self._incoming = 0
        # Queue slots promised to requests that are still being prepared.
        self._reserved = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        self._thread = None
        # Fail whatever is left so no caller waits for ever.
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(ticket, _Ticket):
                ticket.resolve(error=RuntimeError("the batch worker stopped"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def preparing(self) -> int:
        """Requests inside `incoming()` that have not submitted yet."""
        with self._cond:
            return self._incoming

    # ------------------------------------------------------------------ admission (event loop)
    @contextlib.contextmanager
    def incoming(self, images: int = 0) -> Iterator[Incoming]:
        """Mark one request as on its way while its payloads are prepared.

        With `images`, the request's queue slots are reserved now: when they do not
        fit, Overloaded is raised before any decoding is spent on a request that
        would be refused (and decoded images never pile up waiting for room).

        While any request is marked, the worker keeps an open batch waiting (up
        to `max_wait_ms`) for it; with none marked and the queue empty it closes
        the batch at once. Pass the mark to `submit_many`, which releases it in
        the same step as it queues the payloads; leaving the block releases it
        if that never happened (a failed decode, a cancelled request).
        """
        mark = Incoming(images)
        with self._cond:
            if images and self._queue.qsize() + self._reserved + images > self.queue_size:
                raise Overloaded(f"queue full ({self.queue_size} images waiting); retry later",
                                 retry_after_s=self.retry_after_s())
            self._incoming += 1
            self._reserved += images
            mark.held = True
        try:
            yield mark
        finally:
            with self._cond:
                self._release(mark)

    def _release(self, mark: Incoming | None) -> None:
        """Drop `mark` from the count and wake the worker. Hold `self._cond`."""
        if mark is not None and mark.held:
            mark.held = False
            self._incoming -= 1
            self._reserved -= mark.images
            self._cond.notify_all()

    # ------------------------------------------------------------------ submit (event loop)
    async def submit_many(self, payloads: Sequence[T], timeout_s: float,
                          client_gone: ClientGoneWaiter | None = None, *,
                          incoming: Incoming | None = None) -> list[Timed[R]]:
        """Queue all payloads of one request together and wait for their results.

        `incoming`, the request's mark from `incoming()`, is released together
        with the put, so the worker never sees the request neither marked nor
        queued. Raises Overloaded (without queueing anything) when they do not
        fit, RequestTimedOut after `timeout_s`, ClientGone when `client_gone()` (an
        awaitable that returns once the client has disconnected) returns first. In
        every case the tickets are abandoned, so the worker skips those it has not started.
        """
        if not self.running:
            raise RuntimeError("the batch worker is not running")
        if not payloads:
            with self._cond:
                self._release(incoming)
            return []
        # Only the event loop thread puts, so this check cannot race another put.
        # Slots this request reserved in `incoming()` are already counted as its own.
        own = incoming.images if incoming is not None and incoming.held else 0
        if self._queue.qsize() + (self._reserved - own) + len(payloads) > self.queue_size:
            raise Overloaded(
                f"queue full ({self.queue_size} images waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        tickets = [_Ticket(p, loop, loop.create_future()) for p in payloads]
        # Never blocks for long: the worker holds the lock only between its waits.
        with self._cond:
            for ticket in tickets:
                self._queue.put_nowait(ticket)
            self._release(incoming)
            self._cond.notify_all()
        try:
            # The gather is cancelled on the way out before its tickets are (see wait_or_give_up).
            return await wait_or_give_up(asyncio.gather(*(t.future for t in tickets)), timeout_s, client_gone,
                                         f"no result within {timeout_s:g} s")
        finally:
            for ticket in tickets:
                ticket.abandoned.set()
                if not ticket.future.done():
                    ticket.future.cancel()

    def retry_after_s(self) -> int:
        batches_ahead = math.ceil(self._queue.qsize() / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_s_ewma))

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if batch is None:
                return
            live = [t for t in batch if not t.abandoned.is_set() and not t.future.done()]
            if len(live) < len(batch) and self._observer:
                self._observer.dropped("client_gone", len(batch) - len(live))
            if live:
                self._compute(live)

    def _collect(self) -> list[_Ticket] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = first.enqueued_at + self.max_wait_s
        with self._cond:
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    # Nothing queued: wait only while a request is still being
                    # prepared, and never past the deadline.
                    remaining = deadline - time.perf_counter()
                    if self._incoming == 0 or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    continue
                if item is _STOP:
                    self._stopping.set()
                    break
                batch.append(item)
        return batch

    def _compute(self, batch: list[_Ticket]) -> None:
        started = time.perf_counter()
        queued = [started - t.enqueued_at for t in batch]
        try:
            results = list(self._batch_fn([t.payload for t in batch]))
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)} inputs")
        except BaseException as exc:  # one failed batch must not kill the worker
            logger.exception("batch of %d failed", len(batch))
            for ticket in batch:
                ticket.resolve(error=exc)
            return
        compute_s = time.perf_counter() - started
        self._batch_s_ewma = 0.8 * self._batch_s_ewma + 0.2 * compute_s
        for ticket, result, wait in zip(batch, results, queued, strict=True):
            if isinstance(result, BaseException):
                ticket.resolve(error=result)
            else:
                ticket.resolve(Timed(result, wait, compute_s, len(batch)))
        if self._observer:
            self._observer.batch_done(len(batch), queued, compute_s)
