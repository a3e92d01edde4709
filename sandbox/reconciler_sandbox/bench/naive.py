"""The naive baseline: the seed example's loop (shared/seeds/001), ported to Billing Meters and run on a schedule.
One subscription after another: list a page, and for every metered item query OpenMeter for the period rounded
down to whole hours, then send the total to Stripe. No concurrency, no batching, no ledger: on a cold cycle it bills
what the product bills, which is what the benchmark checks; on any later cycle it would bill everything again."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import openmeter
import stripe

from reconciler.usage.periods import epoch_seconds
from reconciler_sandbox.bench.dataset import OPENMETER_METER


def naive_cycle(*, stripe_base: str, stripe_key: str, openmeter_url: str, openmeter_token: str, now: datetime) -> int:
    """One naive cycle; returns the number of meter events it sent."""
    client = stripe.StripeClient(stripe_key, base_addresses={"api": stripe_base})
    usage = openmeter.Client(endpoint=openmeter_url, token=openmeter_token)
    end = now.replace(minute=0, second=0, microsecond=0)
    meters = {m.id: m for m in client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()}
    sent = 0
    subscriptions = client.v1.subscriptions.list(params={"limit": 100, "expand": ["data.items.data.price"]})
    for subscription in subscriptions.auto_paging_iter():
        for item in subscription["items"]["data"]:
            meter = meters.get(item["price"]["recurring"]["meter"])
            if meter is None:
                continue
            start = datetime.fromtimestamp(item["current_period_start"], UTC).replace(minute=0, second=0)
            result = usage.meters.query_json(
                OPENMETER_METER, from_parameter=start, to=end, subject=[subscription["customer"]]
            )
            total = math.ceil(sum(row.value for row in result.data or []))
            client.v1.billing.meter_events.create(
                params={
                    "event_name": meter.event_name,
                    "timestamp": epoch_seconds(now),
                    "payload": {"stripe_customer_id": subscription["customer"], "value": str(total)},
                }
            )
            sent += 1
    usage.close()
    return sent
