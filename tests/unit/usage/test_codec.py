"""Stream periods as text: a replica's work item (dump_work) and a cycle's listing row (dump_listed) both load back
as the stream period they were made from."""

import json
from dataclasses import asdict
from datetime import UTC, datetime

import pytest

from reconciler.usage.codec import dump_listed, dump_work, load_listed, load_work
from reconciler.usage.model import BillingPeriod, Meter, Stream, StreamKind, StreamPeriod

METER = Meter("mtr_1", "api_calls", "last", "active", None, "stripe_customer_id", "value")
PERIOD = BillingPeriod(datetime(2026, 3, 1, 13, 45, tzinfo=UTC), datetime(2026, 3, 10, 8, 30, 15, tzinfo=UTC))
METERED = StreamPeriod(
    Stream(StreamKind.METER_LAST, "cus_1", "sub_1", "si_1", "api_calls", "api_requests", "tenant-1", "floor", METER),
    PERIOD,
    is_current=False,
)
LEGACY = StreamPeriod(
    Stream(StreamKind.LEGACY, "cus_2", "sub_2", "si_2", "price_1", "api_requests", "cus_2", "ceil", None, "0.5", "eur"),
    PERIOD,
    is_current=True,
)


@pytest.mark.parametrize("unit", [METERED, LEGACY], ids=["meter", "legacy"])
def test_a_work_item_is_what_dataclasses_asdict_wrote_and_loads_back(unit):
    stream = asdict(unit.stream)
    stream["kind"] = unit.stream.kind.value
    written = {
        "stream": stream,
        "period": [PERIOD.start.isoformat(), PERIOD.end.isoformat()],
        "is_current": unit.is_current,
    }
    assert dump_work(unit) == json.dumps(written, sort_keys=True)  # what replicas of earlier versions read and write
    assert load_work(dump_work(unit)) == unit


@pytest.mark.parametrize("unit", [METERED, LEGACY], ids=["meter", "legacy"])
def test_a_listing_row_loads_back_with_its_meter_from_the_cycles_meters(unit):
    loaded = load_listed(dump_listed(unit), {METER.id: METER})
    assert loaded == unit
    assert loaded.stream.meter is unit.stream.meter  # one Meter for all the cycle's streams on it, not a copy each
