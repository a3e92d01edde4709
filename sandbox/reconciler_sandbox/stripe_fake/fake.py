"""FakeStripe: the HTTP entry point (authentication, routing, idempotency keys, Stripe's rate limiters) over the
resource mixins."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

from reconciler_sandbox import wire
from reconciler_sandbox.httpserver import GLOBAL_LIMITER, InjectedFault, Response
from reconciler_sandbox.stripe_fake.credits import CreditMixin
from reconciler_sandbox.stripe_fake.events import EventMixin
from reconciler_sandbox.stripe_fake.legacy_usage import LegacyUsageMixin
from reconciler_sandbox.stripe_fake.meter_event_stream import SESSION_PATH, STREAM_PATH, MeterEventStreamMixin
from reconciler_sandbox.stripe_fake.params import StripeError, _new_id, _query_pairs, parse_stripe_params
from reconciler_sandbox.stripe_fake.payments import PaymentMixin
from reconciler_sandbox.stripe_fake.seeding import SeedingMixin
from reconciler_sandbox.stripe_fake.state import DEFAULT_API_VERSION

_IDEMPOTENCY_TTL = 24 * 3600
_ENDPOINT_DEFAULT = "endpoint *"
_METER_EVENTS_ENDPOINT = "POST /v1/billing/meter_events"
_METER_EVENTS_LIMITER = "live meter events"
_METER_EVENT_STREAM_ENDPOINT = f"POST {STREAM_PATH}"
_METER_EVENT_STREAM_LIMITER = "live meter event stream"
_ROUTE_ID = re.compile(r"\(\?P<\w+>\[\^/\]\+\)")


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


class FakeStripe(SeedingMixin, MeterEventStreamMixin, LegacyUsageMixin, PaymentMixin, CreditMixin, EventMixin):
    """Stateful Stripe fake. See the package docstring; the seeding API returns dicts as served."""

    def __init__(self, api_key: str = "sk_test_sandbox", clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.api_key = api_key
        self.duplicate_identifier_response = "error"  # or "ignore"
        self.default_api_version = DEFAULT_API_VERSION  # used when a request has no Stripe-Version
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("GET", re.compile(r"/v1/customers/(?P<id>[^/]+)"), self._h_get_customer),
            ("GET", re.compile(r"/v1/prices"), self._h_list_prices),
            ("GET", re.compile(r"/v1/prices/(?P<id>[^/]+)"), self._h_get_price),
            ("GET", re.compile(r"/v1/subscriptions"), self._h_list_subscriptions),
            ("GET", re.compile(r"/v1/subscription_items"), self._h_list_subscription_items),
            ("POST", re.compile(r"/v1/subscription_items/(?P<id>[^/]+)/usage_records"), self._h_usage_record),
            (
                "GET",
                re.compile(r"/v1/subscription_items/(?P<id>[^/]+)/usage_record_summaries"),
                self._h_usage_record_summaries,
            ),
            ("GET", re.compile(r"/v1/billing/meters"), self._h_list_meters),
            ("GET", re.compile(r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries"), self._h_event_summaries),
            ("POST", re.compile(r"/v1/billing/meter_events"), self._h_create_meter_event),
            ("GET", re.compile(r"/v1/payment_intents"), self._h_list_payment_intents),
            ("GET", re.compile(r"/v1/payment_intents/(?P<id>[^/]+)"), self._h_get_payment_intent),
            ("GET", re.compile(r"/v1/invoices/(?P<id>[^/]+)"), self._h_get_invoice),
            ("GET", re.compile(r"/v1/invoice_payments"), self._h_list_invoice_payments),
            ("GET", re.compile(r"/v1/refunds"), self._h_list_refunds),
            ("GET", re.compile(r"/v1/billing/credit_balance_summary"), self._h_credit_balance_summary),
            ("GET", re.compile(r"/v2/core/events/(?P<id>[^/]+)"), self._h_get_v2_event),
            ("GET", re.compile(r"/v1/webhook_endpoints"), self._h_list_webhook_endpoints),
            ("GET", re.compile(r"/v2/core/event_destinations"), self._h_list_event_destinations),
            ("POST", re.compile(SESSION_PATH), self._h_create_meter_event_session),
        ]
        # Served by the meter events host only (`meter_events_host()`, meter_event_stream.py); listed with the others.
        self._meter_events_host_routes = [("POST", re.compile(STREAM_PATH))]
        self._init_state()

    def routes(self) -> list[str]:
        """Every route served, as ``"GET /v1/customers/{id}"`` (each path id written ``{id}``)."""
        every = [(method, pattern) for method, pattern, _ in self._routes] + self._meter_events_host_routes
        return [f"{method} {_ROUTE_ID.sub('{id}', pattern.pattern)}" for method, pattern in every]

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
        return status, {"Content-Type": "application/json"}, wire.dumps(payload, pretty=True)

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
                # https://docs.stripe.com/api/v2/billing/meter-event-stream/create: "up to 10,000 requests per
                # second in livemode". The docs give no sandbox figure: there it counts like any endpoint.
                self.budgets[_METER_EVENT_STREAM_LIMITER] = (10_000, window)

    def _limiters(self, method: str, path: str) -> list[str]:
        endpoint = self._endpoint_of(method, path)
        if endpoint == _METER_EVENTS_ENDPOINT and _METER_EVENTS_LIMITER in self.budgets:
            return [_METER_EVENTS_LIMITER]
        if endpoint == _METER_EVENT_STREAM_ENDPOINT and _METER_EVENT_STREAM_LIMITER in self.budgets:
            return [_METER_EVENT_STREAM_LIMITER]
        return [GLOBAL_LIMITER, f"endpoint {endpoint}"]

    def _budget_of(self, limiter: str) -> tuple[int, float] | None:
        budget = self.budgets.get(limiter)
        if budget is None and limiter.startswith("endpoint ") and limiter != _ENDPOINT_DEFAULT:
            return self.budgets.get(_ENDPOINT_DEFAULT)
        return budget

    def _endpoint_of(self, method: str, path: str) -> str:
        """The named operation a request is, its ids written `{id}` (`GET /v1/customers/{id}`)."""
        every = [(m, p) for m, p, _ in self._routes] + self._meter_events_host_routes
        for route_method, pattern in every:
            if route_method == method and pattern.fullmatch(path):
                return f"{method} {_ROUTE_ID.sub('{id}', pattern.pattern)}"
        return f"{method} {path}"
