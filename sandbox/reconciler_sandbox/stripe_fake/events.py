"""Thin (v2) events: the meter error reports Stripe pushes to event destinations, ``GET /v2/core/events/{id}``,
the event destinations and the snapshot-payload webhook endpoints the account lists."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from reconciler_sandbox.stripe_fake.meters import MeterEvent
from reconciler_sandbox.stripe_fake.params import StripeError, _as_list, _int_param, _new_id
from reconciler_sandbox.stripe_fake.state import StripeState

# --------------------------------------------------------------------------------------------------
# Thin events (v2): the meter error reports
#
# https://docs.stripe.com/api/v2/core/events/event-types: v1.billing.meter.error_report_triggered ("a Meter has
# invalid async usage events", related object: the meter) and v1.billing.meter.no_meter_found (no related object)
# are thin events: they go only to event destinations with the thin payload style, whose body is the event without
# `data` (https://docs.stripe.com/event-destinations); GET /v2/core/events/{id} returns it with `data`
# (https://docs.stripe.com/api/v2/core/events/object: developer_message_summary, reason.error_count,
# reason.error_types[].code/error_count/sample_errors[].error_message/request.identifier, validation_start/end).

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
    if event.reason == "meter_event_customer_not_found":
        return f"No customer with id {event.customer} was found."
    return f"The meter event is invalid ({event.reason})."


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
        webhook_endpoint.url"). Only the list is served: nothing calls `GET /v2/core/event_destinations/{id}`."""
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


class EventMixin(StripeState):
    """Event destinations, webhook endpoints, meter error reports and v2 events."""

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
