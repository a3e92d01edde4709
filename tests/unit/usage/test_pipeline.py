"""The concurrent cycle runner: every item synced once, streams one at a time, stops and crashes honoured."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from reconciler.usage.model import BillingPeriod, Stream, StreamKind, StreamPeriod
from reconciler.usage.pipeline import KeyedLocks, SyncItem, run_pipeline

PERIOD = BillingPeriod(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))


def item(customer: str) -> SyncItem:
    stream = Stream(StreamKind.LEGACY, customer, "sub", f"si_{customer}", "price", "meter", customer, "ceil", None)
    return SyncItem(StreamPeriod(stream, PERIOD, is_current=True))


class Recorder:
    def __init__(self, delay: float = 0.0, await_company: bool = False):
        self.delay = delay
        self.synced: Counter[str] = Counter()
        self.batches: list[int] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        # With several workers, the first sync waits until another is in flight too: overlap is then certain,
        # not a matter of how the machine schedules threads (a single worker would wait in vain, until timeout).
        self.company = threading.Event()
        if not await_company:
            self.company.set()

    def measure(self, batch):
        self.batches.append(len(batch))
        return {i.unit.stream.customer_id: len(batch) for i in batch}, batch

    def sync(self, work, measured):
        assert work.unit.stream.customer_id in measured  # synced with its own batch's measurements
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight > 1:
                self.company.set()
        self.company.wait(timeout=60)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
            self.synced[work.unit.stream.customer_id] += 1


@pytest.mark.parametrize("workers", [1, 4])
def test_every_item_is_measured_in_batches_and_synced_exactly_once(workers):
    recorder = Recorder(delay=0.002, await_company=workers > 1)
    items = [item(f"cus_{i}") for i in range(250)]
    interrupted = run_pipeline(
        iter(items),
        measure=recorder.measure,
        sync=recorder.sync,
        batch_size=100,
        workers=workers,
        measurers=2,
        stop_requested=lambda: False,
    )
    assert not interrupted
    assert recorder.synced == Counter({f"cus_{i}": 1 for i in range(250)})
    assert sorted(recorder.batches) == [50, 100, 100]
    if workers == 1:
        assert recorder.most_in_flight == 1
    else:
        assert 1 < recorder.most_in_flight <= workers


@pytest.mark.parametrize("workers", [1, 4])
def test_items_their_measuring_settled_go_to_no_worker(workers):
    """A warm cycle's unchanged items are settled where their batch is measured: only the others are synced."""
    recorder = Recorder()

    def measure(batch):
        measured, _ = recorder.measure(batch)
        return measured, [i for i in batch if int(i.unit.stream.customer_id.removeprefix("cus_")) % 3 == 0]

    run_pipeline(
        (item(f"cus_{i}") for i in range(250)),
        measure=measure,
        sync=recorder.sync,
        batch_size=100,
        workers=workers,
        measurers=2,
        stop_requested=lambda: False,
    )
    assert sorted(recorder.batches) == [50, 100, 100]
    assert recorder.synced == Counter({f"cus_{i}": 1 for i in range(0, 250, 3)})


def test_many_workers_take_shares_of_at_least_min_share_items_and_are_all_kept_busy_across_batches():
    """Fifty workers on batches of 100 take 10 items a task, not 2 (the futures and thread switches were a tenth of a
    warm cycle's CPU), and still all wait on upstream at once: the shares of the following batches are queued."""
    recorder = Recorder(delay=0.02)
    threads: dict[str, set[int]] = {}

    def sync(work, measured):
        threads.setdefault(threading.current_thread().name, set()).add(id(measured))
        recorder.sync(work, measured)

    run_pipeline(
        (item(f"cus_{i}") for i in range(2000)),
        measure=recorder.measure,
        sync=sync,
        batch_size=100,
        workers=50,
        measurers=2,
        stop_requested=lambda: False,
    )
    assert sum(recorder.synced.values()) == 2000
    assert recorder.most_in_flight == 50
    # Each batch in at most 10 tasks: at most 10 (thread, batch) pairs a batch, where shares of 2 made up to 50.
    assert len(recorder.batches) == 20 and sum(len(batches) for batches in threads.values()) <= 20 * 10


def test_a_stop_request_ends_the_cycle_after_the_items_in_flight():
    recorder = Recorder(delay=0.01)
    stop = threading.Event()

    def sync(work, measured):
        recorder.sync(work, measured)
        if sum(recorder.synced.values()) >= 10:
            stop.set()

    interrupted = run_pipeline(
        (item(f"cus_{i}") for i in range(500)),
        measure=recorder.measure,
        sync=sync,
        batch_size=100,
        workers=4,
        measurers=1,
        stop_requested=stop.is_set,
    )
    assert interrupted
    assert 10 <= sum(recorder.synced.values()) < 20  # the ones in flight finished; nothing queued was started


class Crash(BaseException):
    pass


def test_a_crash_in_a_worker_stops_the_cycle_and_reaches_the_caller():
    recorder = Recorder(delay=0.001)

    def sync(work, measured):
        if work.unit.stream.customer_id == "cus_30":
            raise Crash
        recorder.sync(work, measured)

    with pytest.raises(Crash):
        run_pipeline(
            (item(f"cus_{i}") for i in range(1000)),
            measure=recorder.measure,
            sync=sync,
            batch_size=100,
            workers=4,
            measurers=2,
            stop_requested=lambda: False,
        )
    assert sum(recorder.synced.values()) < 100


def test_keyed_locks_hold_one_thread_per_key_and_forget_keys_nobody_holds():
    locks = KeyedLocks()
    inside: Counter[str] = Counter()
    most: Counter[str] = Counter()
    guard = threading.Lock()

    def work(key: str) -> None:
        with locks.hold(key):
            with guard:
                inside[key] += 1
                most[key] = max(most[key], inside[key])
            time.sleep(0.005)
            with guard:
                inside[key] -= 1

    threads = [threading.Thread(target=work, args=(f"k{i % 3}",)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == Counter({"k0": 1, "k1": 1, "k2": 1})
    assert locks._locks == {}
