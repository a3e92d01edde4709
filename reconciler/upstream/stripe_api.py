"""Stripe, through stripe-python's `StripeClient`, returning our own types.

SDK traps avoided here (see shared/api-notes.md):
- `max_network_retries=0`: our retry loop (reconciler.upstream.retry) is the single budget, and it also
  handles 429s, which the SDK retries only with `Stripe-Should-Retry: true` and without `Retry-After`.
- Every POST carries our deterministic idempotency key, so a retry, even from a restarted process, is one
  request to Stripe. But Stripe saves a 5xx answer to the key and replays it to every retry with it
  (https://docs.stripe.com/api/idempotent_requests): a write keeps its key only while it gets no answer at all,
  and goes under a fresh one, committed to the ledger first, after a 5xx answer. The SDK would retry a 5xx under
  the same key (`_should_retry`), which could only fetch the replay; with its retries off it cannot.
- `StripeObject` is not a dict: responses are converted with `to_dict()` at this edge.
- The API version is pinned in the config, and legacy usage records go through `raw_request` with the old
  version they still exist in.
- With `stripe.meter_events: v2_stream`, meter events go in batches of up to 100 to the v2 meter event stream
  (`send_meter_event_batch`), on its own host (`stripe.meter_events_base`, the SDK's `meter_events` base address),
  authenticated by a meter event session's token, which is valid for 15 minutes and renewed a minute before it
  expires (https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create,
  https://docs.stripe.com/api/v2/billing/meter-event-stream/create).
"""

from __future__ import annotations

import contextvars
import io
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import orjson
import requests
import stripe

from reconciler.balances.model import InvoicePayment, Refund, TopUp
from reconciler.config import StripeConfig
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.plans.desired import SubscriptionSnapshot
from reconciler.redact import redact
from reconciler.upstream.errors import (
    IdentifierTakenError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UpstreamError,
)
from reconciler.upstream.retry import call_with_retries
from reconciler.upstream.stripe_budget import METER_EVENT_STREAM, METER_EVENTS, StripeBudget
from reconciler.usage.model import BillingPeriod, CustomerCredit, Intent, Meter, MeteredItem
from reconciler.usage.periods import epoch_seconds, from_epoch_seconds

API = "stripe"
PAGE_SIZE = 100
T = TypeVar("T")
# Commits a fresh idempotency key for a pending intent to the ledger and returns the intent carrying it.
KeyRenewal = Callable[[Intent], Intent]
# https://docs.stripe.com/api/v2/billing/meter-event-stream/create: "Supports up to 100 events per request".
MAX_STREAM_EVENTS = 100
METER_EVENT_SESSION = "POST /v2/billing/meter_event_session"
# A session is renewed this long before it expires: a batch that waited on the budget, or a clock a little behind
# Stripe's, must not reach the stream with a token that expired on the way.
SESSION_RENEWAL_MARGIN_SECONDS = 60.0


def _retry_after(headers: Any) -> float | None:
    value = (headers or {}).get("Retry-After") or (headers or {}).get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def translate_error(exc: stripe.StripeError, secrets: tuple[str, ...] = ()) -> UpstreamError:
    """Map a stripe-python exception onto our taxonomy (reconciler.upstream.errors), secrets removed."""
    status = exc.http_status
    headers = exc.headers or {}
    request_id = exc.request_id
    message = redact(exc.user_message or type(exc).__name__, secrets)
    if isinstance(exc, stripe.APIConnectionError):
        return OutcomeUnknownError(API, f"connection failed: {message}")
    if status == 429 or isinstance(exc, stripe.RateLimitError):
        return RateLimitedError(API, message, status=status, request_id=request_id, retry_after=_retry_after(headers))
    if status is None or status < 300 or status >= 500 or status == 409:
        # Whatever Stripe-Should-Retry says, a server error may have applied the request; so may a success
        # whose body could not be read.
        return OutcomeUnknownError(API, message, status=status, request_id=request_id)
    if str(headers.get("Stripe-Should-Retry", "")).lower() == "false":
        return PermanentError(API, message, status=status, request_id=request_id)
    return PermanentError(API, message, status=status, request_id=request_id)


def _is_duplicate_identifier(exc: stripe.StripeError) -> bool:
    """Stripe's answer to an identifier it has already recorded, with any quantity: a 400 "An event already exists
    with identifier …" without a `code` (undocumented wording, seen in the wild: match loosely)."""
    code = (exc.code or "").lower()
    message = (exc.user_message or "").lower()
    return exc.http_status == 400 and ("duplicate" in code or ("identifier" in message and "already" in message))


def _is_server_error(exc: stripe.StripeError) -> bool:
    return exc.http_status is not None and exc.http_status >= 500


def _is_replayed(exc: stripe.StripeError) -> bool:
    """Whether Stripe answered with the response saved to the request's idempotency key."""
    headers = exc.headers or {}
    return str(headers.get("Idempotent-Replayed") or headers.get("idempotent-replayed") or "").lower() == "true"


def _is_session_refused(exc: stripe.StripeError) -> bool:
    """The stream refused the session token: expired (documented: 401 `billing_meter_event_session_expired`, which
    stripe-python raises as TemporarySessionExpiredError,
    https://docs.stripe.com/api/v2/billing/meter-event-stream/create) or not known (any other 401 there: the docs are
    silent). Nothing was applied: a new session and a resend are safe."""
    return isinstance(exc, stripe.TemporarySessionExpiredError) or exc.http_status == 401


def _v2_time(value: Any) -> datetime:
    """A v2 timestamp (RFC 3339, "2024-06-01T12:15:00.000Z"), or a datetime the SDK made of it."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _stream_event(intent: Intent) -> dict[str, Any]:
    """One meter event of the v2 stream (https://docs.stripe.com/api/v2/billing/meter-event-stream/create): its
    identifier is the intent's, so a resent batch is deduplicated by Stripe."""
    meter = intent.meter
    assert meter is not None
    return {
        "event_name": meter.event_name,
        "identifier": intent.identifier,
        "timestamp": _rfc3339(intent.event_timestamp),
        "payload": {meter.customer_key: intent.customer_id, meter.value_key: str(intent.quantity)},
    }


def _time(value: Any) -> datetime | None:
    return from_epoch_seconds(int(value)) if value else None


def _id_of(value: Any) -> str | None:
    """An expandable field's id, whether Stripe sent the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    return value.get("id")


def _top_up(raw: dict[str, Any]) -> TopUp:
    charge = raw.get("latest_charge")
    return TopUp(
        payment_intent_id=raw["id"],
        customer_id=_id_of(raw.get("customer")),
        amount_minor=int(raw.get("amount_received") or 0),
        currency=raw["currency"].lower(),
        created=from_epoch_seconds(raw["created"]),
        metadata=dict(raw.get("metadata") or {}),
        disputed=bool(isinstance(charge, dict) and charge.get("disputed")),
    )


def _invoice_payment(raw: dict[str, Any]) -> InvoicePayment | None:
    payment_intent = _id_of((raw.get("payment") or {}).get("payment_intent"))
    if not payment_intent:
        return None
    invoice = raw.get("invoice")
    line_prices = None
    if isinstance(invoice, dict):  # expanded: lines as of API 2025-03-31, price at pricing.price_details.price
        lines = invoice.get("lines") or {}
        if not lines.get("has_more"):
            line_prices = frozenset(
                str((line.get("pricing") or {}).get("price_details", {}).get("price") or "")
                for line in lines.get("data") or []
            )
    return InvoicePayment(payment_intent, _id_of(invoice) or "", line_prices)


def _credit_of(customer: dict[str, Any]) -> CustomerCredit:
    """A customer's balance as credit, minor units: Stripe stores credit as a negative balance."""
    return CustomerCredit(-int(customer.get("balance") or 0), customer.get("currency"))


def _per_unit_amount(price: dict[str, Any]) -> Decimal | None:
    """Minor units per unit for a plain per-unit price; None for tiered or transformed prices."""
    if price.get("billing_scheme", "per_unit") != "per_unit" or price.get("transform_quantity"):
        return None
    exact = price.get("unit_amount_decimal")
    if exact is not None:
        return Decimal(str(exact))
    amount = price.get("unit_amount")
    return None if amount is None else Decimal(amount)


class _ClosableRequestsClient(stripe.RequestsClient):
    """stripe's RequestsClient gives each thread a requests session of its own (requests does not promise that a
    session is safe to share) and its `close` closes only the calling thread's. This one also remembers every
    session it made, weakly (a thread's goes with the thread), so `close_all` closes every pooled connection.

    The proxy settings of the environment (HTTPS_PROXY, NO_PROXY, …) are read once, for the `bases` every request
    goes to (the API's and the meter event stream's): requests would read and parse the whole environment twice per
    request otherwise (a tenth of the usage cycle's CPU in the profile). Should the two hosts be proxied differently
    (NO_PROXY naming one of them), requests reads the environment per request as usual. stripe sets the CA bundle
    of each request itself."""

    def __init__(self, bases: tuple[str, ...], **kwargs: Any):
        proxied = [
            {
                scheme: url
                for scheme, url in requests.utils.get_environ_proxies(base).items()
                if scheme in ("http", "https")
            }
            for base in bases
        ]
        self._proxies_read_once = all(proxies == proxied[0] for proxies in proxied)
        super().__init__(proxy=(proxied[0] or None) if self._proxies_read_once else None, **kwargs)  # type: ignore[arg-type]
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()

    def _thread_session(self) -> None:
        # stripe keeps the session in `_thread_local.session` and makes one only when it finds none.
        if getattr(self._thread_local, "session", None) is None:
            session = requests.Session()
            session.trust_env = not self._proxies_read_once
            self._thread_local.session = session
            with self._sessions_lock:
                self._sessions.add(session)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._thread_session()
        return super().request(*args, **kwargs)

    def request_stream(self, *args: Any, **kwargs: Any) -> Any:
        """The answer read whole here, content-decoded (gzip) as `request` reads it, a failure to read it raised as
        the SDK raises a failed request's; so a "stream" is only an answer the SDK neither logs nor decodes
        (StripeGateway._get_json)."""
        self._thread_session()
        raw, status, headers = super().request_stream(*args, **kwargs)
        try:
            body = raw.read(decode_content=True)  # urllib3's response, which requests leaves undecoded in `raw`
        except Exception as exc:  # the connection cut or timed out mid-answer
            self._handle_request_error(exc)  # raises stripe.APIConnectionError
        finally:
            raw.release_conn()
        return io.BytesIO(body), status, headers

    def close_all(self) -> None:
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()


class StripeGateway:
    def __init__(self, config: StripeConfig, metrics: Metrics = NO_METRICS):
        self._config = config
        self._metrics = metrics
        self.budget = StripeBudget(config.budgets())
        self._in_flight = threading.BoundedSemaphore(config.concurrency())
        self._http = _ClosableRequestsClient(
            (config.api_base, config.meter_events_base), timeout=config.timeout_seconds
        )
        self._session_lock = threading.Lock()
        self._session: tuple[str, float] | None = None  # the stream's token, and when (time.time()) to renew it
        self._client = stripe.StripeClient(
            config.api_key.get_secret_value(),
            base_addresses={"api": config.api_base, "meter_events": config.meter_events_base},
            stripe_version=config.api_version,
            max_network_retries=0,
            http_client=self._http,
        )

    def close(self) -> None:
        self._http.close_all()

    def _call(self, what: str, operation: Callable[[], T], *, endpoint: str) -> T:
        """One call to `endpoint` (a named operation, ids as `{id}`: the unit of Stripe's per-endpoint limits), within
        its budgets, retried as `call_with_retries` says."""
        outcome_unknown = [False]
        return call_with_retries(
            lambda: self._call_once(operation, endpoint=endpoint, outcome_unknown=outcome_unknown),
            max_retries=self._config.max_network_retries,
            what=f"stripe {what}",
        )

    def _call_once(self, operation: Callable[[], T], *, endpoint: str, outcome_unknown: list[bool]) -> T:
        """One try of a call, within its budgets; `outcome_unknown` carries across the tries of one call whether an
        earlier one may have been applied."""
        self.budget.acquire(endpoint)
        with self._in_flight, self._metrics.upstream_call(API):
            try:
                return operation()
            except stripe.StripeError as exc:
                error = translate_error(exc, (self._config.api_key.get_secret_value(),))
                if isinstance(error, RateLimitedError):
                    # A 429 slows every call to Stripe down, not just this one.
                    self.budget.hold_off(error.retry_after or 1.0)
                if isinstance(error, OutcomeUnknownError):
                    outcome_unknown[0] = True
                elif isinstance(error, PermanentError) and outcome_unknown[0]:
                    # Refused now, but an earlier attempt may have been applied: still unknown.
                    error = OutcomeUnknownError(API, f"{error} (an earlier attempt's outcome is unknown)")
                raise error from None

    # -- reading -------------------------------------------------------------------------------------

    def list_meters(self) -> dict[str, Meter]:
        meters: dict[str, Meter] = {}
        for raw in self._pages("list meters", "/v1/billing/meters", {}):
            meters[raw["id"]] = Meter(
                id=raw["id"],
                event_name=raw["event_name"],
                formula=raw["default_aggregation"]["formula"],
                status=raw["status"],
                event_time_window=raw.get("event_time_window"),
                customer_key=raw["customer_mapping"]["event_payload_key"],
                value_key=raw["value_settings"]["event_payload_key"],
            )
        return meters

    def metered_items(self, *, with_customer: bool, customers: frozenset[str] = frozenset()) -> Iterator[MeteredItem]:
        """Every metered item of every subscription (all statuses), page by page; only `customers`' if given.
        `with_customer` expands the customer, for its metadata."""
        for subscription, items in self._subscriptions(with_customer=with_customer, customers=customers):
            yield from self._metered_items_of(subscription, items)

    def subscription_snapshots(self, customers: frozenset[str] = frozenset()) -> Iterator[SubscriptionSnapshot]:
        """Every subscription (all statuses) with its price ids and the customer's metadata."""
        for subscription, items in self._subscriptions(with_customer=True, customers=customers):
            customer = subscription["customer"]
            yield SubscriptionSnapshot(
                id=subscription["id"],
                customer_id=_id_of(customer) or "",
                status=subscription["status"],
                created=int(subscription.get("created") or 0),
                price_ids=tuple(item["price"]["id"] for item in items),
                metadata=dict(subscription.get("metadata") or {}),
                customer_metadata=dict(customer.get("metadata") or {}) if isinstance(customer, dict) else {},
            )

    def _subscriptions(
        self, *, with_customer: bool, customers: frozenset[str]
    ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Every subscription (all statuses; only `customers`' if given) with all its items, page by page.
        `with_customer` expands the customer, for its metadata."""
        expand = ["data.items.data.price"] + (["data.customer"] if with_customer else [])
        filters: list[dict[str, Any]] = [{"customer": c} for c in sorted(customers)] or [{}]
        for extra in filters:
            params: dict[str, Any] = {"status": "all", "expand": expand, **extra}
            for subscription in self._pages("list subscriptions", "/v1/subscriptions", params):
                embedded = subscription["items"]
                items = list(embedded["data"])
                if embedded.get("has_more"):
                    items = list(
                        self._pages(
                            "list subscription items",
                            "/v1/subscription_items",
                            {"subscription": subscription["id"]},
                        )
                    )
                yield subscription, items

    def _metered_items_of(self, subscription: dict[str, Any], items: list[dict[str, Any]]) -> Iterator[MeteredItem]:
        customer = subscription["customer"]
        customer_id = customer if isinstance(customer, str) else customer["id"]
        metadata = None if isinstance(customer, str) else dict(customer.get("metadata") or {})
        # The expanded customer carries its balance: the balance job reads credit from here, not per customer.
        credit = _credit_of(customer) if isinstance(customer, dict) and customer.get("balance") is not None else None
        ended_at = subscription.get("ended_at")
        created = subscription.get("created")
        for item in items:
            price = item["price"]
            recurring = price.get("recurring") or {}
            if recurring.get("usage_type") != "metered":
                continue
            # Since API 2025-03-31 the period lives on the item; older versions kept it on the subscription.
            start = item.get("current_period_start") or subscription.get("current_period_start")
            end = item.get("current_period_end") or subscription.get("current_period_end")
            yield MeteredItem(
                item_id=item["id"],
                subscription_id=subscription["id"],
                subscription_status=subscription["status"],
                customer_id=customer_id,
                price_id=price["id"],
                meter_id=recurring.get("meter"),
                period=BillingPeriod(from_epoch_seconds(start), from_epoch_seconds(end)),
                ended_at=from_epoch_seconds(ended_at) if ended_at else None,
                customer_metadata=metadata,
                customer_credit=credit,
                subscription_created=from_epoch_seconds(created) if created else None,
                currency=(price.get("currency") or subscription.get("currency") or "usd").lower(),
                unit_amount=_per_unit_amount(price),
                interval=recurring.get("interval") or "month",
                interval_count=int(recurring.get("interval_count") or 1),
                billing_cycle_anchor=_time(subscription.get("billing_cycle_anchor")),
                started_at=_time(subscription.get("start_date") or subscription.get("created")),
            )

    def _pages(
        self, what: str, path: str, params: dict[str, Any], endpoint: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Page through a list endpoint with `starting_after`, one retried request per page. A page that does not
        move the cursor on (a list that claims `has_more` forever) is an error, not an endless loop.

        Pages are read as plain JSON (`_get_json`), not as StripeObjects: building those cost ~2 ms of CPU per
        subscription, the largest single cost of a cycle (measured with `reconciler bench`). The next page is asked
        for while the caller works through this one: a cursor can only be followed one page after another, and
        without this a listing of 1,000 pages waited for each answer (Stripe's latency) and then for its own work on
        it, one after the other."""
        endpoint = endpoint or f"GET {path}"

        def fetch(cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
            """One page's data, and the cursor of the page after it (None on the last page)."""
            page_params = {**params, "limit": PAGE_SIZE, **({"starting_after": cursor} if cursor else {})}
            page = self._call(what, lambda: self._get_json(path, page_params), endpoint=endpoint)
            data = page.get("data")
            if not isinstance(data, list):
                raise PermanentError(API, f"{what}: the answer has no list of data: {str(page)[:200]}")
            if not page.get("has_more") or not data:
                return data, None
            if data[-1].get("id") in (None, cursor):
                raise PermanentError(
                    API, f"{what}: has_more is true but the page after {cursor or 'the first'} does not move on"
                )
            return data, data[-1]["id"]

        data, cursor = fetch(None)
        if cursor is None:  # one page: no thread for the lists that fit in one (meters, endpoints)
            yield from data
            return
        with ThreadPoolExecutor(1, thread_name_prefix="stripe-pages") as ahead:
            try:
                while cursor is not None:
                    # The context (the run's ids in log lines) goes with the request; each submit gets its own copy.
                    following = ahead.submit(contextvars.copy_context().run, fetch, cursor)
                    try:
                        yield from data
                    except GeneratorExit:  # the caller stopped: the page asked for is not wanted
                        following.cancel()
                        raise
                    data, cursor = following.result()
                yield from data
            finally:
                ahead.submit(self._http.close)  # the thread's own connection, which would outlive it otherwise

    def _get_json(self, path: str, params: dict[str, Any]) -> Any:
        """GET `path` through the SDK's requestor (its authentication, headers and errors), the answer decoded by
        orjson. `raw_request` would decode every answer into OrderedDicts (5.1 ms for a page of 100 subscriptions,
        ~420 KB, against orjson's 1.2) and log its whole body at DEBUG, formatted whether or not anyone listens
        (stripe._util.log_debug); asked for as a stream, neither happens. At 100,000 items that was a fifth of a warm
        cycle's CPU. The requestor is the StripeClient's private `_requestor`, as of stripe 16 (pinned below 17);
        every listing in the tests goes through it. A failed answer raises the SDK's error (its reading of the
        body); a success that is not JSON raises what the SDK raises for one."""
        requestor = self._client._requestor
        response = requestor.request_stream("get", path, params, base_address="api", usage=["raw_request"])
        body = response.io.getvalue()  # type: ignore[attr-defined]  # read whole (_ClosableRequestsClient)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return requestor._interpret_response(body, response.code, response.headers, "V1").data

    # -- preflight (`reconciler doctor`) --------------------------------------------------------------

    def price(self, price_id: str, *, legacy: bool = False) -> dict[str, Any]:
        """One price as plain JSON, read under the legacy API version when `legacy` (which proves that version is
        still accepted)."""
        version = {"stripe_version": self._config.legacy_api_version} if legacy else {}
        return self._call(
            "retrieve price",
            lambda: self._client.raw_request("get", f"/v1/prices/{price_id}", **version).data,  # type: ignore[arg-type]
            endpoint="GET /v1/prices/{id}",
        )

    def webhook_endpoints(self) -> list[dict[str, Any]]:
        """The account's snapshot-payload webhook endpoints (https://docs.stripe.com/api/webhook_endpoints/list)."""
        return list(self._pages("list webhook endpoints", "/v1/webhook_endpoints", {}))

    def event_destinations(self) -> list[dict[str, Any]]:
        """The account's v2 event destinations with their webhook URLs, which the list leaves out unless asked to
        `include` them (https://docs.stripe.com/api/v2/core/event-destinations/list); v2 lists page by
        `next_page_url`."""
        found: list[dict[str, Any]] = []
        path: str | None = "/v2/core/event_destinations"
        params: dict[str, Any] = {"include": ["webhook_endpoint.url"], "limit": 100}
        while path:
            page = self._call(
                "list event destinations",
                lambda p=path, q=params: self._client.raw_request("get", p, **q).data,  # type: ignore[misc]
                endpoint="GET /v2/core/event_destinations",
            )
            found += page.get("data") or []
            next_page = page.get("next_page_url")
            path, params = (next_page, {}) if next_page and next_page != path else (None, {})
        return found

    # -- read-back -----------------------------------------------------------------------------------

    def meter_total(self, meter_id: str, customer: str, start: datetime, end: datetime) -> Decimal:
        """What Stripe has aggregated for a customer and meter over `[start, end)` (both minute-aligned):
        its own view, eventually consistent."""
        params = {"customer": customer, "start_time": epoch_seconds(start), "end_time": epoch_seconds(end)}
        total = Decimal(0)
        path = f"/v1/billing/meters/{meter_id}/event_summaries"
        for summary in self._pages(
            "meter event summaries", path, params, "GET /v1/billing/meters/{id}/event_summaries"
        ):
            total += Decimal(str(summary.get("aggregated_value") or 0))
        return total

    def legacy_usage_total(self, item_id: str, period_start: datetime) -> int | None:
        """The usage Stripe holds for a legacy item's period (usage record summaries exist only on API versions
        before 2025-03-31); None if Stripe has no summary for that period. The summaries are a list, newest period
        first, paged like any other: an older period may be pages away."""
        path = f"/v1/subscription_items/{item_id}/usage_record_summaries"
        cursor: str | None = None
        while True:
            page_params = {"limit": PAGE_SIZE, **({"starting_after": cursor} if cursor else {})}
            response = self._call(
                "usage record summaries",
                lambda p=page_params: self._client.raw_request(  # type: ignore[misc]
                    "get", path, stripe_version=self._config.legacy_api_version, **p
                ),
                endpoint="GET /v1/subscription_items/{id}/usage_record_summaries",
            )
            page = self._client.deserialize(response, api_mode="V1").to_dict()
            summaries = page.get("data") or []
            for summary in summaries:
                if (summary.get("period") or {}).get("start") == epoch_seconds(period_start):
                    return int(summary.get("total_usage") or 0)
            if not page.get("has_more") or not summaries or summaries[-1].get("id") in (None, cursor):
                return None
            cursor = summaries[-1]["id"]

    # -- thin events ---------------------------------------------------------------------------------

    def v2_event(self, event_id: str) -> dict[str, Any]:
        """A thin event with its `data`, which the pushed notification never carries
        (https://docs.stripe.com/api/v2/core/events/retrieve; events stay retrievable for 30 days)."""
        return self._call(
            "retrieve v2 event",
            lambda: self._client.v2.core.events.retrieve(event_id),
            endpoint="GET /v2/core/events/{id}",
        ).to_dict()

    def parse_thin_event(self, payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
        """A thin event notification, its `Stripe-Signature` verified against the destination's secret by the SDK
        (raises stripe.SignatureVerificationError, or ValueError/KeyError for a body that is no thin event)."""
        self._client.parse_event_notification(payload, signature, secret)
        body: dict[str, Any] = json.loads(payload)  # what the inbox stores: the notification as Stripe sent it
        return body

    # -- balances ------------------------------------------------------------------------------------

    def succeeded_payment_intents(self, created_since: datetime, customer: str | None = None) -> Iterator[TopUp]:
        """Succeeded PaymentIntents created since `created_since`: every customer's (one listing, 100 a page), or
        only `customer`'s."""
        params: dict[str, Any] = {
            "created": {"gte": epoch_seconds(created_since)},
            "expand": ["data.latest_charge"],
            **({"customer": customer} if customer else {}),
        }
        for raw in self._pages("list payment intents", "/v1/payment_intents", params):
            if raw.get("status") == "succeeded":
                yield _top_up(raw)

    def invoice_payments(self, created_since: datetime, *, with_lines: bool) -> Iterator[InvoicePayment]:
        """Every PaymentIntent that paid an invoice, created since `created_since`: one listing for all customers
        (https://docs.stripe.com/api/invoice-payment/list). `with_lines` expands each invoice to read its prices."""
        params: dict[str, Any] = {
            "payment": {"type": "payment_intent"},
            "created": {"gte": epoch_seconds(created_since)},
            **({"expand": ["data.invoice"]} if with_lines else {}),
        }
        for raw in self._pages("list invoice payments", "/v1/invoice_payments", params):
            if (payment := _invoice_payment(raw)) is not None:
                yield payment

    def invoice_payment_of(self, payment_intent_id: str, *, with_lines: bool) -> InvoicePayment | None:
        """The invoice a PaymentIntent paid, if any: for a refund of a PaymentIntent older than the look-back."""
        params: dict[str, Any] = {
            "payment": {"type": "payment_intent", "payment_intent": payment_intent_id},
            **({"expand": ["data.invoice"]} if with_lines else {}),
        }
        for raw in self._pages("list invoice payments", "/v1/invoice_payments", params):
            if (payment := _invoice_payment(raw)) is not None:
                return payment
        return None

    def payment_intent(self, payment_intent_id: str) -> TopUp:
        raw = self._call(
            "retrieve payment intent",
            lambda: self._client.v1.payment_intents.retrieve(payment_intent_id, params={"expand": ["latest_charge"]}),
            endpoint="GET /v1/payment_intents/{id}",
        ).to_dict()
        return _top_up(raw)

    def refunds(self, created_since: datetime) -> Iterator[Refund]:
        params = {"created": {"gte": epoch_seconds(created_since)}}
        for raw in self._pages("list refunds", "/v1/refunds", params):
            yield Refund(
                refund_id=raw["id"],
                payment_intent_id=_id_of(raw.get("payment_intent")),
                amount_minor=int(raw["amount"]),
                currency=raw["currency"].lower(),
                created=from_epoch_seconds(raw["created"]),
                status=raw.get("status") or "succeeded",
            )

    def metered_credit_balance(self, customer: str, currency: str) -> int:
        """Available billing credit for metered prices, in minor units of `currency`."""
        params = {
            "customer": customer,
            "filter": {"type": "applicability_scope", "applicability_scope": {"price_type": "metered"}},
        }
        summary = self._call(
            "credit balance summary",
            lambda: self._client.v1.billing.credit_balance_summary.retrieve(params=params),
            endpoint="GET /v1/billing/credit_balance_summary",
        ).to_dict()
        for balance in summary.get("balances", []):
            monetary = (balance.get("available_balance") or {}).get("monetary") or {}
            if str(monetary.get("currency", "")).lower() == currency:
                return int(monetary.get("value", 0))
        return 0

    def customer_credit(self, customer: str) -> CustomerCredit:
        """The customer balance as credit (minor units; Stripe stores credit as a negative balance)."""
        raw = self._call(
            "retrieve customer", lambda: self._client.v1.customers.retrieve(customer), endpoint="GET /v1/customers/{id}"
        ).to_dict()
        return _credit_of(raw)

    # -- writing -------------------------------------------------------------------------------------

    def send_meter_event(self, intent: Intent, renew_key: KeyRenewal) -> None:
        meter = intent.meter
        assert meter is not None
        params = {
            "event_name": meter.event_name,
            "identifier": intent.identifier,
            "timestamp": epoch_seconds(intent.event_timestamp),
            "payload": {meter.customer_key: intent.customer_id, meter.value_key: str(intent.quantity)},
        }

        earlier_try_may_have_landed = intent.attempts > 0  # by an earlier cycle, or by a try of this call

        def create(idempotency_key: str) -> None:
            nonlocal earlier_try_may_have_landed
            try:
                self._client.v1.billing.meter_events.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": idempotency_key},
                )
            except stripe.StripeError as exc:
                if not _is_duplicate_identifier(exc):
                    earlier_try_may_have_landed |= isinstance(translate_error(exc), OutcomeUnknownError)
                    raise
                if earlier_try_may_have_landed:
                    return  # the event Stripe holds is our earlier try's: it was applied
                # Stripe says only that *an* event has this identifier, whatever its quantity.
                raise IdentifierTakenError(API, exc.user_message or "duplicate identifier", status=400) from None

        self._write("create meter event", METER_EVENTS, intent, renew_key, create)

    def send_meter_event_batch(self, intents: Sequence[Intent]) -> None:
        """Send up to 100 meter events in one request to the v2 meter event stream, retried as `call_with_retries`
        says; raises like any call (reconciler.upstream.errors) when the batch's outcome is not a 200.

        A retry resends the same events with the same identifiers: Stripe enforces their uniqueness "within a rolling
        24 hour period" (https://docs.stripe.com/api/v2/billing/meter-event-stream/create), so a batch whose answer
        was lost (a timeout, a 5xx: OutcomeUnknownError) counts once. The stream validates events asynchronously: a
        200 says only that the batch was received. An invalid event, or one whose identifier Stripe already held, is
        not refused here; the former is reported by the thin meter error events, and either is found by the read-back
        (reconciler.usage.readback). The SDK sends each try under an idempotency key of its own; the identifiers, not
        the key, are what make a resend safe."""
        if not intents:
            return
        if len(intents) > MAX_STREAM_EVENTS:
            raise ValueError(f"at most {MAX_STREAM_EVENTS} meter events go in one request, not {len(intents)}")
        body: Any = {"events": [_stream_event(intent) for intent in intents]}
        outcome_unknown = [False]  # across the tries: an earlier one may have been applied

        def post(token: str) -> None:
            try:
                self._client.v2.billing.meter_event_stream.create(body, options={"api_key": token})
            except stripe.StripeError as exc:
                if not _is_session_refused(exc):
                    raise
                self._forget_session(token)
                raise TransientError(
                    API, "the meter event session was refused (expired?); renewing it", status=401
                ) from None

        def attempt() -> None:
            # The session is read (made, if due) in each try but outside the try's own in-flight slot: made inside
            # it, its request would wait for a second slot while holding the first.
            token = self._stream_token()
            self._call_once(lambda: post(token), endpoint=METER_EVENT_STREAM, outcome_unknown=outcome_unknown)

        call_with_retries(attempt, max_retries=self._config.max_network_retries, what="stripe send meter event batch")

    def _stream_token(self) -> str:
        """The current meter event session's token, a new session's when it expires within the renewal margin
        (https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create: "Authentication tokens are only
        valid for 15 minutes"). Its lifetime is Stripe's (`expires_at - created`), counted on our clock from before
        the request, so a clock that differs from Stripe's cannot keep an expired token in use."""
        with self._session_lock:
            if self._session is not None and time.time() < self._session[1]:
                return self._session[0]
            asked_at = time.time()
            session = self._call(
                "create meter event session",
                lambda: self._client.v2.billing.meter_event_session.create(),
                endpoint=METER_EVENT_SESSION,
            ).to_dict()
            lifetime = (_v2_time(session["expires_at"]) - _v2_time(session["created"])).total_seconds()
            margin = min(SESSION_RENEWAL_MARGIN_SECONDS, lifetime / 2)
            self._session = (str(session["authentication_token"]), asked_at + lifetime - margin)
            return self._session[0]

    def _forget_session(self, token: str) -> None:
        with self._session_lock:
            if self._session is not None and self._session[0] == token:
                self._session = None

    def send_usage_record(self, intent: Intent, renew_key: KeyRenewal) -> None:
        def create(idempotency_key: str) -> None:
            self._client.raw_request(
                "post",
                f"/v1/subscription_items/{intent.item_id}/usage_records",
                quantity=intent.quantity,
                action="set",  # idempotent by value, so a fresh key after a 5xx answer cannot count it twice
                timestamp=epoch_seconds(intent.event_timestamp),
                stripe_version=self._config.legacy_api_version,
                idempotency_key=idempotency_key,
            )

        self._write("create usage record", "POST /v1/subscription_items/{id}/usage_records", intent, renew_key, create)

    def _write(
        self, what: str, endpoint: str, intent: Intent, renew_key: KeyRenewal, post: Callable[[str], None]
    ) -> None:
        """`post` the intent under its idempotency key, retried. A retry after no answer reuses the key, so Stripe
        recognises the request if it arrived. A 5xx answer was saved to the key and is replayed to every retry with
        it, so the next try goes under a fresh key, which `renew_key` commits to the ledger before it is used."""
        current = intent

        def post_under_current_key() -> None:
            nonlocal current
            try:
                post(current.idempotency_key)
            except stripe.StripeError as exc:
                if _is_server_error(exc):
                    current = renew_key(current)
                raise

        def attempt() -> None:
            try:
                post_under_current_key()
            except stripe.StripeError as exc:
                if not (_is_server_error(exc) and _is_replayed(exc)):
                    raise
                # The 5xx saved for an earlier try whose answer never came (a timeout, a restart): Stripe tried
                # nothing now, so try under the fresh key at once instead of spending a retry on the replay.
                post_under_current_key()

        self._call(what, attempt, endpoint=endpoint)
