"""Stream periods as JSON, so a planning replica can hand work to the others through the database."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime

from reconciler.usage.model import BillingPeriod, Meter, Stream, StreamKind, StreamPeriod

_STREAM_FIELDS = tuple(f.name for f in fields(Stream))
_METER_FIELDS = tuple(f.name for f in fields(Meter))


def dump_work(work: StreamPeriod) -> str:
    # What dataclasses.asdict gives (every field is a string, None or a Meter), without its deep copies: a cycle's
    # listing encodes every stream period it holds (reconciler.ledger.listing).
    stream: dict[str, object] = {name: getattr(work.stream, name) for name in _STREAM_FIELDS}
    stream["kind"] = work.stream.kind.value
    meter = work.stream.meter
    stream["meter"] = None if meter is None else {name: getattr(meter, name) for name in _METER_FIELDS}
    return json.dumps(
        {
            "stream": stream,
            "period": [work.period.start.isoformat(), work.period.end.isoformat()],
            "is_current": work.is_current,
        },
        sort_keys=True,
    )


def load_work(text: str) -> StreamPeriod:
    data = json.loads(text)
    stream = dict(data["stream"])
    meter = stream.pop("meter")
    start, end = (datetime.fromisoformat(v) for v in data["period"])
    return StreamPeriod(
        Stream(**{**stream, "kind": StreamKind(stream["kind"]), "meter": Meter(**meter) if meter else None}),
        BillingPeriod(start, end),
        is_current=data["is_current"],
    )


# -- a cycle's listing (reconciler.ledger.listing): compact, as it holds every stream period of the cycle ----------


def dump_listed(work: StreamPeriod) -> str:
    """A stream period as a cycle's listing keeps it: its meter by id only (the cycle's listing of meters has it)."""
    stream = work.stream
    return json.dumps(
        [
            stream.kind.value,
            stream.customer_id,
            stream.subscription_id,
            stream.item_id,
            stream.stripe_target,
            stream.openmeter_meter,
            stream.subject,
            stream.rounding,
            None if stream.meter is None else stream.meter.id,
            stream.unit_amount,
            stream.currency,
            work.period.start.isoformat(),
            work.period.end.isoformat(),
            work.is_current,
        ]
    )


def load_listed(text: str, meters: Mapping[str, Meter]) -> StreamPeriod:
    """The stream period `dump_listed` wrote, with its meter from `meters` (the ones the listing was made with)."""
    kind, customer, subscription, item, target, om_meter, subject, rounding, meter_id, unit_amount, currency, *rest = (
        json.loads(text)
    )
    start, end, is_current = rest
    stream = Stream(
        kind=StreamKind(kind),
        customer_id=customer,
        subscription_id=subscription,
        item_id=item,
        stripe_target=target,
        openmeter_meter=om_meter,
        subject=subject,
        rounding=rounding,
        meter=None if meter_id is None else meters[meter_id],
        unit_amount=unit_amount,
        currency=currency,
    )
    return StreamPeriod(
        stream, BillingPeriod(datetime.fromisoformat(start), datetime.fromisoformat(end)), is_current=is_current
    )
