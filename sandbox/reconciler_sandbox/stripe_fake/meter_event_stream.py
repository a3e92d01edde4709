"""The v2 meter event stream: sessions (``POST /v2/billing/meter_event_session`` on the API host) and the stream
itself (``POST /v2/billing/meter_event_stream``), served from a host of its own (Stripe's is
https://meter-events.stripe.com): serve :meth:`MeterEventStreamMixin.meter_events_host` on a second loopback port.

What Stripe documents, and the fake follows:

- https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create: a session
  (``v2.billing.meter_event_session``: ``id``, ``authentication_token``, ``created``, ``expires_at``,
  ``livemode``) whose token is "only valid for 15 minutes, so you will need to create a new meter event session
  when your token expires". No parameters.
- https://docs.stripe.com/api/v2/billing/meter-event-stream/create: ``{"events": [...]}``, "up to 100 events per
  request", each with ``event_name``, ``payload`` (string values; the meter's customer and value keys),
  ``identifier`` ("We'll enforce uniqueness within a rolling 24 hour period") and ``timestamp`` (RFC 3339, within the
  past 35 days or up to 5 minutes ahead). "Events are processed asynchronously, including validation": the answer is
  ``{}`` and nothing about an event is refused synchronously. An expired token: 401
  ``billing_meter_event_session_expired``, "The temporary session token has expired." (stripe-python maps the v2
  error type ``temporary_session_expired`` to ``TemporarySessionExpiredError``.) "Supports up to 10,000 requests
  per second in livemode."
- https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api: invalid events are reported later,
  through the meter error events (here: the same ``rejected_meter_events`` and ``flush_meter_error_reports`` as
  v1 meter events).

Where the docs are silent, the fake takes the answer worse for a client:

- a repeated identifier within 24 hours is dropped silently (200, not applied, never reported): a client learns
  nothing from the answer, so it cannot tell its own retry from a foreign event holding the identifier;
- an event outside the timestamp window, with an unparseable value, an unknown meter or customer is accepted (200)
  and rejected asynchronously;
- more than 100 events, or a body that is not ``{"events": [objects]}``, is refused whole with a 400 (nothing
  applied);
- an unknown token, or the account's secret key itself, is refused with a 401 (``api_key_invalid``);
- in a sandbox (test mode) the docs give the stream no limit of its own: it counts against the global limit and
  its endpoint's 25/s, like the other endpoints (``FakeStripe.limit_like_stripe``); live, 10,000/s apart;
- the stream keeps no idempotency keys (its identifiers are the deduplication the docs promise).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from reconciler_sandbox.httpserver import InjectedFault, Response
from reconciler_sandbox.stripe_fake.meters import (
    _IDENTIFIER_WINDOW,
    _MAX_FUTURE,
    _MAX_PAST,
    MeterEvent,
    MeterMixin,
    _parse_value,
)
from reconciler_sandbox.stripe_fake.params import StripeError, _new_id

SESSION_PATH = "/v2/billing/meter_event_session"
STREAM_PATH = "/v2/billing/meter_event_stream"
SESSION_SECONDS = 15 * 60
MAX_EVENTS_PER_REQUEST = 100


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch * 1000) % 1000:03d}Z"


def _parse_rfc3339(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(parsed.timestamp()) if parsed.tzinfo is not None else None


def _v2_error(status: int, error_type: str, code: str, message: str) -> Response:
    body = {"error": {"type": error_type, "code": code, "message": message}}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@dataclass(frozen=True)
class MeterEventSession:
    id: str
    token: str
    created: float
    expires_at: float

    def as_served(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": self.token,
            "created": _rfc3339(self.created),
            "expires_at": _rfc3339(self.expires_at),
            "livemode": False,
        }


class MeterEventsHost:
    """The stream's own host (https://meter-events.stripe.com), an App of its own for a LoopbackServer."""

    def __init__(self, fake: MeterEventStreamMixin) -> None:
        self.fake = fake

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Mapping[str, str], body: bytes
    ) -> Response:
        return self.fake._handle_meter_events_host(method, path, query, headers, body)


class MeterEventStreamMixin(MeterMixin):
    """Meter event sessions and the v2 meter event stream."""

    def _init_state(self) -> None:
        super()._init_state()
        self.meter_event_sessions: dict[str, MeterEventSession] = {}  # by token
        self.stream_requests = 0  # stream requests answered 200

    def meter_events_host(self) -> MeterEventsHost:
        """The App serving the stream's host: ``LoopbackServer(fake.meter_events_host())``."""
        return MeterEventsHost(self)

    # -- the API host: sessions ------------------------------------------------------------------

    def _h_create_meter_event_session(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        now = self.clock()
        session = MeterEventSession(
            id=_new_id("mes_test_", 24),
            token=_new_id("mes_tok_", 40),
            created=now,
            expires_at=now + SESSION_SECONDS,
        )
        self.meter_event_sessions[session.token] = session
        return session.as_served()

    def expire_meter_event_sessions(self) -> None:
        """Every token issued so far is expired from now on (as if its 15 minutes had passed)."""
        with self.lock:
            now = self.clock()
            for token, session in list(self.meter_event_sessions.items()):
                self.meter_event_sessions[token] = MeterEventSession(session.id, token, session.created, now)

    # -- the stream's host -------------------------------------------------------------------------

    def _handle_meter_events_host(
        self, method: str, path: str, query: dict[str, list[str]], headers: Mapping[str, str], body: bytes
    ) -> Response:
        hdrs = {k.lower(): v for k, v in headers.items()}
        try:
            params: dict[str, Any] = json.loads(body) if body else {}
        except ValueError:
            params = {"_unparseable": body.decode("utf-8", "replace")}
        response = self._serve(
            method,
            path,
            query,
            hdrs,
            params if isinstance(params, dict) else {"_body": params},
            body,
            lambda: self._stream_answer(method, path, params, hdrs),
            self._stamp_fault,
        )
        if "Request-Id" not in response[1]:
            response = self._with_request_id(response)  # type: ignore[attr-defined]
        return response

    def _stamp_fault(self, fault: InjectedFault, response: Response, applied: Response | None) -> Response:
        return self._with_request_id(response)  # type: ignore[attr-defined,no-any-return]

    def _stream_answer(self, method: str, path: str, params: Any, hdrs: Mapping[str, str]) -> Response:
        if (method, path) != ("POST", STREAM_PATH):
            return _v2_error(404, "invalid_request_error", "not_found", f"Unrecognized request URL ({method}: {path}).")
        auth = hdrs.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        session = self.meter_event_sessions.get(token)
        if session is None:
            # Silent in the docs: a token never issued (or the secret key itself) is refused like a bad key.
            return _v2_error(401, "invalid_request_error", "api_key_invalid", "Invalid meter event session token.")
        if self.clock() >= session.expires_at:
            return _v2_error(
                401,
                "temporary_session_expired",
                "billing_meter_event_session_expired",
                "The temporary session token has expired.",
            )
        events = params.get("events") if isinstance(params, dict) else None
        if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
            return _v2_error(400, "invalid_request_error", "invalid_request", "events must be a list of objects.")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            return _v2_error(
                400,
                "invalid_request_error",
                "invalid_request",
                f"Too many events: at most {MAX_EVENTS_PER_REQUEST} events per request.",
            )
        for event in events:
            self._accept_stream_event(event)
        self.stream_requests += 1
        return 200, {"Content-Type": "application/json"}, b"{}"

    def _accept_stream_event(self, raw: dict[str, Any]) -> None:
        """Accept one event: apply it, drop it as a repeat, or keep it to report asynchronously as rejected."""
        now = self._now()
        identifier = raw.get("identifier")
        if not isinstance(identifier, str) or not identifier:
            identifier = str(uuid.uuid4())
        previous = self._identifiers.get(identifier)
        if previous is not None and now - previous.created < _IDENTIFIER_WINDOW:
            return  # deduplicated silently
        event_name = str(raw.get("event_name") or "")
        payload = raw.get("payload") if isinstance(raw.get("payload"), dict) else {}
        payload = {str(k): v for k, v in payload.items()}
        timestamp = _parse_rfc3339(raw.get("timestamp")) if raw.get("timestamp") is not None else now
        meter = self._active_meter_for(event_name)
        reason: str | None = None
        customer: str | None = None
        value: Decimal | None = None
        if meter is None:
            reason = "no_meter"
            customer = payload.get("stripe_customer_id") if isinstance(payload.get("stripe_customer_id"), str) else None
        else:
            ckey = meter["customer_mapping"]["event_payload_key"]
            vkey = meter["value_settings"]["event_payload_key"]
            raw_customer = payload.get(ckey)
            customer = raw_customer if isinstance(raw_customer, str) else None
            if meter["default_aggregation"]["formula"] == "count" and vkey not in payload:
                value = Decimal(1)
            else:
                try:
                    value = _parse_value(payload.get(vkey), f"payload[{vkey}]")  # type: ignore[arg-type]
                except StripeError:
                    reason = "meter_event_invalid_value"
            if timestamp is None or any(not isinstance(v, str) for v in payload.values()):
                reason = reason or "meter_event_invalid_payload"
            elif timestamp < now - _MAX_PAST:
                reason = "timestamp_too_far_in_past"
            elif timestamp > now + _MAX_FUTURE:
                reason = "timestamp_in_future"
            elif customer is None:
                reason = reason or "meter_event_no_customer_defined"
            elif customer not in self.customers:
                reason = reason or "meter_event_customer_not_found"
        self._seq += 1
        event = MeterEvent(
            event_name=event_name,
            identifier=identifier,
            timestamp=timestamp or now,
            created=now,
            payload={k: str(v) for k, v in payload.items()},
            customer=customer,
            value=value,
            seq=self._seq,
            reason=reason,
            meter_id=meter["id"] if meter is not None else None,
        )
        if reason is None and self._async_rejections:
            event.reason, reported = self._async_rejections.pop(0)
            event.unreported = not reported
        if event.reason is None:
            self.meter_events.append(event)
        else:
            self.rejected_meter_events.append(event)
        self._identifiers[identifier] = event
