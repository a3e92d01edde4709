"""The usage sync at scale: concurrent workers, batched OpenMeter queries, request budgets, and a crash mid-cycle,
against the sandbox over real HTTP on SQLite and PostgreSQL. (Speed itself is measured by `reconciler bench`.)"""

from __future__ import annotations

import bisect
import math
import threading
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from reconciler.clock import utc_now
from reconciler.ledger.schema import UsagePeriod, UsageReport
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler_sandbox.bench.dataset import billed_totals
from tests.conftest import Harness, ts

FAST = {"max_requests_per_second": 500, "max_requests_per_second_per_endpoint": 500, "max_concurrency": 8}


def customers_with_odd_anchors(h: Harness, count: int) -> dict[str, int]:
    """`count` customers on one sum meter, each period starting at a different hour; returns what each used."""
    now = utc_now()
    meter = h.stripe.add_meter("api_calls", formula="sum")
    price = h.stripe.add_price(meter=meter["id"])
    h.openmeter.add_meter("api_requests")
    used = {}
    for i in range(count):
        customer = f"cus_{i:04d}"
        start = (now - timedelta(days=3, hours=i % 50)).replace(minute=0, second=0, microsecond=0)
        h.stripe.add_customer(id=customer)
        h.stripe.add_subscription(
            customer, [price["id"]], current_period_start=ts(start), current_period_end=ts(start + timedelta(days=30))
        )
        h.openmeter.ingest("api_requests", customer, start + timedelta(hours=1, minutes=5), i + 1)
        h.openmeter.ingest("api_requests", customer, start - timedelta(minutes=5), 1000)  # the period before
        used[customer] = i + 1
    return used


def requests(fake, method: str, suffix: str = "", prefix: str = "") -> int:
    return sum(1 for r in fake.requests if r.method == method and r.path.endswith(suffix) and r.path.startswith(prefix))


def test_many_customers_are_billed_exactly_with_one_openmeter_query_per_100_and_nothing_sent_when_warm(harness):
    h = harness
    h.configure(stripe=FAST)
    used = customers_with_odd_anchors(h, 250)

    cold = h.cycle()
    assert (cold.summary.reported, cold.summary.failed) == (250, 0), cold.summary.failures
    assert billed_totals(h.stripe) == used
    assert requests(h.openmeter, "POST", "/query") == math.ceil(250 / 100)

    h.stripe.requests.clear()
    h.openmeter.requests.clear()
    warm = h.cycle()
    assert (warm.summary.unchanged, warm.summary.reported) == (250, 0)
    assert requests(h.stripe, "POST") == 0
    pages = math.ceil(250 / 100)
    assert requests(h.stripe, "GET", prefix="/v1/subscriptions") == pages
    assert requests(h.stripe, "GET", prefix="/v1/billing/meters") == 1
    assert requests(h.openmeter, "POST") == pages and requests(h.openmeter, "GET") == 0  # OpenMeter's meters were kept


def test_the_request_budget_holds_in_every_second_with_every_worker_busy(harness):
    """Measured where requests leave (the slot the budget grants each): arrival times at the fake, and even the
    moments the waiting threads wake, bunch up whenever the machine is busy (29 in one second on a loaded CI
    machine), so they say more about the machine than about the budget."""
    h = harness
    h.configure(stripe={"max_requests_per_second": 25, "max_concurrency": 8})
    h.stripe.limit_rate(25, 1.0)  # the fake answers 429 above the budget, as Stripe would
    used = customers_with_odd_anchors(h, 60)
    granted: list[float] = []
    acquire = h.stripe_gateway.budget.acquire

    def recorded_acquire(endpoint: str) -> float:
        slot = acquire(endpoint)
        granted.append(slot)
        return slot

    h.stripe_gateway.budget.acquire = recorded_acquire  # type: ignore[method-assign]
    result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (60, 0), result.summary.failures
    assert billed_totals(h.stripe) == used  # a 429 caused by a busy machine's jitter is waited out, not lost
    assert len(granted) >= len(h.stripe.requests) >= 60  # every request went through the budget
    times = sorted(granted)
    assert max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)) <= 25  # in every second


def test_stripes_limiter_structure_is_kept_when_every_period_is_read_back_at_once(harness):
    """Live, Stripe limits each endpoint to 25/s under a global 100/s and meter events apart
    (https://docs.stripe.com/rate-limits; the fake enforces that structure): the cycle's meter events and a read-back
    of every period at once (a shared billing date) stay inside it, paced per endpoint, and bill exactly."""
    h = harness
    h.configure(stripe={"limits": "live", "max_concurrency": 8})
    h.stripe.limit_like_stripe(live=True)
    used = customers_with_odd_anchors(h, 60)
    result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (60, 0), result.summary.failures
    assert billed_totals(h.stripe) == used
    # As if the cycle had run 11 minutes ago and the billing period had closed since: the reports settled in Stripe.
    earlier = timedelta(minutes=11)
    with Session(h.engine) as session, session.begin():
        session.execute(update(UsagePeriod).values(status="final"))
        for report in session.scalars(select(UsageReport)):
            report.sent_at -= earlier
            report.event_timestamp -= earlier
    for meter_event in h.stripe.meter_events:
        meter_event.timestamp -= int(earlier.total_seconds())
        meter_event.created -= int(earlier.total_seconds())
    granted: dict[str, list[float]] = {}
    acquire = h.stripe_gateway.budget.acquire

    def recorded_acquire(endpoint: str) -> float:
        slot = acquire(endpoint)
        granted.setdefault(endpoint, []).append(slot)
        return slot

    h.stripe_gateway.budget.acquire = recorded_acquire  # type: ignore[method-assign]
    found = h.read_back.run_cycle()
    assert (found.findings, found.failures) == ({"ok": 60}, [])
    summaries = sorted(granted["GET /v1/billing/meters/{id}/event_summaries"])
    assert len(summaries) == 60
    assert max(bisect.bisect_left(summaries, t + 1.0) - i for i, t in enumerate(summaries)) <= 20  # 80% of 25/s


class Crash(BaseException):
    """The process dying: not an error any code path may catch."""


def test_a_crash_mid_cycle_with_workers_in_flight_bills_nothing_twice_after_the_restart(harness, monkeypatch):
    h = harness
    h.configure(stripe=FAST)
    used = customers_with_odd_anchors(h, 120)
    send = h.stripe_gateway.send_meter_event
    sent = 0
    lock = threading.Lock()

    def send_then_die(intent, renew_key):
        nonlocal sent
        send(intent, renew_key)  # Stripe applied it; the process dies before the ledger hears back
        with lock:
            sent += 1
            if sent == 40:
                raise Crash

    monkeypatch.setattr(h.stripe_gateway, "send_meter_event", send_then_die)
    with pytest.raises(Crash):
        h.cycle()
    assert 40 <= len(h.stripe.meter_events) < 120
    assert h.rows("select count(*) as n from usage_reports where state = 'pending'")[0].n >= 1

    h.configure(stripe=FAST)  # the restarted process
    result = h.cycle()
    assert result.summary.failed == 0, result.summary.failures
    assert billed_totals(h.stripe) == used
    identifiers = [event.identifier for event in h.stripe.meter_events]
    assert len(identifiers) == len(set(identifiers)) == 120
    assert h.rows("select count(*) as n from usage_reports where state <> 'sent'")[0].n == 0


def test_acceptances_are_recorded_many_to_a_transaction_and_intents_one_each_before_their_send(harness):
    h = harness
    h.configure(stripe=FAST)
    used = customers_with_odd_anchors(h, 120)
    commits = 0

    def count(connection):
        nonlocal commits
        commits += 1

    event.listen(h.engine, "commit", count)
    try:
        result = h.cycle()
    finally:
        event.remove(h.engine, "commit", count)
    assert (result.summary.reported, result.summary.failed) == (120, 0), result.summary.failures
    assert billed_totals(h.stripe) == used
    # One transaction per intent, before its send; the 120 acceptances in ⌈120/50⌉ more (one per item: 240+).
    assert 120 <= commits <= 120 + 10
    assert h.rows("select count(*) as n from usage_reports where state = 'sent'")[0].n == 120


def test_acceptances_the_ledger_could_not_record_stay_pending_and_are_resent_under_their_identifiers(
    harness, monkeypatch
):
    h = harness
    h.configure(stripe=FAST)
    used = customers_with_odd_anchors(h, 60)
    real = UsageLedger.mark_all_sent
    failures = iter([True])

    def database_away_once(ledger, intents):
        if next(failures, False):
            raise OperationalError("UPDATE usage_reports", {}, Exception("the database went away"))
        real(ledger, intents)

    monkeypatch.setattr(UsageLedger, "mark_all_sent", database_away_once)
    first = h.cycle()
    assert first.summary.failed == 0
    left_pending = h.rows("select count(*) as n from usage_reports where state = 'pending'")[0].n
    assert left_pending == 50  # the first group; the last ten were recorded at the cycle's end

    second = h.cycle()
    assert second.summary.failed == 0, second.summary.failures
    assert billed_totals(h.stripe) == used  # resent under the same identifiers: Stripe kept one of each
    assert h.rows("select count(*) as n from usage_reports where state <> 'sent'")[0].n == 0
