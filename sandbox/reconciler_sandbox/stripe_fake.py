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
invoices with the PaymentIntent each created and the InvoicePayment mapping the two; the
customer cash balance (``customer.balance``, minor units, negative = credit) with its balance transactions,
and billing credit grants with ``/v1/billing/credit_balance_summary``.

All timestamps come from ``self.clock()`` (``time.time`` looked up at call time, so freezegun applies).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import string
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import httpx

from reconciler_sandbox.httpserver import GLOBAL_LIMITER, FakeService, InjectedFault, Response

__all__ = ["FakeStripe", "MeterEvent", "StripeError", "parse_stripe_params", "stripe_signature"]

LEGACY_USAGE_REMOVED_IN = "2025-03-31"
DEFAULT_API_VERSION = "2026-07-29.dahlia"
_SUBSCRIPTION_STATUSES = (
    "active",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "trialing",
    "paused",
)
_EMBEDDED_ITEMS_LIMIT = 10
_MAX_EXPAND_DEPTH = 4
_IDEMPOTENCY_TTL = 24 * 3600
_IDENTIFIER_WINDOW = 24 * 3600
_MAX_PAST = 35 * 86400
_MAX_FUTURE = 5 * 60
_PAYMENT_INTENT_STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "canceled",
    "succeeded",
)
# PaymentIntent status -> status of the charge it made (statuses absent here have no charge yet).
_CHARGE_STATUS_FOR = {"succeeded": "succeeded", "processing": "pending", "requires_capture": "succeeded"}
_REFUND_STATUSES = ("pending", "requires_action", "succeeded", "failed", "canceled")
_REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "expired_uncaptured_charge")
# Refunds in these states count towards ``charge.amount_refunded`` (failed/canceled ones are reversed).
_REFUND_COUNTED = ("pending", "requires_action", "succeeded")
_CREDIT_GRANT_DEFAULT_PRIORITY = 50


# --------------------------------------------------------------------------------------------------
# Form decoding (Stripe's bracket encoding)


class _Seq(dict):
    """A node created for ``key[]`` / ``key[0]``: becomes a list when finalised."""


_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def _split_key(key: str) -> list[str]:
    m = _KEY_RE.match(key)
    if not m:
        return [key]
    return [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]


def _is_index(part: str) -> bool:
    return part == "" or part.isdigit()


def _finalise(node: Any) -> Any:
    if isinstance(node, _Seq):
        if all(k.isdigit() for k in node):
            return [_finalise(node[k]) for k in sorted(node, key=int)]
        return {k: _finalise(v) for k, v in node.items()}
    if isinstance(node, dict):
        return {k: _finalise(v) for k, v in node.items()}
    return node


def parse_stripe_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode ``a[b][c]=x``, ``expand[0]=x`` and ``expand[]=x`` pairs into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        node: dict[str, Any] = root
        for i, part in enumerate(parts):
            if part == "":
                part = str(len(node))
            if i == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if not isinstance(child, dict):
                child = _Seq() if _is_index(parts[i + 1]) else {}
                node[part] = child
            node = child
    return _finalise(root)


def _query_pairs(query: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, values in query.items() for v in values]


# --------------------------------------------------------------------------------------------------
# Errors and helpers


class StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        return {"error": err}


def _missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", param=param, code="parameter_missing")


def _no_such(kind: str, ident: str, param: str = "id", status: int = 404) -> StripeError:
    return StripeError(status, f"No such {kind}: '{ident}'", param=param, code="resource_missing")


def _int_param(params: Mapping[str, Any], name: str, *, required: bool = False) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise _missing(name)
        return None
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw.strip()):
        raise StripeError(400, f"Invalid integer: {raw}", param=name, code="parameter_invalid_integer")
    return int(raw.strip())


def _json_number(value: Decimal) -> int | float:
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _new_id(prefix: str, n: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    return [str(value)]


@dataclass
class MeterEvent:
    """A meter event as stored by the fake (accepted ones in ``meter_events``)."""

    event_name: str
    identifier: str
    timestamp: int
    created: int
    payload: dict[str, str]
    customer: str | None
    value: Decimal | None
    seq: int
    reason: str | None = None  # set for events in ``rejected_meter_events``
    meter_id: str | None = None  # the active meter of ``event_name`` when the event came in
    unreported: bool = False  # rejected, but left out of every error report (see reject_asynchronously)

    def to_api(self) -> dict[str, Any]:
        return {
            "object": "billing.meter_event",
            "created": self.created,
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }


@dataclass
class _IdempotencyEntry:
    fingerprint: str
    created: float
    response: Response
    request_id: str


def _idempotency_key(method: str, hdrs: Mapping[str, str]) -> str | None:
    return hdrs.get("idempotency-key") if method == "POST" else None


def _fingerprint(method: str, path: str, params: dict[str, Any]) -> str:
    """What a key's later requests must repeat to be answered with its saved response."""
    return json.dumps([method, path, params], sort_keys=True)


def _is_saved_to_key(status: int) -> bool:
    """Whether Stripe saves an answer the endpoint gave to the request's idempotency key: successes, and server
    errors too (https://docs.stripe.com/api/idempotent_requests: "including 500 errors"). The fake's 4xx are
    validation failures, which are not saved: no endpoint began executing."""
    return 200 <= status < 300 or status >= 500


def _reached_the_endpoint(fault: InjectedFault) -> bool:
    """Whether an injected fault stands for an answer of an endpoint that began executing: a 5xx, unless it was
    held back without being applied (a timeout before execution). Dropped connections (status 0) and 429s never
    reached it."""
    held_back_before_execution = fault.delay_seconds > 0 and not fault.after_apply
    return fault.status >= 500 and not held_back_before_execution


# --------------------------------------------------------------------------------------------------
# Thin events (v2): the meter error reports
#
# https://docs.stripe.com/api/v2/core/events/event-types: v1.billing.meter.error_report_triggered ("a Meter has
# invalid async usage events", related object: the meter) and v1.billing.meter.no_meter_found (no related object)
# are thin events: they go only to event destinations with the thin payload style, whose body is the event without
# `data` (https://docs.stripe.com/event-destinations); GET /v2/core/events/{id} returns it with `data`
# (https://docs.stripe.com/api/v2/core/events/object: developer_message_summary, reason.error_count,
# reason.error_types[].code/error_count/sample_errors[].error_message/request.identifier, validation_start/end).

_ENDPOINT_DEFAULT = "endpoint *"
_METER_EVENTS_ENDPOINT = "POST /v1/billing/meter_events"
_METER_EVENTS_LIMITER = "live meter events"
_ROUTE_ID = re.compile(r"\(\?P<\w+>\[\^/\]\+\)")

_THIN_METER_EVENTS = ("v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found")
# The docs call them *sample* errors and give no number: at most this many are named per error type, so a
# client cannot count on every rejected identifier being named (the case worse for it).
_MAX_SAMPLE_ERRORS = 5


def _rfc3339(epoch: float) -> str:
    """v2 timestamps are RFC 3339 strings with milliseconds, e.g. "2024-09-26T17:46:22.134Z"."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch * 1000) % 1000:03d}Z"


def stripe_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header Stripe sends with every event, thin or snapshot: `t=<unix time>,v1=<hex
    HMAC-SHA256 of "<t>.<payload>" under the destination's signing secret>`
    (https://docs.stripe.com/webhooks#verify-manually)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _rejection_message(event: MeterEvent) -> str:
    # The docs show only one sample message ("Customer mapping key stripe_customer_id not found in payload."):
    # these two are the fake's own wording.
    if event.reason == "no_meter":
        return f"No active meter was found for event_name {event.event_name}."
    return f"No customer with id {event.customer} was found."


@dataclass
class EventDestination:
    """A webhook endpoint with the thin payload style, subscribed to `events`, signing with its own secret."""

    url: str
    secret: str
    events: tuple[str, ...] = _THIN_METER_EVENTS
    deliveries: list[tuple[str, int]] = field(default_factory=list)  # (event id, HTTP status; 0: no answer)
    id: str = field(default_factory=lambda: _new_id("ed_test_", 44))
    enabled: bool = True  # a disabled destination is sent nothing
    created: float = 0.0

    def as_served(self, *, with_url: bool) -> dict[str, Any]:
        """The v2 Event Destination object (https://docs.stripe.com/api/v2/core/event-destinations/object). The
        signing secret is never served back; the webhook URL only when the request asked to `include` it, as the
        list's parameters document ("include: Additional fields to include in the response. Currently supports
        webhook_endpoint.url"); retrieving one destination is served the same way here (the docs are silent on
        it: leaving the URL out is the worse case for a reader)."""
        created = datetime.fromtimestamp(self.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "id": self.id,
            "object": "v2.core.event_destination",
            "created": created,
            "description": "",
            "enabled_events": list(self.events),
            "event_payload": "thin",
            "events_from": ["@self"],
            "livemode": False,
            "metadata": {},
            "name": "reconciler",
            "snapshot_api_version": None,
            "status": "enabled" if self.enabled else "disabled",
            "status_details": None,
            "type": "webhook_endpoint",
            "updated": created,
            # The signing secret is never served back (null), as in the documented object.
            "webhook_endpoint": {"signing_secret": None, "url": self.url if with_url else None},  # nosec B105
        }


# --------------------------------------------------------------------------------------------------


class FakeStripe(FakeService):
    """Stateful Stripe fake. See the module docstring; the seeding API returns dicts as served."""

    def __init__(self, api_key: str = "sk_test_sandbox", clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.api_key = api_key
        self.duplicate_identifier_response = "error"  # or "ignore"
        self.default_api_version = DEFAULT_API_VERSION  # used when a request has no Stripe-Version
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("GET", re.compile(r"/v1/customers"), self._h_list_customers),
            ("GET", re.compile(r"/v1/customers/(?P<id>[^/]+)"), self._h_get_customer),
            ("GET", re.compile(r"/v1/prices"), self._h_list_prices),
            ("GET", re.compile(r"/v1/prices/(?P<id>[^/]+)"), self._h_get_price),
            ("GET", re.compile(r"/v1/subscriptions"), self._h_list_subscriptions),
            ("GET", re.compile(r"/v1/subscriptions/(?P<id>[^/]+)"), self._h_get_subscription),
            ("GET", re.compile(r"/v1/subscription_items"), self._h_list_subscription_items),
            ("GET", re.compile(r"/v1/subscription_items/(?P<id>[^/]+)"), self._h_get_subscription_item),
            ("POST", re.compile(r"/v1/subscription_items/(?P<id>[^/]+)/usage_records"), self._h_usage_record),
            (
                "GET",
                re.compile(r"/v1/subscription_items/(?P<id>[^/]+)/usage_record_summaries"),
                self._h_usage_record_summaries,
            ),
            ("GET", re.compile(r"/v1/billing/meters"), self._h_list_meters),
            ("GET", re.compile(r"/v1/billing/meters/(?P<id>[^/]+)"), self._h_get_meter),
            ("GET", re.compile(r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries"), self._h_event_summaries),
            ("POST", re.compile(r"/v1/billing/meter_events"), self._h_create_meter_event),
            (
                "GET",
                re.compile(r"/v1/customers/(?P<id>[^/]+)/balance_transactions"),
                self._h_list_balance_transactions,
            ),
            (
                "GET",
                re.compile(r"/v1/customers/(?P<id>[^/]+)/balance_transactions/(?P<txn>[^/]+)"),
                self._h_get_balance_transaction,
            ),
            ("GET", re.compile(r"/v1/payment_intents"), self._h_list_payment_intents),
            ("GET", re.compile(r"/v1/payment_intents/(?P<id>[^/]+)"), self._h_get_payment_intent),
            ("GET", re.compile(r"/v1/invoices/(?P<id>[^/]+)"), self._h_get_invoice),
            ("GET", re.compile(r"/v1/invoice_payments"), self._h_list_invoice_payments),
            ("GET", re.compile(r"/v1/charges"), self._h_list_charges),
            ("GET", re.compile(r"/v1/charges/(?P<id>[^/]+)"), self._h_get_charge),
            ("GET", re.compile(r"/v1/refunds"), self._h_list_refunds),
            ("GET", re.compile(r"/v1/refunds/(?P<id>[^/]+)"), self._h_get_refund),
            ("GET", re.compile(r"/v1/billing/credit_grants"), self._h_list_credit_grants),
            ("GET", re.compile(r"/v1/billing/credit_grants/(?P<id>[^/]+)"), self._h_get_credit_grant),
            ("GET", re.compile(r"/v1/billing/credit_balance_summary"), self._h_credit_balance_summary),
            ("GET", re.compile(r"/v2/core/events/(?P<id>[^/]+)"), self._h_get_v2_event),
            ("GET", re.compile(r"/v1/webhook_endpoints"), self._h_list_webhook_endpoints),
            ("GET", re.compile(r"/v2/core/event_destinations"), self._h_list_event_destinations),
        ]
        self._init_state()

    # -- state ------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        # Stripe aggregates meter events asynchronously: "aggregated usage in meter event summaries ... might not
        # immediately reflect recently received meter events"
        # (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api). The docs give no bound,
        # and say nothing about legacy usage record summaries; here an event or record created at `created` shows
        # in either summary only from `created + summary_lag_seconds`. 0 (the default, and after `reset`): at once,
        # which is the optimistic end, kept as the default only so that tests of other behaviours need not wait; the
        # summary-lag tests and the fault simulation (three seeds in four) turn a lag on.
        self.summary_lag_seconds: float = 0
        self._seq = 0
        self.customers: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}  # stored without "items"
        self.subscription_items: dict[str, dict[str, Any]] = {}  # stored with "price" as an id
        self._sub_items: dict[str, list[str]] = {}
        self._order: dict[str, int] = {}
        self._subscription_order: tuple[tuple[int, int], list[str]] = ((-1, -1), [])
        self.meter_events: list[MeterEvent] = []
        self.rejected_meter_events: list[MeterEvent] = []
        self._rejections_reported = 0  # rejected_meter_events[:n] are in an error report already
        self._async_rejections: list[tuple[str, bool]] = []  # (code, reported) for the next valid events
        self.v2_events: dict[str, dict[str, Any]] = {}  # thin events as GET /v2/core/events/{id} returns them
        self.thin_events: list[dict[str, Any]] = []  # the pushed (thin) bodies, oldest first
        self.event_destinations: list[EventDestination] = []
        self.webhook_endpoints: dict[str, dict[str, Any]] = {}  # snapshot-payload endpoints, as served
        self._identifiers: dict[str, MeterEvent] = {}
        # item id -> {timestamp: quantity}
        self.usage_records: dict[str, dict[int, int]] = {}
        # item id -> (created, timestamp, action, quantity) of each record, for summaries that lag
        self._usage_record_log: dict[str, list[tuple[float, int, str, int]]] = {}
        self._past_periods: dict[str, list[tuple[int, int]]] = {}  # item id -> periods it rolled over from
        self._idempotency: dict[str, _IdempotencyEntry] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}  # stored with "latest_charge" as an id
        self.charges: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_payments: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.customer_balance_transactions: dict[str, list[dict[str, Any]]] = {}  # customer id -> oldest first
        self.credit_grants: dict[str, dict[str, Any]] = {}
        # grant id -> minor units applied to finalized invoices / held on draft invoices
        self._grant_used: dict[str, int] = {}
        self._grant_held: dict[str, int] = {}

    def reset(self) -> None:
        """Forget all objects, events, idempotency keys, recorded requests and pending faults."""
        with self.lock:
            self._reset_base()
            self._init_state()

    def _now(self) -> int:
        return int(self.clock())

    def _register(self, obj_id: str) -> None:
        self._seq += 1
        self._order[obj_id] = self._seq

    def _newest_first(self, objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(objs, key=lambda o: (o.get("created", 0), self._order.get(o["id"], 0)), reverse=True)

    def _subscriptions_newest_first(self) -> list[dict[str, Any]]:
        """Every subscription, newest first; the order is kept between requests while no subscription is added
        or removed, so that paging through 100,000 of them (`reconciler bench`) does not sort them per page."""
        version = (self._seq, len(self.subscriptions))
        if self._subscription_order[0] != version:
            self._subscription_order = (version, [s["id"] for s in self._newest_first(self.subscriptions.values())])
        return [self.subscriptions[sid] for sid in self._subscription_order[1] if sid in self.subscriptions]

    # -- seeding ----------------------------------------------------------------------------------

    def add_customer(
        self,
        id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        balance: int = 0,
        currency: str | None = "usd",
        *,
        email: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            cid = id or _new_id("cus_", 14)
            customer = {
                "id": cid,
                "object": "customer",
                "address": None,
                "balance": balance,
                "created": self._now(),
                "currency": currency,
                "default_source": None,
                "delinquent": False,
                "description": None,
                "discount": None,
                "email": email,
                "invoice_prefix": hashlib.sha1(cid.encode(), usedforsecurity=False).hexdigest()[:8].upper(),
                "invoice_settings": {
                    "custom_fields": None,
                    "default_payment_method": None,
                    "footer": None,
                    "rendering_options": None,
                },
                "livemode": False,
                "metadata": dict(metadata or {}),
                "name": name,
                "next_invoice_sequence": 1,
                "phone": None,
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": None,
            }
            self.customers[cid] = customer
            self._register(cid)
            self.customer_balance_transactions[cid] = []
            if balance:
                # Stripe records a starting balance as an "initial" balance transaction.
                self._append_balance_transaction(cid, balance, "initial", None)
            return json.loads(json.dumps(customer))

    def add_meter(
        self,
        event_name: str,
        formula: str = "sum",
        status: str = "active",
        event_time_window: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        id: str | None = None,
        *,
        display_name: str | None = None,
    ) -> dict[str, Any]:
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"unknown formula {formula!r}")
        if status not in ("active", "inactive"):
            raise ValueError(f"unknown status {status!r}")
        if event_time_window not in (None, "hour", "day"):
            raise ValueError(f"unknown event_time_window {event_time_window!r}")
        with self.lock:
            mid = id or _new_id("mtr_test_", 24)
            now = self._now()
            meter = {
                "id": mid,
                "object": "billing.meter",
                "created": now,
                "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
                "default_aggregation": {"formula": formula},
                "display_name": display_name or event_name,
                "event_name": event_name,
                "event_time_window": event_time_window,
                "livemode": False,
                "status": status,
                "status_transitions": {"deactivated_at": now if status == "inactive" else None},
                "updated": now,
                "value_settings": {"event_payload_key": value_key},
            }
            self.meters[mid] = meter
            self._register(mid)
            return json.loads(json.dumps(meter))

    def add_price(
        self,
        *,
        meter: str | None = None,
        usage_type: str = "metered",
        interval: str = "month",
        interval_count: int = 1,
        unit_amount: int | None = 10,
        currency: str = "usd",
        id: str | None = None,
        product: str | None = None,
        active: bool = True,
        metadata: Mapping[str, str] | None = None,
        lookup_key: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            pid = id or _new_id("price_", 24)
            price = {
                "id": pid,
                "object": "price",
                "active": active,
                "billing_scheme": "per_unit",
                "created": self._now(),
                "currency": currency,
                "custom_unit_amount": None,
                "livemode": False,
                "lookup_key": lookup_key,
                "metadata": dict(metadata or {}),
                "nickname": None,
                "product": product or _new_id("prod_", 14),
                "recurring": {
                    "interval": interval,
                    "interval_count": interval_count,
                    "meter": meter,
                    "trial_period_days": None,
                    "usage_type": usage_type,
                },
                "tax_behavior": "unspecified",
                "tiers_mode": None,
                "transform_quantity": None,
                "type": "recurring",
                "unit_amount": unit_amount,
                "unit_amount_decimal": None if unit_amount is None else str(unit_amount),
            }
            self.prices[pid] = price
            self._register(pid)
            return json.loads(json.dumps(price))

    def add_subscription(
        self,
        customer: str,
        prices: list[str],
        *,
        current_period_start: int,
        current_period_end: int,
        status: str = "active",
        canceled_at: int | None = None,
        ended_at: int | None = None,
        id: str | None = None,
        created: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if status not in _SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            for p in prices:
                if p not in self.prices:
                    raise KeyError(f"unknown price {p!r}")
            sid = id or _new_id("sub_", 24)
            created = created if created is not None else current_period_start
            currency = self.prices[prices[0]]["currency"] if prices else "usd"
            self.subscriptions[sid] = {
                "id": sid,
                "object": "subscription",
                "application": None,
                "application_fee_percent": None,
                "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
                "billing_cycle_anchor": current_period_start,
                "billing_cycle_anchor_config": None,
                "billing_mode": {"flexible": None, "type": "classic"},
                "billing_thresholds": None,
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": canceled_at,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                "collection_method": "charge_automatically",
                "created": created,
                "currency": currency,
                "customer": customer,
                "days_until_due": None,
                "default_payment_method": None,
                "default_source": None,
                "default_tax_rates": [],
                "description": None,
                "discounts": [],
                "ended_at": ended_at,
                "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
                "latest_invoice": None,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "next_pending_invoice_item_invoice": None,
                "on_behalf_of": None,
                "pause_collection": None,
                "payment_settings": {
                    "payment_method_options": None,
                    "payment_method_types": None,
                    "save_default_payment_method": "off",
                },
                "pending_invoice_item_interval": None,
                "pending_setup_intent": None,
                "pending_update": None,
                "schedule": None,
                "start_date": created,
                "status": status,
                "test_clock": None,
                "transfer_data": None,
                "trial_end": None,
                "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
                "trial_start": None,
            }
            self._register(sid)
            self._sub_items[sid] = []
            for p in prices:
                self._add_item(sid, p, current_period_start, current_period_end, created)
            return self._render_subscription(self.subscriptions[sid], set())

    def _add_item(self, sid: str, price_id: str, start: int, end: int, created: int) -> str:
        iid = _new_id("si_", 14)
        self.subscription_items[iid] = {
            "id": iid,
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": created,
            "current_period_end": end,
            "current_period_start": start,
            "discounts": [],
            "metadata": {},
            "price": price_id,
            "subscription": sid,
            "tax_rates": [],
        }
        self._register(iid)
        self._sub_items[sid].append(iid)
        return iid

    def update_subscription(self, id: str, **fields: Any) -> dict[str, Any]:
        """Overwrite fields of a subscription (status, canceled_at, ended_at, metadata, ...).

        ``current_period_start`` / ``current_period_end`` are applied to every item of the subscription.
        """
        with self.lock:
            sub = self.subscriptions[id]
            start = fields.pop("current_period_start", None)
            end = fields.pop("current_period_end", None)
            if "status" in fields and fields["status"] not in _SUBSCRIPTION_STATUSES:
                raise ValueError(f"unknown subscription status {fields['status']!r}")
            sub.update(fields)
            if "created" in fields:
                self._subscription_order = ((-1, -1), [])  # the listing order changed
            for iid in self._sub_items[id]:
                item = self.subscription_items[iid]
                self._remember_period(item, start, end)
                if start is not None:
                    item["current_period_start"] = start
                if end is not None:
                    item["current_period_end"] = end
            return self._render_subscription(sub, set())

    def _remember_period(self, item: dict[str, Any], start: int | None, end: int | None) -> None:
        """A rollover: the period the item leaves is still summarised (newest first) for legacy usage."""
        if start is not None and start >= item["current_period_end"]:
            self._past_periods.setdefault(item["id"], []).append(
                (item["current_period_start"], item["current_period_end"])
            )

    def set_item_price(self, item_id: str, price: str) -> dict[str, Any]:
        """Move an item to another price (an upgrade or a downgrade)."""
        with self.lock:
            if price not in self.prices:
                raise KeyError(f"unknown price {price!r}")
            item = self.subscription_items[item_id]
            item["price"] = price
            return self._render_item(item)

    def set_item_period(self, item_id: str, start: int, end: int) -> dict[str, Any]:
        with self.lock:
            item = self.subscription_items[item_id]
            self._remember_period(item, start, end)
            item["current_period_start"] = start
            item["current_period_end"] = end
            return self._render_item(item)

    # -- seeding: payments, customer balance, credit grants ---------------------------------------

    def add_payment_intent(
        self,
        customer: str | None,
        amount: int,
        currency: str = "usd",
        *,
        status: str = "succeeded",
        metadata: Mapping[str, str] | None = None,
        created: int | None = None,
        id: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """A PaymentIntent (and, once it has been attempted, its charge): a top-up as Stripe serves it."""
        if status not in _PAYMENT_INTENT_STATUSES:
            raise ValueError(f"unknown payment intent status {status!r}")
        if amount < 1:
            raise ValueError("amount must be a positive integer in minor units")
        with self.lock:
            if customer is not None and customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            pid = id or _new_id("pi_", 24)
            created = created if created is not None else self._now()
            payment_method = _new_id("pm_", 24)
            charge_id: str | None = None
            charge_status = _CHARGE_STATUS_FOR.get(status)
            if charge_status is not None:
                charge_id = _new_id("ch_", 24)
                captured = status == "succeeded"
                self.charges[charge_id] = {
                    "id": charge_id,
                    "object": "charge",
                    "amount": amount,
                    "amount_captured": amount if captured else 0,
                    "amount_refunded": 0,
                    "application": None,
                    "application_fee": None,
                    "application_fee_amount": None,
                    "balance_transaction": _new_id("txn_", 24) if captured else None,
                    "billing_details": {"address": None, "email": None, "name": None, "phone": None},
                    "calculated_statement_descriptor": "SANDBOX",
                    "captured": captured,
                    "created": created,
                    "currency": currency,
                    "customer": customer,
                    "description": description,
                    "disputed": False,
                    "failure_balance_transaction": None,
                    "failure_code": None,
                    "failure_message": None,
                    "fraud_details": {},
                    "livemode": False,
                    "metadata": dict(metadata or {}),
                    "on_behalf_of": None,
                    "outcome": {
                        "network_status": "approved_by_network",
                        "reason": None,
                        "risk_level": "normal",
                        "seller_message": "Payment complete.",
                        "type": "authorized",
                    },
                    "paid": charge_status == "succeeded",
                    "payment_intent": pid,
                    "payment_method": payment_method,
                    "payment_method_details": {
                        "card": {"brand": "visa", "country": "US", "exp_month": 12, "exp_year": 2034, "last4": "4242"},
                        "type": "card",
                    },
                    "receipt_email": None,
                    "receipt_number": None,
                    "receipt_url": None,
                    "refunded": False,
                    "review": None,
                    "shipping": None,
                    "source_transfer": None,
                    "statement_descriptor": None,
                    "statement_descriptor_suffix": None,
                    "status": charge_status,
                    "transfer_data": None,
                    "transfer_group": None,
                }
                self._register(charge_id)
            self.payment_intents[pid] = {
                "id": pid,
                "object": "payment_intent",
                "amount": amount,
                "amount_capturable": amount if status == "requires_capture" else 0,
                "amount_details": {"tip": {}},
                "amount_received": amount if status == "succeeded" else 0,
                "application": None,
                "application_fee_amount": None,
                "automatic_payment_methods": {"allow_redirects": "always", "enabled": True},
                "canceled_at": created if status == "canceled" else None,
                "cancellation_reason": "requested_by_customer" if status == "canceled" else None,
                "capture_method": "automatic_async",
                "client_secret": f"{pid}_secret_{_new_id('', 25)}",
                "confirmation_method": "automatic",
                "created": created,
                "currency": currency,
                "customer": customer,
                "description": description,
                "last_payment_error": None,
                "latest_charge": charge_id,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "next_action": None,
                "on_behalf_of": None,
                "payment_method": payment_method if charge_id else None,
                "payment_method_configuration_details": None,
                "payment_method_options": {},
                "payment_method_types": ["card"],
                "processing": None,
                "receipt_email": None,
                "review": None,
                "setup_future_usage": None,
                "shipping": None,
                "source": None,
                "statement_descriptor": None,
                "statement_descriptor_suffix": None,
                "status": status,
                "transfer_data": None,
                "transfer_group": None,
            }
            self._register(pid)
            return self._render_payment_intent(self.payment_intents[pid], set())

    def open_invoice(
        self,
        customer: str,
        lines: list[tuple[str, int]],
        currency: str = "usd",
        *,
        subscription: str | None = None,
        created: int | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """A finalized, unpaid invoice with one line per ``(price id, amount)``. Since API 2025-03-31 a line's price
        is at ``pricing.price_details.price``
        (https://docs.stripe.com/changelog/basil/2025-03-31/invoice-pricing-configurations)."""
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            created = created if created is not None else self._now()
            total = sum(amount for _, amount in lines)
            invoice_id = id or _new_id("in_", 24)
            self.invoices[invoice_id] = {
                "id": invoice_id,
                "object": "invoice",
                "amount_due": total,
                "amount_paid": 0,
                "amount_remaining": total,
                "created": created,
                "currency": currency,
                "customer": customer,
                "lines": {
                    "object": "list",
                    "data": [
                        {
                            "id": _new_id("il_", 24),
                            "object": "line_item",
                            "amount": amount,
                            "currency": currency,
                            "invoice": invoice_id,
                            "pricing": {"price_details": {"price": price, "product": None}, "type": "price_details"},
                            "quantity": 1,
                        }
                        for price, amount in lines
                    ],
                    "has_more": False,
                    "url": f"/v1/invoices/{invoice_id}/lines",
                },
                "parent": (
                    {"subscription_details": {"subscription": subscription}, "type": "subscription_details"}
                    if subscription
                    else None
                ),
                "status": "open",
                "status_transitions": {"finalized_at": created, "paid_at": None},
            }
            self._register(invoice_id)
            return json.loads(json.dumps(self.invoices[invoice_id]))

    def attach_payment(self, invoice_id: str, payment_intent_id: str, *, created: int | None = None) -> dict[str, Any]:
        """Attach a PaymentIntent to an invoice (https://docs.stripe.com/api/invoices/attach_payment): an
        InvoicePayment maps the two (https://docs.stripe.com/api/invoice-payment/object), created now. "If the
        PaymentIntent's status is already succeeded when it's attached, it's credited to the invoice immediately":
        so a PaymentIntent can succeed first and only later turn out to have paid an invoice. Returns the
        InvoicePayment."""
        with self.lock:
            invoice, intent = self.invoices[invoice_id], self.payment_intents[payment_intent_id]
            created = created if created is not None else self._now()
            paid = intent["status"] == "succeeded"
            payment_id = _new_id("inpay_", 24)
            self.invoice_payments[payment_id] = {
                "id": payment_id,
                "object": "invoice_payment",
                "amount_paid": intent["amount_received"] if paid else None,
                "amount_requested": intent["amount"],
                "created": created,
                "currency": intent["currency"],
                "invoice": invoice_id,
                "is_default": not any(p["invoice"] == invoice_id for p in self.invoice_payments.values()),
                "livemode": False,
                "payment": {"type": "payment_intent", "payment_intent": payment_intent_id},
                "status": "paid" if paid else "open",
                "status_transitions": {"canceled_at": None, "paid_at": created if paid else None},
            }
            self._register(payment_id)
            if paid:
                invoice["amount_paid"] += intent["amount_received"]
                invoice["amount_remaining"] = max(0, invoice["amount_due"] - invoice["amount_paid"])
                if invoice["amount_remaining"] == 0:
                    invoice["status"] = "paid"
                    invoice["status_transitions"]["paid_at"] = created
            return json.loads(json.dumps(self.invoice_payments[payment_id]))

    def pay_invoice(
        self,
        customer: str,
        lines: list[tuple[str, int]],
        currency: str = "usd",
        *,
        subscription: str | None = None,
        created: int | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """An invoice finalized and paid by card, as Stripe bills a subscription period: the invoice creates its
        PaymentIntent (https://docs.stripe.com/billing/billing-apis), which since API 2025-03-31 names no invoice,
        and an InvoicePayment maps one to the other. The docs do not say when that InvoicePayment appears relative
        to the PaymentIntent; here both carry the same ``created`` second, so a listing bounded by the
        PaymentIntent's ``created`` finds it only when it uses that same bound (no slack for the product). Returns
        the invoice, with the id of the PaymentIntent that paid it as ``payment_intent``."""
        with self.lock:
            created = created if created is not None else self._now()
            invoice = self.open_invoice(customer, lines, currency, subscription=subscription, created=created, id=id)
            description = "Subscription update" if subscription else None
            intent = self.add_payment_intent(
                customer, invoice["amount_due"], currency, created=created, description=description
            )
            self.attach_payment(invoice["id"], intent["id"], created=created)
            return {**json.loads(json.dumps(self.invoices[invoice["id"]])), "payment_intent": intent["id"]}

    def dispute_charge(self, payment_intent_id: str) -> dict[str, Any]:
        """Mark the PaymentIntent's latest charge as disputed (``charge.disputed = true``)."""
        with self.lock:
            charge = self._charge_of(payment_intent_id)
            charge["disputed"] = True
            return json.loads(json.dumps(charge))

    def add_refund(
        self,
        payment_intent: str,
        amount: int | None = None,
        *,
        status: str = "succeeded",
        created: int | None = None,
        id: str | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Refund ``amount`` (default: all that is left) of the PaymentIntent's charge."""
        if status not in _REFUND_STATUSES:
            raise ValueError(f"unknown refund status {status!r}")
        if reason is not None and reason not in _REFUND_REASONS:
            raise ValueError(f"unknown refund reason {reason!r}")
        with self.lock:
            charge = self._charge_of(payment_intent)
            remaining = charge["amount_captured"] - charge["amount_refunded"]
            amount = remaining if amount is None else amount
            if amount < 1 or amount > remaining:
                raise ValueError(
                    f"refund amount {amount} is not within 1..{remaining} (charge {charge['id']} has "
                    f"{charge['amount_refunded']} of {charge['amount_captured']} refunded)"
                )
            rid = id or _new_id("re_", 24)
            refund = {
                "id": rid,
                "object": "refund",
                "amount": amount,
                "balance_transaction": _new_id("txn_", 24) if status == "succeeded" else None,
                "charge": charge["id"],
                "created": created if created is not None else self._now(),
                "currency": charge["currency"],
                "destination_details": {"card": {"reference_status": "pending", "type": "refund"}, "type": "card"},
                "metadata": dict(metadata or {}),
                "payment_intent": payment_intent,
                "reason": reason,
                "receipt_number": None,
                "source_transfer_reversal": None,
                "status": status,
                "transfer_reversal": None,
            }
            self.refunds[rid] = refund
            self._register(rid)
            self._update_refunded(charge)
            return json.loads(json.dumps(refund))

    def set_refund_status(self, refund_id: str, status: str) -> dict[str, Any]:
        """Move a refund to another status (a failed or canceled refund no longer counts on the charge)."""
        if status not in _REFUND_STATUSES:
            raise ValueError(f"unknown refund status {status!r}")
        with self.lock:
            refund = self.refunds[refund_id]
            refund["status"] = status
            self._update_refunded(self.charges[refund["charge"]])
            return json.loads(json.dumps(refund))

    def _charge_of(self, payment_intent_id: str) -> dict[str, Any]:
        pi = self.payment_intents[payment_intent_id]
        if pi["latest_charge"] is None:
            raise ValueError(f"payment intent {payment_intent_id!r} (status {pi['status']}) has no charge")
        return self.charges[pi["latest_charge"]]

    def _update_refunded(self, charge: dict[str, Any]) -> None:
        refunded = sum(
            r["amount"] for r in self.refunds.values() if r["charge"] == charge["id"] and r["status"] in _REFUND_COUNTED
        )
        charge["amount_refunded"] = refunded
        charge["refunded"] = refunded > 0 and refunded >= charge["amount_captured"]

    def adjust_customer_balance(
        self,
        customer: str,
        amount: int,
        description: str | None = None,
        *,
        currency: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Append an ``adjustment`` balance transaction (minor units; negative = credit to the customer)."""
        with self.lock:
            cust = self.customers[customer]
            if currency is not None and cust["currency"] not in (None, currency):
                raise ValueError(f"customer {customer!r} has currency {cust['currency']!r}, not {currency!r}")
            if cust["currency"] is None:
                cust["currency"] = currency or "usd"
            return self._append_balance_transaction(customer, amount, "adjustment", description, metadata)

    def _append_balance_transaction(
        self,
        customer: str,
        amount: int,
        type: str,
        description: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        cust = self.customers[customer]
        ending = (cust["balance"] if type != "initial" else 0) + amount
        cust["balance"] = ending
        txn = {
            "id": _new_id("cbtxn_", 24),
            "object": "customer_balance_transaction",
            "amount": amount,
            "checkout_session": None,
            "created": self._now(),
            "credit_note": None,
            "currency": cust["currency"] or "usd",
            "customer": customer,
            "customer_account": None,
            "description": description,
            "ending_balance": ending,
            "invoice": None,
            "livemode": False,
            "metadata": dict(metadata or {}),
            "type": type,
        }
        self.customer_balance_transactions.setdefault(customer, []).append(txn)
        self._register(txn["id"])
        return json.loads(json.dumps(txn))

    def add_credit_grant(
        self,
        customer: str,
        value: int,
        currency: str = "usd",
        *,
        category: str = "paid",
        scope_price_type: str = "metered",
        effective_at: int | None = None,
        expires_at: int | None = None,
        id: str | None = None,
        name: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A billing credit grant of ``value`` minor units (``effective_at`` defaults to now)."""
        if category not in ("paid", "promotional"):
            raise ValueError(f"unknown credit grant category {category!r}")
        if scope_price_type != "metered":
            raise ValueError("credit grants only apply to price_type 'metered'")
        if value < 1:
            raise ValueError("value must be a positive integer in minor units")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            gid = id or _new_id("credgr_test_", 24)
            now = self._now()
            grant = {
                "id": gid,
                "object": "billing.credit_grant",
                "amount": {"monetary": {"currency": currency, "value": value}, "type": "monetary"},
                "applicability_config": {"scope": {"price_type": scope_price_type}},
                "category": category,
                "created": now,
                "customer": customer,
                "customer_account": None,
                "effective_at": effective_at if effective_at is not None else now,
                "expires_at": expires_at,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "name": name,
                "priority": priority if priority is not None else _CREDIT_GRANT_DEFAULT_PRIORITY,
                "test_clock": None,
                "updated": now,
                "voided_at": None,
            }
            self.credit_grants[gid] = grant
            self._grant_used[gid] = 0
            self._grant_held[gid] = 0
            self._register(gid)
            return json.loads(json.dumps(grant))

    def void_credit_grant(self, grant_id: str) -> dict[str, Any]:
        with self.lock:
            grant = self.credit_grants[grant_id]
            now = self._now()
            grant["voided_at"] = now
            grant["updated"] = now
            return json.loads(json.dumps(grant))

    def consume_credit(self, customer: str, value: int, currency: str = "usd", *, draft: bool = False) -> int:
        """Apply up to ``value`` minor units of credit as an invoice would; returns the amount applied.

        Grants are drawn in Stripe's order (priority, soonest expiry, promotional before paid, earliest
        effective). ``draft=True`` holds the credit on a draft invoice: the available balance drops, the
        ledger balance does not.
        """
        if value < 0:
            raise ValueError("value must not be negative")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            now = self._now()
            grants = [
                g
                for g in self.credit_grants.values()
                if g["customer"] == customer
                and g["amount"]["monetary"]["currency"] == currency
                and self._grant_live(g, now)
            ]
            grants.sort(
                key=lambda g: (
                    g["priority"],
                    g["expires_at"] if g["expires_at"] is not None else float("inf"),
                    0 if g["category"] == "promotional" else 1,
                    g["effective_at"],
                    self._order[g["id"]],
                )
            )
            left = value
            for grant in grants:
                take = min(left, self._grant_available(grant))
                if take <= 0:
                    continue
                (self._grant_held if draft else self._grant_used)[grant["id"]] += take
                left -= take
                if left == 0:
                    break
            return value - left

    @staticmethod
    def _grant_live(grant: Mapping[str, Any], now: int) -> bool:
        return (
            grant["voided_at"] is None
            and grant["effective_at"] <= now
            and (grant["expires_at"] is None or now < grant["expires_at"])
        )

    def _grant_available(self, grant: Mapping[str, Any]) -> int:
        gid = grant["id"]
        return grant["amount"]["monetary"]["value"] - self._grant_used[gid] - self._grant_held[gid]

    def _grant_ledger(self, grant: Mapping[str, Any]) -> int:
        return grant["amount"]["monetary"]["value"] - self._grant_used[grant["id"]]

    # -- rendering --------------------------------------------------------------------------------

    def _render_price(self, price_id: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.prices[price_id]))

    def _render_plan(self, price: dict[str, Any]) -> dict[str, Any]:
        rec = price["recurring"]
        return {
            "id": price["id"],
            "object": "plan",
            "active": price["active"],
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"],
            "created": price["created"],
            "currency": price["currency"],
            "interval": rec["interval"],
            "interval_count": rec["interval_count"],
            "livemode": False,
            "metadata": dict(price["metadata"]),
            "meter": rec["meter"],
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": rec["usage_type"],
        }

    def _render_item(self, item: dict[str, Any]) -> dict[str, Any]:
        out = json.loads(json.dumps(item))
        price = self._render_price(item["price"])
        out["price"] = price
        out["plan"] = self._render_plan(price)
        if price["recurring"]["usage_type"] != "metered":
            out["quantity"] = item.get("quantity", 1)
        return dict(sorted(out.items()))

    def _render_subscription(self, sub: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = json.loads(json.dumps(sub))
        item_ids = self._sub_items[sub["id"]]
        items = self._newest_first_items(item_ids)
        out["items"] = {
            "object": "list",
            "data": [self._render_item(self.subscription_items[i]) for i in items[:_EMBEDDED_ITEMS_LIMIT]],
            "has_more": len(items) > _EMBEDDED_ITEMS_LIMIT,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub['id']}",
        }
        if "customer" in expand:
            out["customer"] = json.loads(json.dumps(self.customers[sub["customer"]]))
        return dict(sorted(out.items()))

    def _newest_first_items(self, item_ids: list[str]) -> list[str]:
        # Stripe lists a subscription's items in creation order.
        return sorted(
            item_ids,
            key=lambda i: (self.subscription_items[i]["created"], self._order.get(i, 0)),
        )

    # -- HTTP entry point -------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        method = method.upper()
        hdrs = {k.lower(): v for k, v in headers.items()}
        pairs = _query_pairs(query)
        ctype = hdrs.get("content-type", "")
        if body and (not ctype or ctype.startswith("application/x-www-form-urlencoded")):
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params = parse_stripe_params(pairs)
        response = self._serve(
            method,
            path,
            query,
            hdrs,
            params,
            body,
            lambda: self._handle_locked(method, path, params, hdrs),
            partial(self._finish_fault_answer, method, path, params, hdrs),
        )
        if "Request-Id" not in response[1]:  # a 429 for being over the budget: Stripe stamps every answer
            response = self._with_request_id(response)
        # Stripe echoes the API version the request was served with.
        response[1]["Stripe-Version"] = hdrs.get("stripe-version") or self.default_api_version
        return response

    def _with_request_id(self, response: Response, extra: Mapping[str, str] | None = None) -> Response:
        status, headers, body = response
        headers = dict(headers)
        headers["Request-Id"] = _new_id("req_", 14)
        if extra:
            headers.update(extra)
        return status, headers, body

    def _default_fault_body(self, status: int) -> bytes:
        if status == 429:
            err = StripeError(
                429,
                "Too many requests hit the API too quickly.",
                type="invalid_request_error",
                code="rate_limit",
            )
        else:
            err = StripeError(status, f"Sandbox injected fault ({status}).", type="api_error")
        return json.dumps(err.body()).encode()

    @staticmethod
    def _json(status: int, payload: Any) -> Response:
        return status, {"Content-Type": "application/json"}, json.dumps(payload, indent=2).encode()

    def _authenticate(self, hdrs: Mapping[str, str]) -> None:
        auth = hdrs.get("authorization", "")
        key = ""
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        elif auth.lower().startswith("basic "):
            try:
                key = base64.b64decode(auth[6:].strip()).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
        if not key:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        if key != self.api_key:
            masked = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else "****"
            raise StripeError(401, f"Invalid API Key provided: {masked}", code="api_key_invalid")

    def _handle_locked(self, method: str, path: str, params: dict[str, Any], hdrs: Mapping[str, str]) -> Response:
        try:
            self._authenticate(hdrs)
        except StripeError as e:
            return self._with_request_id(self._json(e.status, e.body()))

        idem_key = _idempotency_key(method, hdrs)
        fingerprint = _fingerprint(method, path, params) if idem_key else ""
        if idem_key:
            self._expire_idempotency_keys()
            entry = self._idempotency.get(idem_key)
            if entry is not None:
                return self._replay(idem_key, entry, fingerprint)

        response = self._with_request_id(self._route(method, path, params, hdrs))
        if idem_key and _is_saved_to_key(response[0]):
            self._save_to_key(idem_key, fingerprint, response)
        if idem_key:
            response[1]["Idempotency-Key"] = idem_key
        return response

    def _expire_idempotency_keys(self) -> None:
        now = self.clock()
        # Keys are kept in the order they were first used: expire from the oldest, not by scanning them all
        # (which made 100,000 POSTs quadratic).
        while self._idempotency:
            oldest = next(iter(self._idempotency))
            if now - self._idempotency[oldest].created <= _IDEMPOTENCY_TTL:
                break
            del self._idempotency[oldest]

    def _replay(self, idem_key: str, entry: _IdempotencyEntry, fingerprint: str) -> Response:
        """The answer saved to `idem_key`, to a request with the same parameters; an error to any other."""
        if entry.fingerprint != fingerprint:
            err = StripeError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were "
                f"first used with. Try using a key other than '{idem_key}' if you meant to execute "
                "a different request.",
                type="idempotency_error",
            )
            return self._with_request_id(self._json(400, err.body()))
        return self._with_request_id(
            entry.response,
            {"Idempotent-Replayed": "true", "Original-Request": entry.request_id, "Idempotency-Key": idem_key},
        )

    def _save_to_key(self, idem_key: str, fingerprint: str, response: Response) -> None:
        status, headers, body = response
        self._idempotency[idem_key] = _IdempotencyEntry(
            fingerprint=fingerprint,
            created=self.clock(),
            response=(status, {k: v for k, v in headers.items() if k != "Request-Id"}, body),
            request_id=headers["Request-Id"],
        )

    def _finish_fault_answer(
        self,
        method: str,
        path: str,
        params: dict[str, Any],
        hdrs: Mapping[str, str],
        fault: InjectedFault,
        response: Response,
        applied: Response | None,
    ) -> Response:
        """Stamp an injected fault's answer, and save it to the request's idempotency key when Stripe would.

        https://docs.stripe.com/api/idempotent_requests: Stripe saves the status code and body of the first
        request made with a key once the endpoint began executing, 500 errors included, and replays them to every
        retry with that key; nothing is saved for a request that failed validation or conflicted with a concurrent
        one ("no API endpoint initiates the execution"). So a dropped connection and a request held back before it
        was applied (a timeout before execution) save nothing. The docs do not mention 429s: the rate limiter
        answers before any endpoint runs (and stripe-python retries a 429 under the same key), so they are not
        saved either. The docs are silent on whether a 5xx can come from before the endpoint began executing, and on
        what is saved for a request applied but answered after its client gave up: every other injected 5xx is
        saved (a timeout after applying included), the case worse for a client (only a fresh key gets past it)."""
        response = self._with_request_id(response)
        idem_key = _idempotency_key(method, hdrs)
        if idem_key and _reached_the_endpoint(fault):
            self._expire_idempotency_keys()
            if self._key_is_free_for(idem_key, applied):
                self._save_to_key(idem_key, _fingerprint(method, path, params), response)
        return response

    def _key_is_free_for(self, idem_key: str, applied: Response | None) -> bool:
        """False when `idem_key` holds an earlier request's answer: the first answer is the one kept. An answer
        saved while this very request was applied is replaced by its fault's."""
        entry = self._idempotency.get(idem_key)
        return entry is None or (applied is not None and entry.request_id == applied[1].get("Request-Id"))

    def _route(self, method: str, path: str, params: dict[str, Any], hdrs: Mapping[str, str]) -> Response:
        for route_method, pattern, handler in self._routes:
            m = pattern.fullmatch(path)
            if m and route_method == method:
                try:
                    return self._json(200, handler(params, hdrs, **m.groupdict()))
                except StripeError as e:
                    return self._json(e.status, e.body())
        err = StripeError(404, f"Unrecognized request URL ({method}: {path}).")
        return self._json(404, err.body())

    # -- list helpers -----------------------------------------------------------------------------

    def _paginate(
        self,
        objs: list[dict[str, Any]],
        params: Mapping[str, Any],
        url: str,
        kind: str,
        render: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        limit = _int_param(params, "limit")
        if limit is None:
            limit = 10
        if limit < 1 or limit > 100:
            raise StripeError(
                400,
                "Invalid limit: must be between 1 and 100.",
                param="limit",
                code="parameter_invalid_integer",
            )
        ids = [o["id"] for o in objs]
        starting_after = params.get("starting_after")
        ending_before = params.get("ending_before")
        if starting_after:
            if starting_after not in ids:
                raise _no_such(kind, starting_after, param="starting_after", status=400)
            window = objs[ids.index(starting_after) + 1 :]
            page, has_more = window[:limit], len(window) > limit
        elif ending_before:
            if ending_before not in ids:
                raise _no_such(kind, ending_before, param="ending_before", status=400)
            window = objs[: ids.index(ending_before)]
            page, has_more = window[-limit:], len(window) > limit
        else:
            page, has_more = objs[:limit], len(objs) > limit
        data = [render(o) if render else json.loads(json.dumps(o)) for o in page]
        return {"object": "list", "data": data, "has_more": has_more, "url": url}

    @staticmethod
    def _expand(params: Mapping[str, Any], allowed: set[str]) -> set[str]:
        requested = _as_list(params.get("expand"))
        for path in requested:
            if len(path.split(".")) > _MAX_EXPAND_DEPTH:
                raise StripeError(
                    400,
                    f"You cannot expand more than {_MAX_EXPAND_DEPTH} levels of a property. Property: {path}",
                    param="expand",
                )
            if path not in allowed:
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
        return set(requested)

    # -- customers & prices -----------------------------------------------------------------------

    def _h_list_customers(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = self._newest_first(self.customers.values())
        if params.get("email"):
            objs = [c for c in objs if c["email"] == params["email"]]
        return self._paginate(objs, params, "/v1/customers", "customer")

    def _h_get_customer(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.customers:
            raise _no_such("customer", id)
        return json.loads(json.dumps(self.customers[id]))

    def _h_list_prices(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = self._newest_first(self.prices.values())
        return self._paginate(objs, params, "/v1/prices", "price")

    def _h_get_price(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.prices:
            raise _no_such("price", id)
        return self._render_price(id)

    # -- subscriptions ----------------------------------------------------------------------------

    def _h_list_subscriptions(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(
            params,
            {"data.customer", "data.items", "data.items.data", "data.items.data.price"},
        )
        status = params.get("status")
        if status is not None and status not in (*_SUBSCRIPTION_STATUSES, "all", "ended"):
            raise StripeError(
                400,
                f"Invalid status: must be one of {', '.join((*_SUBSCRIPTION_STATUSES, 'ended', 'all'))}",
                param="status",
            )
        subs = self._subscriptions_newest_first()
        if status is None:
            subs = [s for s in subs if s["status"] not in ("canceled", "incomplete_expired")]
        elif status == "ended":
            subs = [s for s in subs if s["status"] in ("canceled", "incomplete_expired")]
        elif status != "all":
            subs = [s for s in subs if s["status"] == status]
        customer = params.get("customer")
        if customer:
            subs = [s for s in subs if s["customer"] == customer]
        price = params.get("price")
        if price:
            subs = [
                s for s in subs if any(self.subscription_items[i]["price"] == price for i in self._sub_items[s["id"]])
            ]
        cust_expand = {"customer"} if "data.customer" in expand else set()
        return self._paginate(
            subs,
            params,
            "/v1/subscriptions",
            "subscription",
            lambda s: self._render_subscription(s, cust_expand),
        )

    def _h_get_subscription(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        expand = self._expand(params, {"customer", "items", "items.data", "items.data.price"})
        if id not in self.subscriptions:
            raise _no_such("subscription", id)
        return self._render_subscription(self.subscriptions[id], {"customer"} & expand)

    def _h_list_subscription_items(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, {"data.price"})
        sid = params.get("subscription")
        if not sid:
            raise _missing("subscription")
        if sid not in self.subscriptions:
            raise _no_such("subscription", sid, param="subscription", status=400)
        items = [self.subscription_items[i] for i in self._newest_first_items(self._sub_items[sid])]
        return self._paginate(
            items,
            params,
            f"/v1/subscription_items?subscription={sid}",
            "subscription item",
            self._render_item,
        )

    def _h_get_subscription_item(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, {"price"})
        if id not in self.subscription_items:
            raise _no_such("subscription item", id)
        return self._render_item(self.subscription_items[id])

    # -- billing meters ---------------------------------------------------------------------------

    def _h_list_meters(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        status = params.get("status")
        if status is not None and status not in ("active", "inactive"):
            raise StripeError(400, "Invalid status: must be one of active, inactive", param="status")
        meters = [m for m in self.meters.values() if status is None or m["status"] == status]
        return self._paginate(self._newest_first(meters), params, "/v1/billing/meters", "billing meter")

    def _h_get_meter(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.meters:
            raise _no_such("billing meter", id)
        return json.loads(json.dumps(self.meters[id]))

    def _active_meter_for(self, event_name: str) -> dict[str, Any] | None:
        for meter in self.meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    def _h_create_meter_event(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        allowed = {"event_name", "payload", "identifier", "timestamp", "expand"}
        for key in params:
            if key not in allowed:
                raise StripeError(400, f"Received unknown parameter: {key}", param=key, code="parameter_unknown")
        event_name = params.get("event_name")
        if not event_name:
            raise _missing("event_name")
        if not isinstance(event_name, str) or len(event_name) > 100:
            raise StripeError(
                400,
                "Invalid event_name: must be at most 100 characters",
                param="event_name",
                code="parameter_invalid_string",
            )
        payload = params.get("payload")
        if payload is None or payload == "":
            raise _missing("payload")
        if not isinstance(payload, dict):
            raise StripeError(400, "Invalid object", param="payload", code="parameter_invalid_object")
        for k, v in payload.items():
            if not isinstance(v, str):
                raise StripeError(400, "Invalid string: payload values must be strings", param=f"payload[{k}]")
        identifier = params.get("identifier")
        if identifier is not None and (not isinstance(identifier, str) or identifier == "" or len(identifier) > 100):
            raise StripeError(
                400,
                "Invalid identifier: must be between 1 and 100 characters",
                param="identifier",
                code="parameter_invalid_string",
            )
        now = self._now()
        timestamp = _int_param(params, "timestamp")
        if timestamp is None:
            timestamp = now
        if timestamp < now - _MAX_PAST:
            raise StripeError(
                400,
                "The timestamp for this meter event is too far in the past: meter events must have a "
                "timestamp within the past 35 days.",
                param="timestamp",
                code="timestamp_too_far_in_past",
            )
        if timestamp > now + _MAX_FUTURE:
            raise StripeError(
                400,
                "The timestamp for this meter event is too far in the future: meter events must have a "
                "timestamp at most 5 minutes in the future.",
                param="timestamp",
                code="timestamp_in_future",
            )
        meter = self._active_meter_for(event_name)
        customer: str | None = None
        value: Decimal | None = None
        if meter is not None:
            ckey = meter["customer_mapping"]["event_payload_key"]
            vkey = meter["value_settings"]["event_payload_key"]
            if ckey not in payload:
                raise StripeError(
                    400,
                    f"The payload is missing the customer mapping key `{ckey}`.",
                    param=f"payload[{ckey}]",
                    code="parameter_missing",
                )
            customer = payload[ckey]
            if meter["default_aggregation"]["formula"] != "count" or vkey in payload:
                if vkey not in payload:
                    raise StripeError(
                        400,
                        f"The payload is missing the value key `{vkey}`.",
                        param=f"payload[{vkey}]",
                        code="parameter_missing",
                    )
                value = _parse_value(payload[vkey], f"payload[{vkey}]")
            else:
                value = Decimal(1)
        else:
            customer = payload.get("stripe_customer_id")
            raw = payload.get("value")
            if raw is not None:
                try:
                    value = _parse_value(raw, "payload[value]")
                except StripeError:
                    value = None

        if identifier is not None:
            previous = self._identifiers.get(identifier)
            if previous is not None and now - previous.created < _IDENTIFIER_WINDOW:
                if self.duplicate_identifier_response == "ignore":
                    return previous.to_api()
                # Stripe's docs promise uniqueness "within a rolling period of at least 24 hours"
                # (https://docs.stripe.com/api/billing/meter-event/create) but are silent on the refusal; this is
                # the answer seen in the wild (shared/api-notes.md): no `code`, only the message names the cause.
                raise StripeError(400, f"An event already exists with identifier {identifier}.")
        else:
            identifier = str(uuid.uuid4())

        self._seq += 1
        event = MeterEvent(
            event_name=event_name,
            identifier=identifier,
            timestamp=timestamp,
            created=now,
            payload=dict(payload),
            customer=customer,
            value=value,
            seq=self._seq,
        )
        if meter is None:
            event.reason = "no_meter"
            self.rejected_meter_events.append(event)
        elif customer not in self.customers:
            event.reason = "meter_event_customer_not_found"
            event.meter_id = meter["id"]
            self.rejected_meter_events.append(event)
        elif self._async_rejections:
            event.reason, reported = self._async_rejections.pop(0)
            event.meter_id = meter["id"]
            event.unreported = not reported
            self.rejected_meter_events.append(event)
        else:
            self.meter_events.append(event)
        self._identifiers[identifier] = event
        return event.to_api()

    # -- Stripe's limiters ---------------------------------------------------------------------------

    def limit_like_stripe(self, *, live: bool, window: float = 1.0) -> None:
        """Answer 429 as Stripe's limiters would (https://docs.stripe.com/rate-limits): a global limit of 100
        operations/s in live mode, 25 in a sandbox; 25/s per endpoint, each named operation being one endpoint
        whatever ids its path holds; and, live only, meter events limited apart at 1,000/s, outside the global
        limit (in a sandbox they count against it). Windows are one second; the docs do not say how Stripe
        measures a second, so the fake counts any rolling second, the stricter reading. (A contract test may stretch
        the `window`, so that a slow machine cannot spread its burst over two.)"""
        with self.lock:
            self.budgets = {GLOBAL_LIMITER: (100 if live else 25, window), _ENDPOINT_DEFAULT: (25, window)}
            if live:
                self.budgets[_METER_EVENTS_LIMITER] = (1000, window)

    def _limiters(self, method: str, path: str) -> list[str]:
        endpoint = self._endpoint_of(method, path)
        if endpoint == _METER_EVENTS_ENDPOINT and _METER_EVENTS_LIMITER in self.budgets:
            return [_METER_EVENTS_LIMITER]
        return [GLOBAL_LIMITER, f"endpoint {endpoint}"]

    def _budget_of(self, limiter: str) -> tuple[int, float] | None:
        budget = self.budgets.get(limiter)
        if budget is None and limiter.startswith("endpoint ") and limiter != _ENDPOINT_DEFAULT:
            return self.budgets.get(_ENDPOINT_DEFAULT)
        return budget

    def _endpoint_of(self, method: str, path: str) -> str:
        """The named operation a request is, its ids written `{id}` (`GET /v1/customers/{id}`)."""
        for route_method, pattern, _ in self._routes:
            if route_method == method and pattern.fullmatch(path):
                return f"{method} {_ROUTE_ID.sub('{id}', pattern.pattern)}"
        return f"{method} {path}"

    def reject_asynchronously(
        self, count: int = 1, code: str = "meter_event_customer_not_found", *, reported: bool = True
    ) -> None:
        """The next `count` valid meter events are accepted (200) and then rejected, as Stripe's asynchronous
        validation may (https://docs.stripe.com/api/v2/core/events/event-types: "a Meter has invalid async usage
        events"): they never count in summaries or invoices. Stripe does not document which accepted events can
        fail later, nor whether a resend of the same value fails again; the fake lets any event fail once (a
        customer mapping seen late, say), the worse case for a client, which must notice and resend. Error reports
        name rejected events only by sample; `reported=False` leaves these out of every report, as a lost or
        truncated report would, so only a read-back of the summary can find them."""
        with self.lock:
            self._async_rejections.extend([(code, reported)] * count)

    # -- thin events: meter error reports ------------------------------------------------------------

    def add_event_destination(
        self, url: str, secret: str, events: Iterable[str] = _THIN_METER_EVENTS, *, enabled: bool = True
    ) -> EventDestination:
        """Register a thin-payload webhook destination; `flush_meter_error_reports` POSTs to it (when enabled)."""
        destination = EventDestination(url, secret, tuple(events), enabled=enabled, created=self.clock())
        with self.lock:
            self.event_destinations.append(destination)
        return destination

    def add_webhook_endpoint(self, url: str, events: Iterable[str], *, status: str = "enabled") -> dict[str, Any]:
        """A snapshot-payload webhook endpoint as `GET /v1/webhook_endpoints` lists it
        (https://docs.stripe.com/api/webhook_endpoints/object). The fake delivers nothing to it: tests sign and
        post snapshot events themselves."""
        endpoint = {
            "id": _new_id("we_"),
            "object": "webhook_endpoint",
            "api_version": None,
            "application": None,
            "created": int(self.clock()),
            "description": None,
            "enabled_events": list(events),
            "livemode": False,
            "metadata": {},
            "status": status,
            "url": url,
        }
        with self.lock:
            self._seq += 1
            self._order[endpoint["id"]] = self._seq
            self.webhook_endpoints[endpoint["id"]] = endpoint
        return json.loads(json.dumps(endpoint))

    def _h_list_webhook_endpoints(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        # https://docs.stripe.com/api/webhook_endpoints/list: a v1 list, newest first; `secret` is "only returned
        # at creation", so never here.
        self._expand(params, set())
        endpoints = self._newest_first(self.webhook_endpoints.values())
        return self._paginate(endpoints, params, "/v1/webhook_endpoints", "webhook endpoint")

    def _h_list_event_destinations(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        # https://docs.stripe.com/api/v2/core/event-destinations/list: a v2 list (`data`, `next_page_url`,
        # `previous_page_url`), `limit` the page size; the docs give no default or bound for it, and no order: the
        # fake serves oldest first, 20 to a page by default, and refuses a limit outside 1..100 as v1 lists do.
        limit = _int_param(params, "limit")
        limit = 20 if limit is None else limit
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100.", param="limit")
        start = _int_param(params, "page") or 0  # the fake's own page token, opaque to a client
        with_url = "webhook_endpoint.url" in _as_list(params.get("include"))
        page = self.event_destinations[start : start + limit]
        more = start + limit < len(self.event_destinations)
        return {
            "data": [d.as_served(with_url=with_url) for d in page],
            # Stripe's page URL carries the request's parameters: a client follows it as given.
            "next_page_url": (
                f"/v2/core/event_destinations?limit={limit}&page={start + limit}"
                + ("&include[0]=webhook_endpoint.url" if with_url else "")
                if more
                else None
            ),
            "previous_page_url": None,
        }

    def flush_meter_error_reports(self) -> list[dict[str, Any]]:
        """Turn the meter events rejected since the last flush into thin events, deliver them to the registered
        destinations, and return the pushed bodies.

        Stripe validates meter events asynchronously and reports the invalid ones in batches, one event per meter
        and window (`validation_start`..`validation_end`). The docs do not say how often: their example covers a
        10-second window. The fake reports whenever this is called (tests and the simulation choose the moment),
        one error_report_triggered per meter, and one no_meter_found for events that matched no active meter."""
        with self.lock:
            pending = [e for e in self.rejected_meter_events[self._rejections_reported :] if not e.unreported]
            self._rejections_reported = len(self.rejected_meter_events)
            groups: dict[tuple[str, str | None], list[MeterEvent]] = {}
            for rejected in pending:
                if rejected.reason == "no_meter":
                    groups.setdefault(("v1.billing.meter.no_meter_found", None), []).append(rejected)
                else:
                    groups.setdefault(("v1.billing.meter.error_report_triggered", rejected.meter_id), []).append(
                        rejected
                    )
            pushed = [self._thin_meter_event(kind, meter_id, events) for (kind, meter_id), events in groups.items()]
            destinations = list(self.event_destinations)
        for body in pushed:  # outside the lock: the receiver may call back (GET /v2/core/events/{id})
            for destination in destinations:
                if destination.enabled and body["type"] in destination.events:
                    destination.deliveries.append((body["id"], self._post_thin_event(destination, body)))
        return pushed

    def _thin_meter_event(self, kind: str, meter_id: str | None, events: list[MeterEvent]) -> dict[str, Any]:
        now = self.clock()
        event_id = _new_id("evt_test_", 46)
        by_code: dict[str, list[MeterEvent]] = {}
        for rejected in events:
            by_code.setdefault(rejected.reason or "unknown", []).append(rejected)
        thin: dict[str, Any] = {
            "id": event_id,
            "object": "v2.core.event",
            "type": kind,
            "created": _rfc3339(now),
            "livemode": False,
            "context": None,
            "reason": None,
        }
        if meter_id is not None:  # no_meter_found has no related object: there is no meter to name
            thin["related_object"] = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"}
        count = len(events)
        full = {
            **thin,
            "data": {
                "developer_message_summary": f"There {'is' if count == 1 else 'are'} {count} invalid "
                f"event{'' if count == 1 else 's'}",
                "reason": {
                    "error_count": count,
                    "error_types": [
                        {
                            "code": code,
                            "error_count": len(of_code),
                            "sample_errors": [
                                {"error_message": _rejection_message(e), "request": {"identifier": e.identifier}}
                                for e in of_code[:_MAX_SAMPLE_ERRORS]
                            ],
                        }
                        for code, of_code in by_code.items()
                    ],
                },
                "validation_start": _rfc3339(min(e.created for e in events)),
                "validation_end": _rfc3339(now),
            },
        }
        self.v2_events[event_id] = full
        self.thin_events.append(thin)
        return json.loads(json.dumps(thin))

    def _post_thin_event(self, destination: EventDestination, body: dict[str, Any]) -> int:
        """One delivery attempt (Stripe retries failures for days; tests redeliver by hand if they need to)."""
        payload = json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json",
            "Stripe-Signature": stripe_signature(payload, destination.secret, int(self.clock())),
        }
        try:
            return httpx.post(destination.url, content=payload, headers=headers, timeout=10).status_code
        except httpx.HTTPError:
            return 0

    def _h_get_v2_event(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        event = self.v2_events.get(id)
        if event is None:
            # https://docs.stripe.com/api/v2/core/events/retrieve documents no error body, and we found no v2
            # not-found example: this is v1's shape (`{"error": {"type", "code", "message"}}`), which the SDK's
            # v2 error path falls back to, answered with 404.
            raise StripeError(404, f"No such event: '{id}'", code="resource_missing")
        return json.loads(json.dumps(event))

    def _summarized_events(self) -> list[MeterEvent]:
        """The accepted events Stripe's summaries show by now (see summary_lag_seconds)."""
        visible_from = self.clock() - self.summary_lag_seconds
        return [e for e in self.meter_events if e.created <= visible_from]

    def _aggregate(
        self, meter: Mapping[str, Any], customer: str, start: int, end: int, events: Iterable[MeterEvent] | None = None
    ) -> Decimal:
        """The meter's aggregate over `events` (default: every accepted event, as the invoice will bill them)."""
        events = [
            e
            for e in (self.meter_events if events is None else events)
            if e.event_name == meter["event_name"] and e.customer == customer and start <= e.timestamp < end
        ]
        window = meter.get("event_time_window")
        if window:
            size = 3600 if window == "hour" else 86400
            newest: dict[int, MeterEvent] = {}
            for e in events:
                key = e.timestamp // size
                cur = newest.get(key)
                if cur is None or (e.created, e.seq) > (cur.created, cur.seq):
                    newest[key] = e
            events = list(newest.values())
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return Decimal(len(events))
        if formula == "last":
            if not events:
                return Decimal(0)
            latest = max(events, key=lambda e: (e.timestamp, e.created, e.seq))
            return latest.value or Decimal(0)
        return sum((e.value or Decimal(0) for e in events), Decimal(0))

    def _h_event_summaries(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        meter = self.meters.get(id)
        if meter is None:
            raise _no_such("billing meter", id)
        customer = params.get("customer")
        if not customer:
            raise _missing("customer")
        start = _int_param(params, "start_time", required=True)
        end = _int_param(params, "end_time", required=True)
        assert start is not None and end is not None
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise StripeError(
                    400,
                    f"Invalid {name}: must be aligned with minute boundaries.",
                    param=name,
                    code="parameter_invalid_integer",
                )
        if start >= end:
            raise StripeError(400, "start_time must be before end_time.", param="start_time")
        # https://docs.stripe.com/api/billing/meter-event-summary/list documents minute-aligned bounds but not
        # what an end_time in the future does: refused here, the answer worse for a client that sends one.
        if end > self._now():
            raise StripeError(400, "Invalid end_time: must not be in the future.", param="end_time")
        grouping = params.get("value_grouping_window")
        if grouping is not None and grouping not in ("hour", "day"):
            raise StripeError(
                400, "Invalid value_grouping_window: must be one of day, hour", param="value_grouping_window"
            )
        if customer not in self.customers:
            raise _no_such("customer", customer, param="customer", status=400)
        shown = self._summarized_events()

        def summary(s: int, e: int, value: Decimal) -> dict[str, Any]:
            digest = hashlib.sha1(f"{id}|{customer}|{s}|{e}".encode(), usedforsecurity=False).hexdigest()
            return {
                "id": f"mtrusg_test_{digest}",
                "object": "billing.meter_event_summary",
                "aggregated_value": _json_number(value),
                "end_time": e,
                "livemode": False,
                "meter": id,
                "start_time": s,
            }

        if grouping is None:
            summaries = [summary(start, end, self._aggregate(meter, customer, start, end, shown))]
        else:
            size = 3600 if grouping == "hour" else 86400
            for name, value in (("start_time", start), ("end_time", end)):
                if value % size:
                    raise StripeError(
                        400,
                        f"Invalid {name}: with value_grouping_window={grouping} it must be aligned with "
                        f"{'hour' if grouping == 'hour' else 'UTC day'} boundaries.",
                        param=name,
                    )
            summaries = []
            with_data = {
                e.timestamp // size
                for e in shown
                if e.event_name == meter["event_name"] and e.customer == customer and start <= e.timestamp < end
            }
            for bucket in sorted(with_data, reverse=True):  # newest window first, like Stripe
                s, e = bucket * size, (bucket + 1) * size
                summaries.append(summary(s, e, self._aggregate(meter, customer, s, e, shown)))
        return self._paginate(summaries, params, f"/v1/billing/meters/{id}/event_summaries", "meter event summary")

    # -- payments, refunds, customer balance ------------------------------------------------------

    def _render_payment_intent(self, pi: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = json.loads(json.dumps(pi))
        if "latest_charge" in expand and pi["latest_charge"] is not None:
            out["latest_charge"] = json.loads(json.dumps(self.charges[pi["latest_charge"]]))
        return out

    def _h_list_payment_intents(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(params, {"data.latest_charge"})
        objs = list(self.payment_intents.values())
        customer = params.get("customer")
        if customer:
            objs = [o for o in objs if o["customer"] == customer]
        objs = _filter_created(objs, params)
        charge_expand = {"latest_charge"} if "data.latest_charge" in expand else set()
        return self._paginate(
            self._newest_first(objs),
            params,
            "/v1/payment_intents",
            "payment_intent",
            lambda o: self._render_payment_intent(o, charge_expand),
        )

    def _h_get_payment_intent(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        expand = self._expand(params, {"latest_charge"})
        if id not in self.payment_intents:
            raise _no_such("payment_intent", id, param="intent")
        return self._render_payment_intent(self.payment_intents[id], expand)

    def _h_get_invoice(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        """https://docs.stripe.com/api/invoices/retrieve (lines as of API 2025-03-31; see open_invoice)."""
        self._expand(params, set())
        if id not in self.invoices:
            raise _no_such("invoice", id, param="invoice")
        return json.loads(json.dumps(self.invoices[id]))

    def _render_invoice_payment(self, payment: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = json.loads(json.dumps(payment))
        if "invoice" in expand:
            out["invoice"] = json.loads(json.dumps(self.invoices[payment["invoice"]]))
        return out

    def _h_list_invoice_payments(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        """https://docs.stripe.com/api/invoice-payment/list: filters ``invoice``, ``payment[type]``,
        ``payment[payment_intent]``, ``status`` and ``created``. The docs list ``payment.type`` as required within
        ``payment``; a filter by PaymentIntent without it is refused here, as the stricter reading."""
        expand = self._expand(params, {"data.invoice"})
        objs = list(self.invoice_payments.values())
        payment = params.get("payment")
        if payment not in (None, ""):
            if not isinstance(payment, dict):
                raise StripeError(400, "Invalid object", param="payment", code="parameter_invalid_object")
            kind = payment.get("type")
            if not kind:
                raise _missing("payment[type]")
            if kind not in ("payment_intent", "payment_record"):
                raise StripeError(
                    400, "Invalid payment[type]: must be one of payment_intent or payment_record", param="payment[type]"
                )
            objs = [o for o in objs if o["payment"]["type"] == kind]
            if payment.get("payment_intent"):
                objs = [o for o in objs if o["payment"].get("payment_intent") == payment["payment_intent"]]
        for name in ("invoice", "status"):
            if params.get(name):
                objs = [o for o in objs if o[name] == params[name]]
        objs = _filter_created(objs, params)
        invoice_expand = {"invoice"} if "data.invoice" in expand else set()
        return self._paginate(
            self._newest_first(objs),
            params,
            "/v1/invoice_payments",
            "invoice_payment",
            lambda o: self._render_invoice_payment(o, invoice_expand),
        )

    def _h_list_charges(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = list(self.charges.values())
        for name in ("customer", "payment_intent"):
            if params.get(name):
                objs = [o for o in objs if o[name] == params[name]]
        objs = _filter_created(objs, params)
        return self._paginate(self._newest_first(objs), params, "/v1/charges", "charge")

    def _h_get_charge(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.charges:
            raise _no_such("charge", id, param="charge")
        return json.loads(json.dumps(self.charges[id]))

    def _h_list_refunds(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = list(self.refunds.values())
        for name in ("payment_intent", "charge"):
            if params.get(name):
                objs = [o for o in objs if o[name] == params[name]]
        objs = _filter_created(objs, params)
        return self._paginate(self._newest_first(objs), params, "/v1/refunds", "refund")

    def _h_get_refund(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.refunds:
            raise _no_such("refund", id, param="refund")
        return json.loads(json.dumps(self.refunds[id]))

    def _h_list_balance_transactions(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.customers:
            raise _no_such("customer", id)
        objs = _filter_created(self.customer_balance_transactions.get(id, []), params)
        return self._paginate(
            self._newest_first(objs),
            params,
            f"/v1/customers/{id}/balance_transactions",
            "customer balance transaction",
        )

    def _h_get_balance_transaction(
        self, params: dict[str, Any], hdrs: Mapping[str, str], id: str, txn: str
    ) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.customers:
            raise _no_such("customer", id)
        for t in self.customer_balance_transactions.get(id, []):
            if t["id"] == txn:
                return json.loads(json.dumps(t))
        raise _no_such("customer balance transaction", txn)

    # -- billing credits --------------------------------------------------------------------------

    def _h_list_credit_grants(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = list(self.credit_grants.values())
        customer = params.get("customer")
        if customer:
            if customer not in self.customers:
                raise _no_such("customer", customer, param="customer", status=400)
            objs = [g for g in objs if g["customer"] == customer]
        return self._paginate(self._newest_first(objs), params, "/v1/billing/credit_grants", "billing.credit_grant")

    def _h_get_credit_grant(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.credit_grants:
            raise _no_such("billing.credit_grant", id)
        return json.loads(json.dumps(self.credit_grants[id]))

    def _h_credit_balance_summary(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(params, {"customer"})
        customer = params.get("customer")
        if not customer:
            raise _missing("customer")
        flt = params.get("filter")
        if flt is None or flt == "":
            raise _missing("filter")
        if not isinstance(flt, dict):
            raise StripeError(400, "Invalid object", param="filter", code="parameter_invalid_object")
        ftype = flt.get("type")
        if not ftype:
            raise _missing("filter[type]")
        if ftype not in ("applicability_scope", "credit_grant"):
            raise StripeError(
                400, "Invalid filter[type]: must be one of applicability_scope or credit_grant", param="filter[type]"
            )
        if customer not in self.customers:
            raise _no_such("customer", customer, param="customer", status=400)
        grants = [g for g in self.credit_grants.values() if g["customer"] == customer]
        if ftype == "applicability_scope":
            scope = flt.get("applicability_scope")
            if not isinstance(scope, dict) or not scope:
                raise _missing("filter[applicability_scope]")
            if "prices" in scope:
                raise StripeError(
                    400,
                    "The sandbox supports only filter[applicability_scope][price_type]=metered.",
                    param="filter[applicability_scope][prices]",
                )
            if scope.get("price_type") != "metered":
                raise StripeError(
                    400,
                    "Invalid filter[applicability_scope][price_type]: must be one of metered",
                    param="filter[applicability_scope][price_type]",
                )
            grants = [g for g in grants if g["applicability_config"]["scope"].get("price_type") == "metered"]
        else:
            grant_id = flt.get("credit_grant")
            if not grant_id:
                raise _missing("filter[credit_grant]")
            grant = self.credit_grants.get(grant_id)
            if grant is None or grant["customer"] != customer:
                raise _no_such("billing.credit_grant", grant_id, param="filter[credit_grant]", status=400)
            grants = [grant]
        now = self._now()
        available: dict[str, int] = {}
        ledger: dict[str, int] = {}
        for g in grants:
            cur = g["amount"]["monetary"]["currency"]
            available.setdefault(cur, 0)
            ledger.setdefault(cur, 0)
            if self._grant_live(g, now):
                available[cur] += self._grant_available(g)
                ledger[cur] += self._grant_ledger(g)

        def money(currency: str, value: int) -> dict[str, Any]:
            return {"monetary": {"currency": currency, "value": value}, "type": "monetary"}

        return {
            "object": "billing.credit_balance_summary",
            "balances": [
                {"available_balance": money(cur, available[cur]), "ledger_balance": money(cur, ledger[cur])}
                for cur in sorted(available)
            ],
            "customer": (json.loads(json.dumps(self.customers[customer])) if "customer" in expand else customer),
            "customer_account": None,
            "livemode": False,
        }

    # -- legacy usage records ---------------------------------------------------------------------

    def _legacy_item(self, hdrs: Mapping[str, str], item_id: str, what: str) -> dict[str, Any]:
        version = hdrs.get("stripe-version") or self.default_api_version
        if version[:10] >= LEGACY_USAGE_REMOVED_IN:
            raise StripeError(
                400,
                f"The {what} endpoint was removed in API version 2025-03-31.basil (this request uses "
                f"{version}). Usage records of legacy metered prices can only be created with an older "
                "API version; use Billing Meters (/v1/billing/meter_events) instead.",
                code="api_version_unsupported",
            )
        item = self.subscription_items.get(item_id)
        if item is None:
            raise _no_such("subscription item", item_id)
        price = self.prices[item["price"]]
        if price["recurring"]["usage_type"] != "metered" or price["recurring"]["meter"] is not None:
            raise StripeError(
                400,
                f"Usage records can only be created for subscription items with a legacy metered price "
                f"(usage_type=metered and no meter); price '{price['id']}' does not qualify.",
                param="subscription_item",
            )
        return item

    def _h_usage_record(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        item = self._legacy_item(hdrs, id, "usage records")
        quantity = _int_param(params, "quantity", required=True)
        assert quantity is not None
        if quantity < 0:
            raise StripeError(
                400,
                "Invalid quantity: must be greater than or equal to 0",
                param="quantity",
                code="parameter_invalid_integer",
            )
        action = params.get("action") or "increment"
        if action not in ("set", "increment"):
            raise StripeError(400, "Invalid action: must be one of increment, set", param="action")
        now = self._now()
        ts_raw = params.get("timestamp")
        timestamp = now if ts_raw in (None, "", "now") else _int_param(params, "timestamp")
        assert timestamp is not None
        if not (item["current_period_start"] < timestamp < item["current_period_end"]) or timestamp > now:
            raise StripeError(
                400,
                "Cannot create the usage record with this timestamp because timestamps must be after the "
                "subscription's last invoice period (or current period start time).",
                param="timestamp",
            )
        _apply_usage_record(self.usage_records.setdefault(id, {}), timestamp, action, quantity)
        self._usage_record_log.setdefault(id, []).append((self.clock(), timestamp, action, quantity))
        return {
            "id": _new_id("mbur_", 14),
            "object": "usage_record",
            "livemode": False,
            "quantity": quantity,
            "subscription_item": id,
            "timestamp": timestamp,
        }

    def _h_usage_record_summaries(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        item = self._legacy_item(hdrs, id, "usage record summaries")
        records: dict[int, int] = {}  # as the summaries show them by now: replayed up to summary_lag_seconds ago
        visible_from = self.clock() - self.summary_lag_seconds
        for created, timestamp, action, quantity in self._usage_record_log.get(id, []):
            if created <= visible_from:
                _apply_usage_record(records, timestamp, action, quantity)
        periods = [
            (item["current_period_start"], item["current_period_end"]),
            *reversed(self._past_periods.get(id, [])),
        ]
        summaries = [
            {
                "id": "sis_" + hashlib.sha1(f"{id}|{start}".encode(), usedforsecurity=False).hexdigest()[:24],
                "object": "usage_record_summary",
                "invoice": None,
                "livemode": False,
                "period": {"start": start, "end": end},
                "subscription_item": id,
                "total_usage": sum(q for ts, q in records.items() if start <= ts < end),
            }
            for start, end in periods
        ]
        return self._paginate(
            summaries,
            params,
            f"/v1/subscription_items/{id}/usage_record_summaries",
            "usage record summary",
        )

    def _usage_total(self, item: Mapping[str, Any]) -> int:
        records = self.usage_records.get(item["id"], {})
        start, end = item["current_period_start"], item["current_period_end"]
        return sum(q for ts, q in records.items() if start <= ts < end)

    # -- test helpers -----------------------------------------------------------------------------

    def meter_total(self, customer: str, event_name: str, start: int, end: int) -> Decimal:
        """Aggregate accepted events of ``event_name`` for ``customer`` with start ≤ timestamp < end."""
        with self.lock:
            meters = [m for m in self.meters.values() if m["event_name"] == event_name]
            if not meters:
                raise KeyError(f"no meter for event_name {event_name!r}")
            meter = next((m for m in meters if m["status"] == "active"), meters[0])
            return self._aggregate(meter, customer, start, end)

    def credit_available(self, customer: str, currency: str = "usd") -> int:
        """The customer's available credit for metered prices, in minor units, as the balance summary serves it."""
        with self.lock:
            now = self._now()
            return sum(
                self._grant_available(g)
                for g in self.credit_grants.values()
                if g["customer"] == customer
                and g["amount"]["monetary"]["currency"] == currency
                and g["applicability_config"]["scope"].get("price_type") == "metered"
                and self._grant_live(g, now)
            )

    def usage_record_total(self, item_id: str) -> int:
        """Sum of the stored legacy usage quantities in the item's current period."""
        with self.lock:
            return self._usage_total(self.subscription_items[item_id])


def _apply_usage_record(records: dict[int, int], timestamp: int, action: str, quantity: int) -> None:
    records[timestamp] = quantity if action == "set" else records.get(timestamp, 0) + quantity


def _parse_value(raw: str, param: str) -> Decimal:
    try:
        value = Decimal(raw.strip())
    except (InvalidOperation, AttributeError):
        value = None
    if value is None or not value.is_finite() or raw.strip() != raw:
        raise StripeError(
            400,
            f"Invalid value `{raw}`: meter event values must be numbers (decimal strings).",
            param=param,
            code="parameter_invalid_string",
        )
    return value


def _filter_created(objs: Iterable[dict[str, Any]], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Apply Stripe's ``created`` list filter: an exact timestamp or ``created[gt|gte|lt|lte]``."""
    raw = params.get("created")
    objs = list(objs)
    if raw is None or raw == "":
        return objs
    if not isinstance(raw, dict):
        exact = _int_param(params, "created")
        return [o for o in objs if o["created"] == exact]
    checks: list[Callable[[int], bool]] = []
    for op, value in raw.items():
        name = f"created[{op}]"
        if op not in ("gt", "gte", "lt", "lte"):
            raise StripeError(400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown")
        bound = _int_param({name: value}, name, required=True)
        assert bound is not None
        checks.append(
            {
                "gt": lambda t, b=bound: t > b,
                "gte": lambda t, b=bound: t >= b,
                "lt": lambda t, b=bound: t < b,
                "lte": lambda t, b=bound: t <= b,
            }[op]
        )
    return [o for o in objs if all(check(o["created"]) for check in checks)]
