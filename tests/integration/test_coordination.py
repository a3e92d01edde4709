"""Claiming and completing work items (reconciler.ledger.coordination) on SQLite and PostgreSQL: claims take a dead
replica's lapsed leases first, then pending items in plan order, each under a new fencing token; completing in bulk
completes only the claims whose lease still holds."""

from __future__ import annotations

from datetime import timedelta

import pytest

from reconciler.ledger.coordination import REPLICA_TIMEOUT, Coordinator
from reconciler.ledger.database import make_engine, upgrade
from tests.conftest import utc

TTL = timedelta(seconds=30)


class Clock:
    def __init__(self) -> None:
        self.now = utc(2026, 3, 10, 12)

    def __call__(self):
        return self.now


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_claims_take_pending_items_in_plan_order_then_what_was_given_back_then_lapsed_leases(engine):
    clock = Clock()
    first, second = Coordinator(engine, clock, TTL), Coordinator(engine, clock, TTL)
    tick = first.claim_tick("usage_sync", "tick-1")
    assert tick is not None and second.claim_tick("usage_sync", "tick-1") is None
    assert first.enqueue(tick, "usage_sync", [f"item-{n}" for n in range(5)]) == 5

    held = first.claim_batch("usage_sync", 2)
    assert [(c.payload, c.fence.token) for c in held] == [("item-0", 1), ("item-1", 1)]
    [mine] = second.claim_batch("usage_sync", 1)  # what is held is not offered
    assert mine.payload == "item-2"

    clock.now += TTL + timedelta(seconds=1)  # the first replica died: its leases lapse; the second's are renewed
    second.heartbeat()
    taken = second.claim_batch("usage_sync", 3, after=mine.item_id)
    # The plan's pending items first, from where this replica's last claim ended; then a dead replica's lapsed ones.
    assert [(c.payload, c.fence.token) for c in taken] == [("item-3", 1), ("item-4", 1), ("item-0", 2)]
    assert first.complete_all(held[:1]) == 0  # its token is stale: item-0 is the second replica's now
    assert second.complete_all(taken) == 3
    [lapsed] = second.claim_batch("usage_sync", 10, after=taken[1].item_id)
    assert (lapsed.payload, lapsed.fence.token) == ("item-1", 2)

    second.release([lapsed])  # given back (a stop): pending again, before where the claims have got to
    [again] = second.claim_batch("usage_sync", 10, after=taken[1].item_id)
    assert (again.payload, again.fence.token) == ("item-1", 3)
    assert second.complete_all([again, mine]) == 2
    assert second.claim_batch("usage_sync", 10, after=taken[1].item_id) == []


def test_a_plan_is_awaited_only_while_its_planner_heartbeats(engine):
    clock = Clock()
    planner, waiter = Coordinator(engine, clock, TTL), Coordinator(engine, clock, TTL)
    assert waiter.planner_live("usage_sync", "tick-1") is False  # nobody plans it
    planner.register()
    assert planner.claim_tick("usage_sync", "tick-1") is not None
    assert waiter.plan_ready("usage_sync", "tick-1") is False and waiter.planner_live("usage_sync", "tick-1")
    clock.now += REPLICA_TIMEOUT / 2
    planner.heartbeat()
    clock.now += REPLICA_TIMEOUT / 2 + timedelta(seconds=1)
    assert waiter.planner_live("usage_sync", "tick-1")  # it heartbeat since
    clock.now += REPLICA_TIMEOUT
    assert waiter.planner_live("usage_sync", "tick-1") is False  # it died planning
