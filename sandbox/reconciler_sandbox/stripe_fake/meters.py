"""Billing meters, meter events (validation, identifiers, rejections), their aggregation and the meter event
summaries, which lag behind the events by ``summary_lag_seconds``."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from reconciler_sandbox.stripe_fake.params import StripeError, _int_param, _json_number, _missing, _no_such
from reconciler_sandbox.stripe_fake.state import StripeState

_IDENTIFIER_WINDOW = 24 * 3600
_MAX_PAST = 35 * 86400
_MAX_FUTURE = 5 * 60


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


class MeterMixin(StripeState):
    """``/v1/billing/meters``, ``/v1/billing/meter_events`` and the event summaries."""

    # -- billing meters ---------------------------------------------------------------------------

    def _h_list_meters(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        status = params.get("status")
        if status is not None and status not in ("active", "inactive"):
            raise StripeError(400, "Invalid status: must be one of active, inactive", param="status")
        meters = [m for m in self.meters.values() if status is None or m["status"] == status]
        return self._paginate(self._newest_first(meters), params, "/v1/billing/meters", "billing meter")

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

    def meter_total(self, customer: str, event_name: str, start: int, end: int) -> Decimal:
        """Aggregate accepted events of ``event_name`` for ``customer`` with start ≤ timestamp < end."""
        with self.lock:
            meters = [m for m in self.meters.values() if m["event_name"] == event_name]
            if not meters:
                raise KeyError(f"no meter for event_name {event_name!r}")
            meter = next((m for m in meters if m["status"] == "active"), meters[0])
            return self._aggregate(meter, customer, start, end)


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
