"""Every route the Stripe fake serves, and who needs it.

A route stays only while something other than the fake's own tests calls it: the product (through stripe-python in
``reconciler/upstream/stripe_api.py``), the simulation, the demo or benchmark, or the sandbox's contract tests
(``tests/sandbox/test_fidelity.py``). A new route needs an entry here naming its user, and the entry is checked
cheaply against that user's source: the path appears there as a string (a raw request, or the endpoint a call is
budgeted under), or the SDK resource for it is called (``v1.customers.retrieve(`` for ``GET /v1/customers/{id}``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reconciler_sandbox.stripe_fake import FakeStripe

ROOT = Path(__file__).resolve().parents[2]

ROUTES = {
    "GET /v1/customers/{id}": "product",  # the customer cash balance
    "GET /v1/prices": "contract",  # a second endpoint for the rate-limit contract
    "GET /v1/prices/{id}": "product",  # `reconciler doctor`: the legacy API version is still accepted
    "GET /v1/subscriptions": "product",
    "GET /v1/subscription_items": "product",  # items beyond the 10 embedded in a subscription
    "POST /v1/subscription_items/{id}/usage_records": "product",
    "GET /v1/subscription_items/{id}/usage_record_summaries": "product",
    "GET /v1/billing/meters": "product",
    "GET /v1/billing/meters/{id}/event_summaries": "product",
    "POST /v1/billing/meter_events": "product",
    "GET /v1/payment_intents": "product",
    "GET /v1/payment_intents/{id}": "product",
    "GET /v1/invoices/{id}": "contract",  # a paid invoice's status
    "GET /v1/invoice_payments": "product",
    "GET /v1/refunds": "product",
    "GET /v1/billing/credit_balance_summary": "product",
    "GET /v2/core/events/{id}": "product",
    "GET /v1/webhook_endpoints": "product",
    "GET /v2/core/event_destinations": "product",
    "POST /v2/billing/meter_event_session": "product",  # stripe.meter_events: v2_stream
    "POST /v2/billing/meter_event_stream": "product",  # served by the meter events host
}

SOURCES = {
    "product": [ROOT / "reconciler/upstream/stripe_api.py"],
    "simulation": sorted((ROOT / "tests/simulation").glob("*.py")),
    "demo": [p for p in (ROOT / "sandbox/reconciler_sandbox").rglob("*.py") if "stripe_fake" not in p.parts],
    "contract": [ROOT / "tests/sandbox/test_fidelity.py"],
}


def _source(user: str) -> str:
    """The user's source, each `{placeholder}` in a string written `{id}` as the routes write path ids."""
    text = "\n".join(p.read_text() for p in SOURCES[user])
    return re.sub(r"\{[^{}\"'\n]*\}", "{id}", text)


def _calls(source: str, route: str) -> bool:
    method, path = route.split(" ", 1)
    if f'"{path}"' in source or f'"{route}"' in source:
        return True
    resource = path.strip("/").removesuffix("/{id}").replace("/", ".")
    if method == "POST":
        calls = ["create("]
    elif path.endswith("{id}"):
        calls = ["retrieve("]
    else:  # a list, or a singleton retrieved without an id (the credit balance summary)
        calls = ["list(", "retrieve(params="]
    return any(f".{resource}.{call}" in source for call in calls)


def test_the_fake_serves_exactly_the_listed_routes():
    assert sorted(FakeStripe().routes()) == sorted(ROUTES)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_each_route_is_called_by_its_user(route: str):
    user = ROUTES[route]
    assert user in SOURCES, f"{route}: unknown user {user!r}"
    assert _calls(_source(user), route), f"{route}: not found in the {user}'s source ({SOURCES[user][0]}...)"


def test_every_path_the_product_requests_is_served():
    served = [re.compile(re.sub(r"\\\{id\\\}", "[^/]+", re.escape(r.split(" ", 1)[1]))) for r in ROUTES]
    paths = set(re.findall(r"\"(/v[12]/[^\"\s]*)\"", _source("product")))
    assert paths, "no request paths found in the product's source"
    assert [p for p in sorted(paths) if not any(s.fullmatch(p) for s in served)] == []
