"""Which Stripe webhook events imply work, and what work: a pure function of the event body.

The event body only says *who* to look at; the work itself always re-reads Stripe and OpenMeter, so an event
that is late, out of order or replayed can never make the ledger wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

USAGE_SYNC = "usage_sync"  # an immediate sync of the customer's just-closed period (meter prices)
PLAN_SYNC = "plan_sync"  # an immediate entitlement sync of the customer
BALANCE_SYNC = "balance_sync"  # immediate top-up forwarding for the customer
METER_ERRORS = "meter_errors"  # Stripe's asynchronous meter-event errors, recorded against their items

# Stripe reports meter events it rejected after accepting them only as v2 thin events, to thin-payload event
# destinations: the pushed body has no `data`; the details are fetched with GET /v2/core/events/{id}
# (https://docs.stripe.com/api/v2/core/events/event-types, https://docs.stripe.com/event-destinations).
THIN_METER_ERROR_EVENTS = frozenset({"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"})


@dataclass(frozen=True)
class WebhookWork:
    kind: str
    customer_id: str | None


def event_problem(event: Any) -> str | None:
    """Why a verified body is not an event the inbox can store and read, or None. The signature says who sent it,
    not that it is well formed: a malformed body is the sender's mistake (400), never ours (500)."""
    if not isinstance(event, dict):
        return "not a JSON object"
    if not isinstance(event.get("id"), str) or not event["id"]:
        return "no event id"
    if not isinstance(event.get("type"), str):
        return "no event type"
    if is_thin(event):
        return None  # a thin event has no data: its details are fetched by id
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        return "data.object is not an object"
    if not isinstance(data.get("previous_attributes", {}), dict):
        return "data.previous_attributes is not an object"
    return None


def _object(value: Any) -> dict[str, Any]:
    """`value` if it is an object, else empty: a nested field of an unexpected type implies no work."""
    return value if isinstance(value, dict) else {}


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("id")
    return value if isinstance(value, str) else None


def _has_metered_items(subscription: dict[str, Any]) -> bool:
    items = _object(subscription.get("items")).get("data")
    return isinstance(items, list) and any(
        _object(_object(_object(item).get("price")).get("recurring")).get("usage_type") == "metered" for item in items
    )


PLAN_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    }
)


# What the usage and balance work below reacts to (work_for_event).
USAGE_EVENTS = frozenset({"customer.subscription.updated", "customer.subscription.deleted", "invoice.created"})
BALANCE_EVENTS = frozenset({"payment_intent.succeeded"})


def snapshot_events_needed(*, balances: bool, plans: bool) -> frozenset[str]:
    """The snapshot events the webhook endpoint must subscribe to for the jobs that are on."""
    return USAGE_EVENTS | (BALANCE_EVENTS if balances else frozenset()) | (PLAN_EVENTS if plans else frozenset())


def works_for_event(event: dict[str, Any]) -> list[WebhookWork]:
    """Everything an event implies: usage/top-up work, and an entitlement sync for subscription changes."""
    works = [work] if (work := work_for_event(event)) else []
    if event.get("type") in PLAN_EVENTS:
        customer = _id(((event.get("data") or {}).get("object") or {}).get("customer"))
        if customer:
            works.append(WebhookWork(PLAN_SYNC, customer))
    return works


def is_thin(event: dict[str, Any]) -> bool:
    return event.get("object") == "v2.core.event"


def work_for_event(event: dict[str, Any]) -> WebhookWork | None:
    """The usage, balance or meter-error work an event implies, or None."""
    kind = event.get("type", "")
    if is_thin(event):
        return WebhookWork(METER_ERRORS, None) if kind in THIN_METER_ERROR_EVENTS else None
    data = event.get("data") or {}
    obj = data.get("object") or {}
    if kind == "customer.subscription.updated":
        previous = data.get("previous_attributes") or {}
        new_period = "current_period_start" in previous or "items" in previous
        if new_period and _has_metered_items(obj):
            return WebhookWork(USAGE_SYNC, _id(obj.get("customer")))
        return None
    if kind == "customer.subscription.deleted":
        return WebhookWork(USAGE_SYNC, _id(obj.get("customer"))) if _has_metered_items(obj) else None
    if kind == "invoice.created":
        return WebhookWork(USAGE_SYNC, _id(obj.get("customer"))) if obj.get("customer") else None
    if kind == "payment_intent.succeeded":
        return WebhookWork(BALANCE_SYNC, _id(obj.get("customer"))) if obj.get("customer") else None
    return None


@dataclass(frozen=True)
class MeterEventError:
    identifier: str
    code: str
    message: str


def meter_event_errors(event: dict[str, Any]) -> list[MeterEventError]:
    """The sample errors of a fetched thin meter-error event (error_report_triggered or no_meter_found: both carry
    `data.reason.error_types[].sample_errors[]`), each naming the meter event identifier it concerns."""
    errors = []
    for error_type in (((event.get("data") or {}).get("reason")) or {}).get("error_types") or []:
        code = error_type.get("code", "unknown")
        for sample in error_type.get("sample_errors") or []:
            identifier = ((sample.get("request") or {}).get("identifier")) or ""
            if identifier:
                errors.append(MeterEventError(identifier, code, sample.get("error_message", "")))
    return errors
