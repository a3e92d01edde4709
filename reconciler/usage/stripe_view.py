"""What Stripe holds for one ledger period, as its summaries show it: read by `verify` and the read-back job.

Stripe's meter event summaries are eventually consistent ("Meters events are aggregated asynchronously",
https://docs.stripe.com/api/billing/meter-event-summary): a summary read less than `stripe.summary_lag` after an
event it covers was sent may not show that event yet, so every reading carries when the newest such event left.
Summaries take whole minutes (end exclusive, never in the future), while billing periods start at any second: the
minutes asked for may hold the edge of the neighbouring period of the same customer and meter (a final event is
dated `end - 1 s`), and what the ledger says we sent there is taken out (`attribute_to_period`). Legacy items are
read from their usage record summaries, per period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from reconciler.usage.model import RecordedPeriod, SentEvent, StreamKind
from reconciler.usage.ports import SentEvents
from reconciler.usage.recovery import StripeSummaries


@dataclass(frozen=True)
class StripeHolding:
    total: Decimal | None  # None: the summaries cannot show this period
    last_sent_at: datetime | None  # when the newest event of ours the reading covers left (None: none did)
    note: str  # how the total was attributed, if it needed to be


def settled(newest_send: datetime | None, now: datetime, summary_lag: timedelta) -> bool:
    """Whether a summary read now can be trusted about every event of ours it covers: the newest left at least
    `summary_lag` ago, and before the current minute, which no summary covers yet (an event is never dated after
    it was sent)."""
    return newest_send is None or (newest_send <= now - summary_lag and newest_send < minute_floor(now))


def attribute_to_period(
    summary: Decimal, kind: str, period_id: int, sent: list[SentEvent]
) -> tuple[Decimal | None, str]:
    """The part of a minute-aligned summary that belongs to one period, given every event of the same customer
    and meter we sent into those minutes; None when the summary cannot show it. `sum`: the neighbours' values
    are taken out. `last`: the summary is the newest event's value, which shows this period only if that event
    is this period's."""
    neighbours = [event for event in sent if event.period_id != period_id]
    if not neighbours:
        return summary, ""
    if kind == StreamKind.METER_SUM:
        taken_out = sum(event.value for event in neighbours)
        return summary - taken_out, (
            f"Stripe's whole-minute summary also held {taken_out} we sent into the neighbouring period; taken out"
        )
    newest = max(sent, key=lambda event: event.timestamp)
    if newest.period_id != period_id:
        return None, "the newest event in Stripe's whole-minute summary belongs to the neighbouring period"
    return summary, ""


def minute_floor(instant: datetime) -> datetime:
    return instant.replace(second=0, microsecond=0)


def minute_ceil(instant: datetime) -> datetime:
    floor = minute_floor(instant)
    return floor if floor == instant else floor + timedelta(minutes=1)


def _minutes(row: RecordedPeriod, now: datetime) -> tuple[datetime, datetime]:
    """The whole minutes a summary of the period covers: minute-aligned, end exclusive, never in the future (a
    report in the current minute is within stripe.summary_lag anyway)."""
    return minute_floor(row.period_start), min(minute_ceil(row.period_end), minute_floor(now))


def _newest(own: datetime | None, sent: list[SentEvent]) -> datetime | None:
    # The neighbours' events a summary holds may be as new to Stripe as our own.
    return max(filter(None, [own, *(event.sent_at for event in sent)]), default=None)


class StripeView:
    def __init__(self, sent: SentEvents, stripe: StripeSummaries):
        self._sent = sent
        self._stripe = stripe

    def holding(self, row: RecordedPeriod, now: datetime) -> StripeHolding:
        """What Stripe holds for the period by its summaries: one summary listing (meters) or one usage record
        summary listing (legacy). Raises UpstreamError."""
        if not row.meter_id:
            legacy = self._stripe.legacy_usage_total(row.subscription_item_id, row.period_start)
            return StripeHolding(None if legacy is None else Decimal(legacy), self._last_sent_at(row.id), "")
        start, end = _minutes(row, now)
        sent = self._sent_events(row, start, end)
        newest = _newest(self._last_sent_at(row.id), sent)
        if end <= start:
            return StripeHolding(Decimal(0), newest, "")
        summary = self._stripe.meter_total(row.meter_id, row.customer_id, start, end)
        total, note = attribute_to_period(summary, row.kind, row.id, sent)
        return StripeHolding(total, newest, note)

    def newest_send(self, row: RecordedPeriod, now: datetime) -> datetime | None:
        """When the newest event of ours that `holding` would read left, from the ledger alone: a reading sooner
        than stripe.summary_lag after it is not worth a call."""
        sent = self._sent_events(row, *_minutes(row, now)) if row.meter_id else []
        return _newest(self._last_sent_at(row.id), sent)

    def _sent_events(self, row: RecordedPeriod, start: datetime, end: datetime) -> list[SentEvent]:
        """Every event of the row's customer and meter that Stripe accepted from us and no error report named,
        dated in `[start, end)`."""
        return self._sent.sent_events(row.customer_id, row.meter_id, start, end)

    def _last_sent_at(self, period_id: int) -> datetime | None:
        """When Stripe last accepted an event of ours for the period (recorded just after it answered)."""
        return self._sent.last_sent_at(period_id)
