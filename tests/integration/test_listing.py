"""A usage cycle's listing goes through the ledger (`usage_listing`), so its memory does not grow with the number of
metered items: one customer's items on one meter are still met together however far apart Stripe lists them, the
listing is deleted when the cycle's planning ends, and the planning's memory stays flat as N grows. On SQLite and
PostgreSQL."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from sqlalchemy import func, select

from reconciler.config import Config, parse_config
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.listing import ListingLedger
from reconciler.ledger.meter_cache import MeterCache
from reconciler.ledger.runs import RunLog
from reconciler.ledger.schema import UsageListing
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.upstream.errors import TransientError
from reconciler.usage.job import CycleResult, UsageSync
from reconciler.usage.listing import MemoryListing
from reconciler.usage.model import BillingPeriod, CycleSummary, Meter, MeteredItem, Stream, StreamKind, StreamPeriod
from tests.conftest import Harness, ts, utc

PERIOD_START = utc(2026, 3, 1, 13, 45)
PERIOD_END = utc(2026, 4, 1, 13, 45)
MID = utc(2026, 3, 10, 12, 30)
OTHERS = 150  # subscriptions listed between one customer's two: Stripe lists 100 a page


def listing_rows(h: Harness) -> int:
    with h.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(UsageListing)).scalar_one()


class ListedItems:
    """Wraps the gateway's listing to record the items in the order Stripe listed them."""

    def __init__(self, gateway):
        self.order: list[str] = []
        self._listing = gateway.metered_items
        gateway.metered_items = self

    def __call__(self, **kwargs) -> Iterator[MeteredItem]:
        for item in self._listing(**kwargs):
            self.order.append(item.item_id)
            yield item


def test_one_customers_two_items_on_a_meter_on_different_pages_are_refused_and_nothing_is_sent_first(harness):
    h = harness
    meter = h.stripe.add_meter("api_calls", formula="sum")
    h.openmeter.add_meter("api_requests")
    old_price, new_price, price = (h.stripe.add_price(meter=meter["id"])["id"] for _ in range(3))
    period = {"current_period_start": ts(PERIOD_START), "current_period_end": ts(PERIOD_END)}
    h.stripe.add_customer(id="cus_A")
    first = h.stripe.add_subscription("cus_A", [old_price], created=ts(PERIOD_START), **period)
    for i in range(OTHERS):
        h.stripe.add_customer(id=f"cus_{i:03d}")
        h.stripe.add_subscription(f"cus_{i:03d}", [price], created=ts(PERIOD_START) + 1 + i, **period)
        h.openmeter.ingest("api_requests", f"cus_{i:03d}", utc(2026, 3, 2), 1)
    second = h.stripe.add_subscription("cus_A", [new_price], created=ts(PERIOD_START) + 1000, **period)
    h.openmeter.ingest("api_requests", "cus_A", utc(2026, 3, 2), 5)
    listed = ListedItems(h.stripe_gateway)
    first_item, second_item = first["items"]["data"][0]["id"], second["items"]["data"][0]["id"]

    with freeze_time(MID):
        result = h.cycle()

    # Stripe listed them on different pages of 100 subscriptions (one metered item each).
    assert abs(listed.order.index(first_item) // 100 - listed.order.index(second_item) // 100) >= 1
    assert (result.summary.reported, result.summary.failed) == (OTHERS, 2)
    assert all("overlapping periods" in failure for failure in result.summary.failures)
    events = [r for r in h.stripe.requests if r.method == "POST" and r.path == "/v1/billing/meter_events"]
    assert "cus_A" not in {r.params["payload"]["stripe_customer_id"] for r in events}
    # Nothing at all was sent before the listing's last page had been read.
    positions = [i for i, r in enumerate(h.stripe.requests) if r.method == "GET" and r.path == "/v1/subscriptions"]
    sends = [i for i, r in enumerate(h.stripe.requests) if r.path == "/v1/billing/meter_events"]
    assert len(positions) >= 2 and max(positions) < min(sends)
    rows = h.rows("select subscription_item_id from unbilled_items order by subscription_item_id")
    assert [r.subscription_item_id for r in rows] == sorted([first_item, second_item])
    assert listing_rows(h) == 0


def test_stripes_next_page_is_asked_for_while_the_caller_works_through_this_one(harness):
    h = harness
    meter = h.stripe.add_meter("api_calls", formula="sum")
    price = h.stripe.add_price(meter=meter["id"])["id"]
    period = {"current_period_start": ts(PERIOD_START), "current_period_end": ts(PERIOD_END)}
    for i in range(OTHERS):
        h.stripe.add_customer(id=f"cus_{i:03d}")
        h.stripe.add_subscription(f"cus_{i:03d}", [price], **period)

    def page_requests() -> list[dict]:
        return [r.query for r in h.stripe.requests if r.method == "GET" and r.path == "/v1/subscriptions"]

    listing = h.stripe_gateway.metered_items(with_customer=False, customers=frozenset())
    next(listing)  # the caller holds the first item of page one
    deadline = time.monotonic() + 30
    while len(page_requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(page_requests()) == 2 and "starting_after" in page_requests()[1]
    listing.close()  # a caller that stops early: nothing more is asked for, nothing is left open
    assert len(page_requests()) == 2

    assert len(list(h.stripe_gateway.metered_items(with_customer=False, customers=frozenset()))) == OTHERS


def test_the_listing_is_in_the_ledger_while_planning_and_deleted_after_a_cycle_stopped_or_not_or_a_failed_one(harness):
    h = harness
    meter = h.stripe.add_meter("api_calls", formula="sum")
    h.openmeter.add_meter("api_requests")
    price = h.stripe.add_price(meter=meter["id"])["id"]
    for i in range(30):
        h.stripe.add_customer(id=f"cus_{i:03d}")
        h.stripe.add_subscription(
            f"cus_{i:03d}", [price], current_period_start=ts(PERIOD_START), current_period_end=ts(PERIOD_END)
        )
    held_while_planning: list[int] = []
    real_groups = h.sync._listings.groups

    def groups(listing, meters):
        held_while_planning.append(listing_rows(h))
        yield from real_groups(listing, meters)

    h.sync._listings.groups = groups
    with freeze_time(MID):
        result = h.cycle()
    assert result.summary.failed == 0, result.summary.failures
    assert (held_while_planning, listing_rows(h)) == ([30], 0)

    h.sync._stop_requested = lambda: True  # stopped after the plan began yielding
    with freeze_time(MID + timedelta(minutes=5)):
        stopped = h.cycle()
    assert (stopped.interrupted, held_while_planning, listing_rows(h)) == (True, [30, 30], 0)
    h.sync._stop_requested = lambda: False

    listing = h.stripe_gateway.metered_items

    def failing_on_the_second_page(**kwargs):
        for i, item in enumerate(listing(**kwargs)):
            if i == 20:
                raise TransientError("stripe", "the second page timed out")
            yield item

    h.stripe_gateway.metered_items = failing_on_the_second_page
    with freeze_time(MID + timedelta(minutes=15)):
        failed = h.cycle()
    assert failed.aborted and listing_rows(h) == 0


def test_a_listing_abandoned_by_a_dead_process_is_deleted_a_day_later(database_url):
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        now = [utc(2026, 3, 10)]
        listings = ListingLedger(engine, lambda: now[0])
        abandoned = listings.open()
        listings.add(abandoned, [unit("cus_1", 1)])
        now[0] += timedelta(hours=23)
        listings.add(listings.open(), [unit("cus_2", 1)])
        assert sum(len(g) for g in listings.groups(abandoned, METERS)) == 1  # not yet: its cycle may still run
        now[0] += timedelta(hours=2)
        listings.open()
        assert list(listings.groups(abandoned, METERS)) == []
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(UsageListing)).scalar_one() == 1
    finally:
        engine.dispose()


METERS = {m: Meter(m, "api_calls", "sum", "active", None, "stripe_customer_id", "value") for m in ("mtr_1", "mtr_2")}


def unit(customer: str, day: int, *, meter: str = "mtr_1", days: int = 1) -> StreamPeriod:
    stream = Stream(
        kind=StreamKind.METER_SUM,
        customer_id=customer,
        subscription_id=f"sub_{customer}_{day}",
        item_id=f"si_{customer}_{meter}_{day}",
        stripe_target="api_calls",
        openmeter_meter="api_requests",
        subject=customer,
        rounding="ceil",
        meter=METERS[meter],
    )
    start = utc(2026, 3, day)
    return StreamPeriod(stream, BillingPeriod(start, start + timedelta(days=days)), is_current=True)


def test_the_ledgers_listing_reads_back_every_stream_whole_across_chunks_as_the_memory_one_does(database_url):
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        ledger, memory = ListingLedger(engine, lambda: utc(2026, 3, 10), read_chunk=3), MemoryListing()
        units = [
            *(unit(f"cus_{i}", 1) for i in range(5)),
            *(unit("cus_big", day) for day in range(1, 9)),  # one stream longer than a chunk
            unit("cus_2", 5),  # a stream whose periods Stripe listed apart
            unit("cus_2", 5, meter="mtr_2"),
            *(unit("cus_3", day) for day in (9, 3, 6)),
        ]
        ids = {}
        for listings in (ledger, memory):
            ids[listings] = listings.open()
            for first in range(0, len(units), 4):  # a batch at a time, as the cycle writes it
                listings.add(ids[listings], units[first : first + 4])
        other = ledger.open()
        ledger.add(other, [unit("cus_0", 2)])  # another cycle's listing

        def read(listings):
            groups = []
            for group in listings.groups(ids[listings], METERS):
                groups.append([(u.stream.key, u.period.start) for u in group])
                if group[0].stream.customer_id == "cus_1":
                    listings.drop(ids[listings], group[0].stream.key)  # as a clash is: not disturbing the read
            return groups

        read_back = read(ledger)
        assert read_back == read(memory)
        assert len(read_back) == 7 and sum(map(len, read_back)) == len(units)
        assert [key for key, _ in read_back[0]] == ["meter:mtr_1:cus_0"]
        big = next(group for group in read_back if group[0][0] == "meter:mtr_1:cus_big")
        assert [start.day for _, start in big] == list(range(1, 9))
        asked = [("meter:mtr_1:cus_2", utc(2026, 3, 5)), ("meter:mtr_1:cus_1", utc(2026, 3, 1))]
        asked += [("meter:mtr_1:cus_3", utc(2026, 3, 4)), ("meter:mtr_1:cus_9", utc(2026, 3, 1))]
        assert ledger.listed(ids[ledger], asked) == memory.listed(ids[memory], asked) == {asked[0]}
        ledger.close(ids[ledger])
        assert list(ledger.groups(ids[ledger], METERS)) == []
        assert len(list(ledger.groups(other, METERS))) == 1
    finally:
        engine.dispose()


# -- memory --------------------------------------------------------------------------------------------------

NOW = datetime(2026, 3, 15, tzinfo=UTC)
METER = Meter("mtr_1", "api_calls", "sum", "active", None, "stripe_customer_id", "value")


class ListingOnly:
    """A Stripe that lists `n` customers' metered items (made as they are listed), and is asked nothing else."""

    def __init__(self, n: int):
        self.n = n

    def list_meters(self) -> dict[str, Meter]:
        return {METER.id: METER}

    def metered_items(self, *, with_customer: bool, customers: frozenset[str] = frozenset()) -> Iterator[MeteredItem]:
        for i in range(self.n):
            start = NOW - timedelta(days=1, hours=i % 500)
            yield MeteredItem(
                item_id=f"si_{i:08d}",
                subscription_id=f"sub_{i:08d}",
                subscription_status="active",
                customer_id=f"cus_{i:08d}",
                price_id="price_1",
                meter_id=METER.id,
                period=BillingPeriod(start, start + timedelta(days=30)),
            )


def planning_peak(tmp_path, n: int) -> tuple[int, int]:
    """The most memory (bytes, as tracemalloc counts it) planning a cycle of `n` items took, and how many it
    yielded."""
    engine = make_engine(f"sqlite:///{tmp_path / f'ledger-{n}.db'}")
    try:
        upgrade(engine)
        config = sandbox_free_config()
        clock = lambda: NOW  # noqa: E731
        sync = UsageSync(
            config,
            ListingOnly(n),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]  # planning asks OpenMeter nothing (no refusals to measure)
            UsageLedger(engine, clock),
            RunLog(engine, clock),
            clock,
            meter_cache=MeterCache(engine, clock),
            listings=ListingLedger(engine, clock),
        )
        result = CycleResult(run_id=None, summary=CycleSummary())
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        yielded = sum(1 for _ in sync._planned_work(NOW, frozenset(), result))
        return tracemalloc.get_traced_memory()[1] - before, yielded
    finally:
        engine.dispose()


def sandbox_free_config() -> Config:
    return parse_config(
        {
            "database": {"url": "sqlite://"},
            "stripe": {"api_key": "sk_test_x"},
            "openmeter": {"url": "http://127.0.0.1:9", "token": "t"},
            "usage": {"meters": [{"stripe": "api_calls", "openmeter": "api_requests"}]},
        }
    )


def test_planning_a_cycle_takes_no_more_memory_for_ten_times_the_items(tmp_path):
    """Holding the cycle's stream periods (~0.5 KB each, as before the listing went through the ledger) would add
    ~9 MB from 2,000 items to 20,000; flat memory adds a small fraction of that (the listing reads 1,000 rows at a
    time whatever N is)."""
    tracemalloc.start()
    try:
        planning_peak(tmp_path, 200)  # warm: SQLAlchemy's compiled statements, the codec, ...
        small, small_yielded = planning_peak(tmp_path, 2_000)
        large, large_yielded = planning_peak(tmp_path, 20_000)
    finally:
        tracemalloc.stop()
    assert (small_yielded, large_yielded) == (2_000, 20_000)
    growth_per_item = (large - small) / 18_000
    assert growth_per_item < 64, f"{small / 1e6:.1f} MB at 2,000 items, {large / 1e6:.1f} MB at 20,000"


def test_a_dry_run_keeps_its_listing_in_memory_and_still_refuses_overlapping_items(harness):
    """A dry run writes nothing anywhere, not even a listing it would delete."""
    h = harness
    meter = h.stripe.add_meter("api_calls", formula="sum")
    h.openmeter.add_meter("api_requests")
    period = {"current_period_start": ts(PERIOD_START), "current_period_end": ts(PERIOD_END)}
    for customer, prices in (("cus_A", 2), ("cus_B", 1)):
        h.stripe.add_customer(id=customer)
        for _ in range(prices):
            h.stripe.add_subscription(customer, [h.stripe.add_price(meter=meter["id"])["id"]], **period)
        h.openmeter.ingest("api_requests", customer, utc(2026, 3, 2), 3)
    written = []
    h.sync._listings.add = lambda listing, units: written.append(units)
    with freeze_time(MID):
        result = h.cycle(dry_run=True)
    assert (written, [p.work.stream.customer_id for p in result.plan], result.summary.failed) == ([], ["cus_B"], 2)
