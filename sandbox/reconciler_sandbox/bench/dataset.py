"""The benchmark's data: N customers with one metered subscription item each, seeded identically into any number
of Stripe fakes (the product's and the naive baseline's) and once into OpenMeter. Deterministic for a given N and
`now`, so two runs measure the same work."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from reconciler_sandbox.moesif_fake import FakeMoesif
from reconciler_sandbox.openmeter_fake import FakeOpenMeter
from reconciler_sandbox.stripe_fake import FakeStripe

EVENT_NAME = "api_calls"  # the Stripe meter (sum)
OPENMETER_METER = "api_requests"  # the OpenMeter meter (SUM) it is fed from
METER_ID = "mtr_bench_api_calls"
PRICE_ID = "price_bench_api_calls"
EVENTS_PER_CUSTOMER = 3
PERIOD = timedelta(days=30)
ANCHOR_SPREAD_HOURS = 28 * 24  # customers started at different hours of the past 28 days: odd anchors


def customer_id(index: int) -> str:
    return f"cus_bench_{index:06d}"


def period_start(index: int, now: datetime) -> datetime:
    """Customer `index`'s current period start: whole hours, spread over the past four weeks."""
    hours_ago = 1 + (index * 7919) % ANCHOR_SPREAD_HOURS  # a prime stride spreads neighbours apart
    return (now - timedelta(hours=hours_ago)).replace(minute=0, second=0, microsecond=0)


def seed_stripe(stripe: FakeStripe, items: int, now: datetime) -> None:
    stripe.record_requests = False
    stripe.add_meter(EVENT_NAME, formula="sum", id=METER_ID)
    stripe.add_price(meter=METER_ID, unit_amount=1, id=PRICE_ID)
    for index in range(items):
        start = period_start(index, now)
        customer = customer_id(index)
        stripe.add_customer(id=customer)
        stripe.add_subscription(
            customer,
            [PRICE_ID],
            id=subscription_id(index),
            current_period_start=int(start.timestamp()),
            current_period_end=int((start + PERIOD).timestamp()),
        )


def seed_openmeter(openmeter: FakeOpenMeter, items: int, now: datetime, *, every_hour: bool = False) -> None:
    """A few events per customer inside its current period, all before `now`'s hour so the totals are whole; with
    `every_hour`, also one in every hour of the period so far, as an API's customers have usage every hour: a
    windowed query then answers a row per customer per hour."""
    openmeter.record_requests = False
    openmeter.add_meter(OPENMETER_METER, aggregation="SUM", value_property="$.count")
    for index in range(items):
        start = period_start(index, now)
        hours = max(1, int((now - start).total_seconds() // 3600))
        if every_hour:
            for hour in range(hours):
                openmeter.ingest(OPENMETER_METER, customer_id(index), start + timedelta(hours=hour, minutes=5), 2)
        for event in range(EVENTS_PER_CUSTOMER):
            at = start + timedelta(hours=(index + event * 5) % hours, minutes=17)
            if at < now.replace(minute=0, second=0, microsecond=0):
                openmeter.ingest(OPENMETER_METER, customer_id(index), at, 1 + (index * 31 + event * 17) % 97)


def subscription_id(index: int) -> str:
    return f"sub_bench_{index:06d}"


def credit_minor(index: int) -> int:
    return 1000 + (index * 37) % 9000


def seed_balances(stripe: FakeStripe, moesif: FakeMoesif, customers: int) -> None:
    """Every customer (seeded by `seed_stripe`) holds credit on its Stripe customer balance, and Moesif agrees."""
    moesif.record_requests = False
    for index in range(customers):
        stripe.adjust_customer_balance(customer_id(index), -credit_minor(index))
        moesif.add_subscription(subscription_id(index), customer_id(index), current_balance=credit_minor(index) / 100)


TOP_UP_MINOR = 500


def top_up_some(stripe: FakeStripe, customers: int, every: int, now: datetime) -> int:
    """Every `every`-th customer buys credit: a succeeded PaymentIntent, credited to its Stripe balance. Returns
    how many did."""
    topped_up = range(0, customers, every)
    for index in topped_up:
        stripe.add_payment_intent(customer_id(index), TOP_UP_MINOR, created=int(now.timestamp()))
        stripe.adjust_customer_balance(customer_id(index), -TOP_UP_MINOR)
    return len(topped_up)


def billed_totals(stripe: FakeStripe) -> dict[str, Decimal]:
    """What each customer's accepted meter events add up to, in one pass over the fake's events."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    with stripe.lock:
        for event in stripe.meter_events:
            if event.event_name == EVENT_NAME and event.customer is not None and event.value is not None:
                totals[event.customer] += event.value
    return dict(totals)
