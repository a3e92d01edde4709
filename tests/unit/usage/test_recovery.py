"""Whether Stripe's summary of one minute settles a pending intent whose outcome is unknown."""

from __future__ import annotations

from datetime import timedelta

import pytest

from reconciler.usage.model import Intent, IntentState, Meter, StreamEvent, StreamKind
from reconciler.usage.recovery import landed_per_summary
from tests.conftest import utc

MINUTE = utc(2026, 3, 10, 12, 0)


def intent(kind: StreamKind, quantity: int, total_after: int) -> Intent:
    meter = Meter("mtr_1", "api_calls", kind.value, "active", None, "stripe_customer_id", "value")
    return Intent(
        id=1,
        identifier="ev_1",
        kind=kind,
        customer_id="cus_1",
        item_id="si_1",
        meter=meter,
        quantity=quantity,
        total_after=total_after,
        event_timestamp=MINUTE + timedelta(seconds=30),
        final=False,
        created_at=MINUTE + timedelta(seconds=30),
    )


def other(quantity: int, state: str = IntentState.SENT) -> StreamEvent:
    return StreamEvent(report_id=2, state=state, quantity=quantity, last_sent_at=MINUTE)


SUM, LAST = StreamKind.METER_SUM, StreamKind.METER_LAST
# name: the intent (kind, quantity, total after), our other events in its minute, the summary -> landed or None
CASES = [
    pytest.param((SUM, 5, 15), [], 5, True, id="sum alone: the summary holds it"),
    pytest.param((SUM, 5, 15), [], 0, False, id="sum alone: the summary lacks it"),
    pytest.param((SUM, 5, 15), [], 3, None, id="sum alone: a summary of neither cannot tell"),
    pytest.param((SUM, 5, 15), [other(2)], 7, True, id="sum with a sent neighbour: both"),
    pytest.param((SUM, 5, 15), [other(2)], 2, False, id="sum with a sent neighbour: the neighbour alone"),
    pytest.param((SUM, 5, 15), [other(2, IntentState.PENDING)], 7, None, id="sum beside an unknown outcome"),
    pytest.param((SUM, -3, 12), [], -3, True, id="a negative difference that landed"),
    pytest.param((SUM, 0, 10), [], 0, None, id="a zero difference can never be told"),
    pytest.param((LAST, 15, 15), [], 15, True, id="last alone: its total"),
    pytest.param((LAST, 15, 15), [], 0, False, id="last alone: nothing"),
    pytest.param((LAST, 15, 15), [other(9)], 15, None, id="last beside another event cannot tell"),
    pytest.param((LAST, 0, 0), [], 0, None, id="last of a zero total cannot tell"),
]


@pytest.mark.parametrize(("pending", "others", "held", "landed"), CASES)
def test_landed_per_summary(pending, others, held, landed):
    assert landed_per_summary(intent(*pending), others, held) is landed
