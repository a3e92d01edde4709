"""Sample customers, meters and usage for the sandbox: what `reconciler demo` and `reconciler sandbox` serve."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from reconciler_sandbox.moesif_fake import FakeMoesif
from reconciler_sandbox.openmeter_fake import FakeOpenMeter
from reconciler_sandbox.stripe_fake import FakeStripe

# What the sandbox's config maps: Stripe meter event_name / legacy price id -> OpenMeter meter slug.
DEMO_METERS: list[dict[str, str]] = [
    {"stripe": "api_calls", "openmeter": "api_requests", "rounding": "ceil"},
    {"stripe": "storage_gb", "openmeter": "storage_gb", "rounding": "ceil"},
    {"stripe": "price_legacy_sms", "openmeter": "sms_sent", "rounding": "ceil"},
]


# Licensed plan prices -> the app's plans (plans.price_to_plan).
DEMO_PLANS = {"price_sandbox_starter": "starter", "price_sandbox_pro": "pro"}

# Prepaid credit per sandbox customer, in cents: a Stripe credit grant and the Moesif balance it started from.
PREPAID_CREDIT = {"cus_sandbox_acme": 20000, "cus_sandbox_globex": 2500, "cus_sandbox_initech": 1000}


def seed_sandbox(stripe: FakeStripe, openmeter: FakeOpenMeter, moesif: FakeMoesif, now: datetime) -> dict[str, Any]:
    """Three customers in the middle of a monthly period, one per kind of price, with usage so far and prepaid
    credit: a Stripe credit grant each, mirrored by a Moesif subscription (globex's top-up webhook was lost, so
    Moesif never heard of its $25). acme paid its plan's $49 invoice by card: a PaymentIntent that is no top-up."""
    start = (now - timedelta(days=10)).replace(minute=45, second=0, microsecond=0)
    end = start + timedelta(days=30)
    period = {"current_period_start": int(start.timestamp()), "current_period_end": int(end.timestamp())}

    api_calls = stripe.add_meter("api_calls", formula="sum", display_name="API calls")
    storage = stripe.add_meter("storage_gb", formula="last", display_name="Storage (GB, latest)")
    stripe.add_meter("support_tickets", formula="count", display_name="Support tickets")
    api_price = stripe.add_price(meter=api_calls["id"], unit_amount=1)
    storage_price = stripe.add_price(meter=storage["id"], unit_amount=20)
    stripe.add_price(id="price_legacy_sms", unit_amount=5)

    openmeter.add_meter("api_requests", aggregation="SUM", value_property="$.count")
    openmeter.add_meter("storage_gb", aggregation="MAX", value_property="$.gb")
    openmeter.add_meter("sms_sent", aggregation="COUNT", value_property=None)

    customers = {
        "cus_sandbox_acme": api_price["id"],
        "cus_sandbox_globex": storage_price["id"],
        "cus_sandbox_initech": "price_legacy_sms",
    }
    for customer, price in customers.items():
        stripe.add_customer(id=customer, metadata={"tenant": customer.removeprefix("cus_sandbox_")})
        subscription = stripe.add_subscription(customer, [price], **period)
        credit = PREPAID_CREDIT[customer]
        stripe.add_credit_grant(customer, credit, effective_at=int(start.timestamp()))
        forwarded = customer != "cus_sandbox_globex"
        moesif.add_subscription(subscription["id"], customer, current_balance=credit / 100 if forwarded else 0.0)
    stripe.add_payment_intent("cus_sandbox_globex", 2500, created=int((now - timedelta(days=2)).timestamp()))

    for price_id in DEMO_PLANS:
        stripe.add_price(id=price_id, usage_type="licensed", unit_amount=4900)
    for customer, price_id in (
        ("cus_sandbox_acme", "price_sandbox_pro"),
        ("cus_sandbox_globex", "price_sandbox_starter"),
    ):
        plan = stripe.add_subscription(
            customer, [price_id], metadata={"user_id": f"user_{customer.removeprefix('cus_sandbox_')}"}, **period
        )
        if customer == "cus_sandbox_acme":  # its plan's invoice, paid by card: a PaymentIntent, not a top-up
            stripe.pay_invoice(customer, [(price_id, 4900)], subscription=plan["id"], created=int(start.timestamp()))

    add_usage(openmeter, now, hours=10 * 24)
    return {"period_start": start, "period_end": end, "customers": sorted(customers)}


def add_usage(openmeter: FakeOpenMeter, now: datetime, hours: int) -> None:
    """Usage for the sandbox customers over the `hours` before `now`, deterministic."""
    for hour in range(hours, 0, -1):
        at = now - timedelta(hours=hour)
        openmeter.ingest("api_requests", "cus_sandbox_acme", at, 40 + (hour * 7) % 23)
        if hour % 6 == 0:
            openmeter.ingest("storage_gb", "cus_sandbox_globex", at, 12.5 + (hours - hour) / 24)
        if hour % 3 == 0:
            openmeter.ingest("sms_sent", "cus_sandbox_initech", at, 1)
