"""The read-back job's ledger operations (usage/readback.py), each its own short transaction.

A period is due for a read-back once it is final and not yet read back, and whenever a Stripe error report names
one of its events (`UsageReport.rejected_at`); never while an intent of it is in flight. What the read-back
finds is written to the period (`read_back_*`, and Stripe's total in `stripe_total`), where `status`, `report`
and /metrics read it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from reconciler.ledger.schema import REJECTED_BY_STRIPE, PeriodStatus, UsagePeriod, UsageReport
from reconciler.ledger.usage_ledger import recorded_period
from reconciler.usage.model import IntentState, RecordedPeriod, SentEvent, StreamKind


def _rejected_reports_of(period_id: object):
    """SENT reports of the period that an error report has named, not yet settled by a read-back."""
    return (
        UsageReport.period_id == period_id,
        UsageReport.state == IntentState.SENT,
        UsageReport.rejected_at.is_not(None),
    )


def _settle_rejection_error(session: Session, period_id: int) -> None:
    """The error report noted on the period (`UsageLedger.record_rejected_event`) is settled by the read-back's
    finding, which replaces it where a person looks."""
    session.execute(
        update(UsagePeriod)
        .where(UsagePeriod.id == period_id, UsagePeriod.last_error.like(f"{REJECTED_BY_STRIPE}%"))
        .values(last_error=None, failures=0)
    )


class ReadBackLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def due(self, now: datetime, lookback: timedelta) -> list[RecordedPeriod]:
        """Periods to read back now, those whose invoices close first first."""
        named_by_error_report = exists().where(*_rejected_reports_of(UsagePeriod.id))
        in_flight = exists().where(UsageReport.period_id == UsagePeriod.id, UsageReport.state == IntentState.PENDING)
        with self._sessions() as session:
            rows = session.scalars(
                select(UsagePeriod)
                .where(UsagePeriod.period_end > now - lookback, ~in_flight)
                .where(
                    ((UsagePeriod.status == PeriodStatus.FINAL) & UsagePeriod.read_back_at.is_(None))
                    | named_by_error_report
                )
                .order_by(UsagePeriod.period_end, UsagePeriod.id)
            ).all()
        return [recorded_period(row) for row in rows]

    def rejected_reports(self, period_id: int) -> int:
        """How many of the period's accepted events an error report named: evidence Stripe does not hold them."""
        with self._sessions() as session:
            return session.scalar(select(func.count()).where(*_rejected_reports_of(period_id))) or 0

    def record(self, period_id: int, finding: str, note: str, stripe_total: object) -> None:
        """What the read-back found; the period is read back. Error reports it named are settled: Stripe holds
        the events after all (`ok`), or a person is asked (their reports move to REJECTED)."""
        now = self._clock()
        with self._sessions.begin() as session:
            reports = update(UsageReport).where(*_rejected_reports_of(period_id))
            if finding == "ok":
                session.execute(reports.values(rejected_at=None))
            else:
                session.execute(reports.values(state=IntentState.REJECTED))
            _settle_rejection_error(session, period_id)
            session.execute(
                update(UsagePeriod)
                .where(UsagePeriod.id == period_id)
                .values(
                    read_back_at=now,
                    read_back_finding=finding,
                    read_back_note=note or None,
                    stripe_total=None if stripe_total is None else str(stripe_total),
                    verified_at=now,
                )
            )

    def reopen_for_resend(self, period: RecordedPeriod, held: int, note: str) -> bool:
        """Stripe holds `held` of the period, less than we sent, and error reports name the difference: write that
        down and reopen the period, so the next usage cycle sends what OpenMeter measured under a new identifier
        (a `sum` meter the shortfall, a `last` meter the total again). False, changing nothing, if an intent was
        recorded for the period since `period` was read: its decision already rests on the old total."""
        now = self._clock()
        with self._sessions.begin() as session:
            row = session.get_one(UsagePeriod, period.id, with_for_update=True)
            in_flight = session.scalar(
                select(func.count()).where(UsageReport.period_id == row.id, UsageReport.state == IntentState.PENDING)
            )
            if row.next_sequence != period.next_sequence or row.reported_total != period.reported_total or in_flight:
                return False
            session.execute(update(UsageReport).where(*_rejected_reports_of(row.id)).values(state=IntentState.REJECTED))
            newest_held = session.scalar(
                select(func.max(UsageReport.event_timestamp)).where(
                    UsageReport.period_id == row.id, UsageReport.state == IntentState.SENT
                )
            )
            _settle_rejection_error(session, row.id)
            row.reported_total = held
            row.status = PeriodStatus.PROVISIONAL
            row.finalized_at = None
            # Sums are order-independent, so the resend may share the final event's timestamp; a `last` meter's
            # resend must be newer than every event Stripe still holds (the newest wins).
            row.last_event_at = None if row.kind == StreamKind.METER_SUM else newest_held
            row.read_back_at = None  # read back again once the resend is final
            row.read_back_finding = "resending"
            row.read_back_note = note
            row.stripe_total = str(held)
            row.verified_at = now
            row.updated_at = now
            return True


class SentEventLog:
    """What the ledger says Stripe accepted from us, for reading Stripe's summaries (usage/stripe_view.py)."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def sent_events(self, customer_id: str, meter_id: str | None, start: datetime, end: datetime) -> list[SentEvent]:
        """Every event of the customer and meter that Stripe accepted from us and no error report named, dated in
        `[start, end)`."""
        with Session(self._engine) as session:
            rows = session.execute(
                select(UsageReport.period_id, UsageReport.event_timestamp, UsageReport.quantity, UsageReport.sent_at)
                .join(UsagePeriod, UsagePeriod.id == UsageReport.period_id)
                .where(
                    UsagePeriod.customer_id == customer_id,
                    UsagePeriod.meter_id == meter_id,
                    UsageReport.state == IntentState.SENT,
                    UsageReport.rejected_at.is_(None),
                    UsageReport.event_timestamp >= start,
                    UsageReport.event_timestamp < end,
                )
            ).all()
        return [SentEvent(*columns) for columns in rows]

    def last_sent_at(self, period_id: int) -> datetime | None:
        """When Stripe last accepted an event of ours for the period (recorded just after it answered)."""
        with Session(self._engine) as session:
            sent_at = session.scalar(
                select(func.max(UsageReport.sent_at)).where(
                    UsageReport.period_id == period_id, UsageReport.state == IntentState.SENT
                )
            )
        return sent_at
