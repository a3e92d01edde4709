"""The benchmark's dataset (reconciler_sandbox/bench/dataset.py): a few events per customer by default, and with
`every_hour` an event in every whole hour of each customer's period so far, which is what makes OpenMeter's
windowed answers hold a row per customer per hour."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from reconciler_sandbox.bench.dataset import (
    EVENTS_PER_CUSTOMER,
    OPENMETER_METER,
    customer_id,
    period_start,
    seed_openmeter,
)
from reconciler_sandbox.openmeter_fake import FakeOpenMeter

NOW = datetime(2026, 12, 2, 7, 30, tzinfo=UTC)


def events_per_customer(every_hour: bool) -> Counter[str]:
    openmeter = FakeOpenMeter()
    seed_openmeter(openmeter, 5, NOW, every_hour=every_hour)
    return Counter(event.subject for event in openmeter.events[OPENMETER_METER])


def test_by_default_each_customer_has_a_few_events():
    assert all(count <= EVENTS_PER_CUSTOMER for count in events_per_customer(every_hour=False).values())


def test_every_hour_adds_an_event_in_each_whole_hour_of_the_period_so_far():
    counts, sparse = events_per_customer(every_hour=True), events_per_customer(every_hour=False)
    for index in range(5):
        whole_hours = int((NOW - period_start(index, NOW)).total_seconds() // 3600)
        assert counts[customer_id(index)] == whole_hours + sparse[customer_id(index)]
    assert sum(counts.values()) > 50 * sum(sparse.values())  # periods days or weeks old, anchored at different hours
