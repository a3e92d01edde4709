"""A cycle shared by replicas (`UsageSync.run_shared_cycle`, what `reconciler run` does on PostgreSQL): a claimed
work item is completed only once the outcomes its sync left buffered (the group commit of "sent" marks, the v2
stream's batches) are recorded. Completing ends the claim's lease, and every ledger write for the item checks that
lease: a mark written after it was refused, so every intent of a replica's cycle stayed pending and the next cycle
sent it again (found by `reconciler bench`'s replica runs, docs/bench)."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from datetime import timedelta

import pytest
from freezegun import freeze_time

from reconciler.clock import utc_now
from reconciler.ledger.coordination import Coordinator
from reconciler.usage import job
from reconciler_sandbox.httpserver import LoopbackServer
from tests.conftest import Harness
from tests.integration.test_meter_event_stream import seed_customers
from tests.integration.test_usage_sync import MID, stripe_total


@pytest.mark.parametrize("meter_events", ["v1", "v2_stream"])
def test_a_shared_cycle_records_every_outcome_before_it_completes_the_claim(harness: Harness, meter_events):
    if harness.engine.dialect.name != "postgresql":
        pytest.skip("replicas share a cycle only on PostgreSQL (reconciler.daemon); SQLite runs it locally")
    with ExitStack() as stack:
        if meter_events == "v2_stream":
            stream = stack.enter_context(LoopbackServer(harness.stripe.meter_events_host()))
            harness.configure(stripe={"meter_events": "v2_stream", "meter_events_base": stream.url})
        customers = seed_customers(harness, 130)
        with freeze_time(MID):
            coordinator = Coordinator(harness.engine, utc_now)
            coordinator.register()
            result = harness.sync.run_shared_cycle(coordinator, "tick-1")
            assert (result.summary.reported, result.summary.failed) == (130, 0)
            assert harness.rows("select state, count(*) from usage_reports group by state") == [("sent", 130)]
            assert harness.rows("select state, count(*) from work_items group by state") == [("done", 130)]
            assert all(stripe_total(harness, customer) == n + 1 for n, customer in enumerate(customers))

            # Nothing was left pending, so the next tick resends nothing: every Stripe write is the same one.
            requests_before = len(harness.stripe.requests)
            second = harness.sync.run_shared_cycle(coordinator, "tick-2")
            assert (second.summary.reported, second.summary.unchanged) == (0, 130)
            resends = [r for r in harness.stripe.requests[requests_before:] if r.method == "POST"]
            assert resends == []


def test_a_replica_waits_for_a_plan_as_long_as_its_planner_is_live(harness: Harness, monkeypatch):
    if harness.engine.dialect.name != "postgresql":
        pytest.skip("replicas share a cycle only on PostgreSQL (reconciler.daemon); SQLite runs it locally")
    seed_customers(harness, 5)
    monkeypatch.setattr(job, "PLAN_WAIT", timedelta(seconds=0.2))  # the liveness check, long before the plan is done
    harness.stripe.latency_seconds = 0.5  # listing Stripe (the meters, then subscriptions) takes the planner a while
    planner_sync = harness.sync
    harness.configure()  # a second replica's usage sync, on the same database
    with freeze_time(MID, tick=True):
        planner, waiter = Coordinator(harness.engine, utc_now), Coordinator(harness.engine, utc_now)
        planner.register()
        planning = threading.Thread(target=planner_sync.run_shared_cycle, args=(planner, "tick-1"))
        planning.start()
        while waiter.plan_ready("usage_sync", "tick-1") is None:
            time.sleep(0.01)
        harness.sync.run_shared_cycle(waiter, "tick-1")
        waited_until = utc_now()
        planning.join()
    [(enqueued_at,)] = harness.rows("select enqueued_at from cycle_ticks where tick_key = 'tick-1'")
    assert enqueued_at is not None and waited_until.replace(tzinfo=None) >= enqueued_at
    assert harness.rows("select state, count(*) from work_items group by state") == [("done", 5)]
