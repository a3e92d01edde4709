"""`reconciler verify`: read Stripe's own view back and compare it with the ledger and with OpenMeter.

For each ledger period in range: what OpenMeter measures now (rounded as configured), what the ledger says it
reported, and what Stripe holds (meter event summaries; legacy usage record summaries). Stripe's summaries are
eventually consistent, so a difference less than `stripe.summary_lag` after we sent a report the summary covers is
`settling`, not a finding. They also take whole
minutes, while billing periods start at any second: the minutes asked for may hold the edge of the neighbouring
period of the same customer and meter (a final event is dated `end - 1 s`), and what the ledger says we sent
there is taken out before comparing (`attribute_to_period`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from reconciler.config import Config
from reconciler.ledger.schema import IntentState, UsagePeriod, UsageReport
from reconciler.upstream.errors import UpstreamError
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.usage.model import BillingPeriod, StreamKind
from reconciler.usage.periods import usage_window
from reconciler.usage.rounding import round_quantity

NEEDS_A_PERSON = frozenset({"foreign_usage", "missing_in_stripe", "late_drift", "unverifiable"})


@dataclass(frozen=True)
class VerifyLine:
    customer: str
    stripe_target: str
    kind: str
    period_start: str
    period_end: str
    ledger_status: str
    measured: int | None  # OpenMeter now, rounded
    reported: int  # what the ledger says Stripe holds because of us
    stripe: str | None  # what Stripe says it holds
    finding: str
    note: str


def classify(
    *,
    reported: int,
    stripe: Decimal | None,
    measured: int | None,
    is_final: bool,
    last_sent_at: datetime | None,
    now: datetime,
    summary_lag: timedelta,
) -> tuple[str, str]:
    """The finding for one period: ok, settling, foreign_usage, missing_in_stripe, late_drift or unverifiable.
    `last_sent_at`: when we last sent an event the summary covers (when it was sent, not the date it carries: a
    final event is dated before its period ends but may be sent an hour later)."""
    if stripe is None:
        return "unverifiable", "Stripe's summaries do not show this period"
    if stripe != reported:
        if last_sent_at is not None and now - last_sent_at < summary_lag:
            return "settling", "Stripe's summaries may not include the latest report yet"
        if stripe > reported:
            return "foreign_usage", f"Stripe holds {stripe - reported} more than the reconciler sent (another writer?)"
        return "missing_in_stripe", f"Stripe holds {reported - stripe} less than the reconciler sent (rejected?)"
    if measured is not None and measured != reported:
        if is_final:
            return "late_drift", f"OpenMeter now measures {measured}; the period is final"
        return "ok", f"OpenMeter now measures {measured}; the next cycle reports it"
    return "ok", ""


@dataclass(frozen=True)
class SentEvent:
    """A meter event Stripe accepted from us, as the ledger recorded it."""

    period_id: int
    timestamp: datetime
    value: int
    sent_at: datetime | None


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


def _minute_floor(instant: datetime) -> datetime:
    return instant.replace(second=0, microsecond=0)


def _minute_ceil(instant: datetime) -> datetime:
    floor = _minute_floor(instant)
    return floor if floor == instant else floor + timedelta(minutes=1)


class Verifier:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        stripe: StripeGateway,
        openmeter: OpenMeterGateway,
        clock: Callable[[], datetime],
    ):
        self._config = config
        self._engine = engine
        self._stripe = stripe
        self._openmeter = openmeter
        self._clock = clock

    def run(self, since: datetime | None = None, until: datetime | None = None) -> list[VerifyLine]:
        now = self._clock()
        since = since or now - self._config.usage.lookback
        until = until or now
        with Session(self._engine) as session:
            rows = session.scalars(
                select(UsagePeriod)
                .where(UsagePeriod.period_end > since, UsagePeriod.period_start < until)
                .order_by(UsagePeriod.customer_id, UsagePeriod.period_start)
            ).all()
        lines = [self._verify(row, now) for row in rows]
        with Session(self._engine) as session, session.begin():  # keep Stripe's view for `report`
            for row, line in zip(rows, lines, strict=True):
                if line.stripe is not None:
                    session.execute(
                        update(UsagePeriod)
                        .where(UsagePeriod.id == row.id)
                        .values(stripe_total=line.stripe, verified_at=now)
                    )
        return lines

    def _verify(self, row: UsagePeriod, now: datetime) -> VerifyLine:
        stripe: Decimal | None = None
        measured: int | None = None
        error = attribution = ""
        last_sent_at = self._last_sent_at(row)
        try:
            if row.meter_id:
                # Summaries take minute-aligned bounds, end exclusive, and never an end in the future: the
                # minutes that have ended. A report in the current minute is within stripe.summary_lag anyway.
                start = _minute_floor(row.period_start)
                end = min(_minute_ceil(row.period_end), _minute_floor(now))
                if end > start:
                    summary = self._stripe.meter_total(row.meter_id, row.customer_id, start, end)
                    sent = self._sent_events(row, start, end)
                    stripe, attribution = attribute_to_period(summary, row.kind, row.id, sent)
                    # The neighbours' events taken out of the summary may be as new to Stripe as our own.
                    last_sent_at = max(filter(None, [last_sent_at, *(event.sent_at for event in sent)]), default=None)
            else:
                legacy = self._stripe.legacy_usage_total(row.subscription_item_id, row.period_start)
                stripe = None if legacy is None else Decimal(legacy)
            measured = self._measure(row, now)
        except UpstreamError as exc:
            error = str(exc)
        finding, reason = classify(
            reported=row.reported_total,
            stripe=stripe,
            measured=measured,
            is_final=row.status == "final",
            last_sent_at=last_sent_at,
            now=now,
            summary_lag=self._config.stripe.summary_lag,
        )
        return VerifyLine(
            customer=row.customer_id,
            stripe_target=row.stripe_target,
            kind=row.kind,
            period_start=row.period_start.isoformat(),
            period_end=row.period_end.isoformat(),
            ledger_status=row.status,
            measured=measured,
            reported=row.reported_total,
            stripe=None if stripe is None else str(stripe),
            finding=finding,
            note="; ".join(part for part in (error or reason, attribution) if part),
        )

    def _sent_events(self, row: UsagePeriod, start: datetime, end: datetime) -> list[SentEvent]:
        """Every event of the row's customer and meter that Stripe accepted from us, dated in `[start, end)`."""
        with Session(self._engine) as session:
            rows = session.execute(
                select(UsageReport.period_id, UsageReport.event_timestamp, UsageReport.quantity, UsageReport.sent_at)
                .join(UsagePeriod, UsagePeriod.id == UsageReport.period_id)
                .where(
                    UsagePeriod.customer_id == row.customer_id,
                    UsagePeriod.meter_id == row.meter_id,
                    UsageReport.state == IntentState.SENT,
                    UsageReport.event_timestamp >= start,
                    UsageReport.event_timestamp < end,
                )
            ).all()
        return [SentEvent(*columns) for columns in rows]

    def _last_sent_at(self, row: UsagePeriod) -> datetime | None:
        """When Stripe last accepted an event of ours for the period (recorded just after it answered)."""
        with Session(self._engine) as session:
            sent_at = session.scalar(
                select(func.max(UsageReport.sent_at)).where(
                    UsageReport.period_id == row.id, UsageReport.state == IntentState.SENT
                )
            )
        return sent_at

    def _measure(self, row: UsagePeriod, now: datetime) -> int | None:
        mapping = self._config.usage.mapping_for(row.stripe_target)
        if mapping is None:
            return None
        usage = self._config.usage
        window = usage_window(
            BillingPeriod(row.period_start, row.period_end), now, usage.window_size, ZoneInfo(usage.window_time_zone)
        )
        if window.is_empty:
            return 0
        total = self._openmeter.query_total(row.openmeter_meter, row.subject, window)
        return round_quantity(total, mapping.rounding)


def render_json(lines: list[VerifyLine]) -> str:
    return json.dumps(
        {
            "periods": [asdict(line) for line in lines],
            "needs_a_person": sum(1 for line in lines if line.finding in NEEDS_A_PERSON),
        },
        indent=2,
    )
