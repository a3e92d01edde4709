"""An in-memory, stateful fake of the slice of the Stripe API the reconciler uses.

Serve it with :class:`reconciler_sandbox.httpserver.LoopbackServer` and point stripe-python at it::

    fake = FakeStripe()
    with LoopbackServer(fake) as server:
        client = stripe.StripeClient("sk_test_sandbox", base_addresses={"api": server.url},
                                     max_network_retries=0)

Wire formats follow Stripe's public API (billing meters per the contract subset in
``/work/shared/contracts/stripe-openapi-subset.json``; customers, prices, subscriptions and subscription
items as of API 2025-03-31.basil and later, where the billing period lives on each item). The legacy
usage-record endpoints are only served to requests pinned to an API version older than basil.

Balances (read-only, seeded through helpers): PaymentIntents with their charges, refunds and disputes; paid
invoices with the PaymentIntent each created and the InvoicePayment mapping the two; the customer cash balance
(``customer.balance``, minor units, negative = credit), and billing credit grants with
``/v1/billing/credit_balance_summary``.

The fake serves only the routes something uses (the product, the simulation, the demo and benchmark, or the
sandbox's contract tests): ``tests/sandbox/test_routes.py`` names the user of each.

All timestamps come from ``self.clock()`` (``time.time`` looked up at call time, so freezegun applies).

One module per concern: ``params`` (form decoding, errors, ids), ``state`` (the objects held, pagination),
``catalog`` and ``seeding`` (customers, prices, subscriptions, meters), ``meters``, ``legacy_usage``,
``payments``, ``credits``, ``events`` (thin events, destinations, webhook endpoints), ``meter_event_stream`` (the v2
meter event stream, on a host of its own) and ``fake`` (the HTTP
entry point: authentication, routing, idempotency, rate limits).
"""

from reconciler_sandbox.stripe_fake.events import stripe_signature
from reconciler_sandbox.stripe_fake.fake import FakeStripe
from reconciler_sandbox.stripe_fake.meters import MeterEvent
from reconciler_sandbox.stripe_fake.params import StripeError, parse_stripe_params

__all__ = ["FakeStripe", "MeterEvent", "StripeError", "parse_stripe_params", "stripe_signature"]
