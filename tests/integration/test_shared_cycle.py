"""A cycle shared by replicas (`UsageSync.run_shared_cycle`, what `reconciler run` does on PostgreSQL): a claimed
work item is completed only once the outcomes its sync left buffered (the group commit of "sent" marks, the v2
stream's batches) are recorded. Completing ends the claim's lease, and every ledger write for the item checks that
lease: a mark written after it was refused, so every intent of a replica's cycle stayed pending and the next cycle
sent it again (found by `reconciler bench`'s replica runs, docs/bench)."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import replace
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


def test_when_planning_fails_the_waiting_replicas_stop_waiting(harness: Harness, monkeypatch):
    if harness.engine.dialect.name != "postgresql":
        pytest.skip("replicas share a cycle only on PostgreSQL (reconciler.daemon); SQLite runs it locally")
    seed_customers(harness, 3)
    monkeypatch.setattr(job, "PLAN_WAIT", timedelta(seconds=0.2))
    harness.stripe.latency_seconds = 0.5
    harness.stripe.inject_fault("GET", "/v1/subscriptions", 400, times=10)  # the planner's listing fails for good
    planner_sync = harness.sync
    harness.configure()
    with freeze_time(MID, tick=True):
        planner, waiter = Coordinator(harness.engine, utc_now), Coordinator(harness.engine, utc_now)
        planner.register()  # and stays live: only its failed plan may end the wait
        outcome: list = []
        planning = threading.Thread(target=lambda: outcome.append(planner_sync.run_shared_cycle(planner, "tick-1")))
        planning.start()
        while waiter.plan_ready("usage_sync", "tick-1") is None:
            time.sleep(0.01)
        waited = threading.Thread(target=harness.sync.run_shared_cycle, args=(waiter, "tick-1"), daemon=True)
        waited.start()
        planning.join()
        waited.join(timeout=15)
        assert not waited.is_alive()  # it stopped waiting for a plan that is not coming
    assert outcome[0].aborted
    assert harness.rows("select count(*) from cycle_ticks") == [(0,)]  # the next replica to start may plan it


def test_a_cycle_that_fails_midway_records_its_outcomes_and_gives_back_what_it_did_not_sync(
    harness: Harness, monkeypatch
):
    if harness.engine.dialect.name != "postgresql":
        pytest.skip("replicas share a cycle only on PostgreSQL (reconciler.daemon); SQLite runs it locally")
    seed_customers(harness, 250)
    monkeypatch.setattr(job, "SENT_MARKS_PER_TRANSACTION", 30)  # 10 of the first claim's acceptances still buffered
    harness.configure(stripe={"max_concurrency": 1})  # in order: the first claim is synced when the second fails
    with freeze_time(MID):
        coordinator = Coordinator(harness.engine, utc_now)
        coordinator.register()
        claim_batch = coordinator.claim_batch

        def second_claim_with_a_corrupt_item(*args):
            claims = claim_batch(*args)
            if claims and claims[0].item_id > 100:
                claims[50] = replace(claims[50], payload="{not a stream period")
            return claims

        coordinator.claim_batch = second_claim_with_a_corrupt_item
        with pytest.raises(ValueError):
            harness.sync.run_shared_cycle(coordinator, "tick-1")
    # The first claim's reports are recorded as sent (acceptances still buffered included) and its items done; the
    # second claim's items, fetched but never synced, are given back with the unclaimed rest: none is left held.
    assert dict(harness.rows("select state, count(*) from work_items group by state")) == {"done": 100, "pending": 150}
    assert harness.rows("select state, count(*) from usage_reports group by state") == [("sent", 100)]
