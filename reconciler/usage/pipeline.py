"""Runs a cycle's stream periods concurrently: batches are measured in OpenMeter (a few queries each) while earlier
batches are synced with Stripe by a pool of workers. Measuring a batch may settle some of its items itself (those
with nothing to do); only the rest go to the workers. Work waiting in either stage is bounded, so memory does not
grow with the number of items. With one worker everything runs in the calling thread, in order: what the
deterministic simulation relies on.

A BaseException in a worker (the process being torn down, or the simulation's crash) stops the pipeline and is
raised in the calling thread, as it would be without threads."""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from reconciler.usage.model import Fence, StreamPeriod

M = TypeVar("M")
T = TypeVar("T")

# Items a worker takes at a time. A task per item cost a tenth of a warm cycle's CPU in futures, their locks and the
# thread switches; shares of two (50 workers) still cost ~12% of it at N = 30,000 (20.0 s against 17.6 s with ten),
# when an unchanged item takes tens of microseconds. Ten keeps every worker busy all the same (up to two shares per
# worker are queued, from the next batches) when each item waits on Stripe.
MIN_SHARE = 10


@dataclass(frozen=True)
class SyncItem:
    unit: StreamPeriod
    fence: Fence | None = None  # a replica's lease on the item: every ledger write checks it
    # Called once the item is synced and its outcomes recorded (completes the replica's claim).
    done: Callable[[], None] | None = None


class KeyedLocks:
    """One lock per key, kept only while a thread holds or waits for it: at most one stream period of a stream is
    synced at a time, so a (customer, meter) never has two meter events in flight."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def run_pipeline(
    items: Iterable[SyncItem],
    *,
    measure: Callable[[list[SyncItem]], tuple[M, list[SyncItem]]],
    sync: Callable[[SyncItem, M], None],
    batch_size: int,
    workers: int,
    measurers: int,
    stop_requested: Callable[[], bool],
) -> bool:
    """Measure `items` in batches and sync each item that measuring left to sync (`measure` returns the batch's
    measurement and those items); True if a stop request ended it early."""
    batches = batched(items, batch_size)
    if workers == 1:
        for batch in batches:
            if stop_requested():  # before measuring, too: measuring may settle a whole batch without a sync
                return True
            measured, left = measure(batch)
            for item in left:
                if stop_requested():
                    return True
                sync(item, measured)
        return False
    return _Concurrent(measure, sync, workers, measurers, stop_requested).run(batches)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), taken as they come: memory holds one list at a time."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _Concurrent:
    def __init__(
        self,
        measure: Callable[[list[SyncItem]], tuple[M, list[SyncItem]]],
        sync: Callable[[SyncItem, M], None],
        workers: int,
        measurers: int,
        stop_requested: Callable[[], bool],
    ) -> None:
        self._measure, self._sync, self._stop_requested = measure, sync, stop_requested
        self._workers, self._measurers = workers, measurers
        self._queued = threading.BoundedSemaphore(2 * workers)  # shares handed to the pool, not yet synced
        self._fatal: list[BaseException] = []

    def run(self, batches: Iterator[list[SyncItem]]) -> bool:
        measuring: deque[Future[tuple[M, list[SyncItem]]]] = deque()
        with (
            ThreadPoolExecutor(self._measurers, thread_name_prefix="measure") as measurers,
            ThreadPoolExecutor(self._workers, thread_name_prefix="sync") as syncers,
        ):
            try:
                for batch in batches:
                    if self._fatal or self._stop_requested():
                        return True
                    measuring.append(_submit_in_context(measurers, self._measure, batch))
                    if len(measuring) > self._measurers and self._hand_over(measuring.popleft(), syncers):
                        return True
                while measuring:
                    if self._hand_over(measuring.popleft(), syncers):
                        return True
                return False
            finally:
                for future in measuring:
                    future.cancel()
                syncers.shutdown(wait=True)
                if self._fatal:
                    raise self._fatal[0]

    def _hand_over(self, measuring: Future[tuple[M, list[SyncItem]]], syncers: ThreadPoolExecutor) -> bool:
        """Queue a measured batch's items left to sync, a share of them per worker, of at least MIN_SHARE items
        (blocking while the queue is full); True if stopped."""
        result, batch = measuring.result()
        share = max(-(-len(batch) // self._workers), MIN_SHARE)
        for first in range(0, len(batch), share):
            self._queued.acquire()
            if self._fatal or self._stop_requested():
                self._queued.release()
                return True
            _submit_in_context(syncers, self._start, batch[first : first + share], result).add_done_callback(
                self._finished
            )
        return False

    def _start(self, items: list[SyncItem], measured: M) -> None:
        for item in items:
            if self._fatal or self._stop_requested():  # queued when the stop came: left for the next cycle
                return
            self._sync(item, measured)

    def _finished(self, future: Future[None]) -> None:
        error = future.exception()
        if error is not None:
            self._fatal.append(error)
        self._queued.release()


def _submit_in_context(pool: ThreadPoolExecutor, task: Callable[..., T], *args: object) -> Future[T]:
    """`task` in a worker under a copy of the caller's context (the cycle's run id in every log line), as asyncio
    runs a task: each task its own copy, since one context cannot be entered by two threads at once."""
    return pool.submit(contextvars.copy_context().run, task, *args)
