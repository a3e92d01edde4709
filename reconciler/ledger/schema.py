"""The ledger's tables. Alembic migrations in `migrations/` create them; this module is their one description.

- `usage_periods`: one row per stream and billing period: what OpenMeter measured (`target`), what Stripe
  holds because of us (`reported_total`), and whether the period is still provisional or final.
- `usage_reports`: one row per report *intent*, written before the Stripe call and marked after it. Its
  `identifier` (meter event identifier, and the base of the idempotency key) is the period, `sequence` and a
  random nonce, made once when the intent is written and stored: a resend after a crash carries it, so Stripe
  recognises it, and a new intent never collides with an old one, not even one a restored or recreated ledger
  forgot.
- `late_drift`: totals that changed after a period could no longer be reported.
- `runs`: one row per cycle, with its outcome and counts.
- `openmeter_meters`: OpenMeter's meters (id, aggregation) as last listed.
- `usage_listing`: a running usage cycle's stream periods as Stripe listed them, read back grouped by stream;
  emptied when the cycle's planning ends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reconciler.usage.model import IntentState


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database, identically on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; pass aware UTC datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class PeriodStatus:
    PROVISIONAL = "provisional"
    FINAL = "final"


# How `last_error` and a report's `error` begin when a Stripe error report named the event (attention.py tells
# these apart from other failures by it).
REJECTED_BY_STRIPE = "rejected by Stripe: "


class UsagePeriod(Base):
    __tablename__ = "usage_periods"
    __table_args__ = (
        UniqueConstraint("stream_key", "period_start", name="uq_usage_periods_stream_period"),
        Index("ix_usage_periods_status_period_end", "status", "period_end"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stream_key: Mapped[str] = mapped_column(String(255))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    subscription_id: Mapped[str] = mapped_column(String(255))
    subscription_item_id: Mapped[str] = mapped_column(String(255))
    stripe_target: Mapped[str] = mapped_column(String(255))
    meter_id: Mapped[str | None] = mapped_column(String(255))
    openmeter_meter: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=PeriodStatus.PROVISIONAL)
    target: Mapped[int | None] = mapped_column(BigInteger)
    reported_total: Mapped[int] = mapped_column(BigInteger, default=0)
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_sequence: Mapped[int] = mapped_column(Integer, default=1)
    late_total: Mapped[int | None] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unit_amount: Mapped[str | None] = mapped_column(String(64))  # minor units per unit, for amounts at stake
    currency: Mapped[str | None] = mapped_column(String(8))
    stripe_total: Mapped[str | None] = mapped_column(String(64))  # what Stripe holds, as last read back
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The read-back job (usage/readback.py): when it last settled the period (None: due once the period is final)
    # and what it found (ReadBackFinding), with a note for a person.
    read_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    read_back_finding: Mapped[str | None] = mapped_column(String(32))
    read_back_note: Mapped[str | None] = mapped_column(Text)


class UsageReport(Base):
    __tablename__ = "usage_reports"
    __table_args__ = (
        UniqueConstraint("period_id", "sequence", name="uq_usage_reports_period_sequence"),
        # A period's pending intent, whatever the planner's statistics say (migration 0018).
        Index("ix_usage_reports_period_state", "period_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    period_id: Mapped[int] = mapped_column(ForeignKey("usage_periods.id"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    identifier: Mapped[str] = mapped_column(String(100), unique=True)
    quantity: Mapped[int] = mapped_column(BigInteger)
    total_after: Mapped[int] = mapped_column(BigInteger)
    event_timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default=IntentState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Which idempotency key the report is sent under (Intent.idempotency_key): 0 at first, one more after each 5xx
    # answer, which Stripe saved to the key in use and would replay to every resend with it. Raised and committed
    # before the request that uses it is sent.
    idempotency_key_number: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    run_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the latest resend may have left (written before it is sent); None: only the first send, at created_at.
    # Stripe's summaries are not trusted about a report until stripe.summary_lag after it.
    attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    # When a Stripe error report named this event (accepted, then rejected asynchronously): evidence that Stripe
    # does not hold it. The read-back confirms it from the summary and moves the report to REJECTED.
    rejected_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UnbilledItem(Base):
    """A metered item the usage sync does not report (no entry in usage.meters, or refused with a reason), as the
    latest full cycle saw it: what it measures in its current period where that can be known, and its price."""

    __tablename__ = "unbilled_items"
    __table_args__ = (UniqueConstraint("subscription_item_id", "stripe_target", name="uq_unbilled_items_item_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    subscription_item_id: Mapped[str] = mapped_column(String(255))
    stripe_target: Mapped[str] = mapped_column(String(255))
    unmapped: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    measured: Mapped[int | None] = mapped_column(BigInteger)  # None: unknown (nothing says what to measure)
    unit_amount: Mapped[str | None] = mapped_column(String(64))
    currency: Mapped[str | None] = mapped_column(String(8))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    run_id: Mapped[str] = mapped_column(String(36))


class LateDrift(Base):
    __tablename__ = "late_drift"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    period_id: Mapped[int] = mapped_column(ForeignKey("usage_periods.id"), index=True)
    observed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reported_total: Mapped[int] = mapped_column(BigInteger)
    observed_total: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str] = mapped_column(String(36))


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))  # running | succeeded | partial | interrupted | failed
    summary: Mapped[str | None] = mapped_column(Text)  # JSON counts
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)


class MoesifTransaction(Base):
    """One balance transaction we send to Moesif, written before it is sent.

    `transaction_id` is the PaymentIntent id (top-up credit), the refund id (debit), or derived from the drift
    observation (correction): one id, one amount, for ever. `outcome_unknown` marks a transaction an attempt of
    which may have been applied without an answer: if Moesif does not deduplicate ids, a person checks it.
    """

    __tablename__ = "moesif_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # topup | refund | correction
    source_id: Mapped[str] = mapped_column(String(255), index=True)
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    subscription_id: Mapped[str] = mapped_column(String(255), index=True)
    currency: Mapped[str] = mapped_column(String(8))
    amount_minor: Mapped[int] = mapped_column(BigInteger)  # positive; `type` gives the direction
    type: Mapped[str] = mapped_column(String(8))  # credit | debit
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | sent | failed | held
    outcome_unknown: Mapped[bool] = mapped_column(Boolean, default=False)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # corrections seen landed in Moesif
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Committed after the Moesif budget grants a slot, just before the first request leaves: a pending row
    # without it was never sent (the process died while it waited), so sending it cannot apply it twice.
    attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why a person must look at it (e.g. an invoice payment an earlier version forwarded as a top-up); None: no one.
    attention: Mapped[str | None] = mapped_column(Text)


class BalanceResolution(Base):
    """A person's decision on a Moesif transaction the balance job could not settle (`reconciler balances
    resolve`): who, when, what it needed a person for, and whether it was applied in Moesif. A `not_applied` row
    is written before the one resend it allows, so a crash during the resend cannot lead to a second one."""

    __tablename__ = "balance_resolutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(255), index=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(16))  # applied | not_applied
    was: Mapped[str] = mapped_column(Text)  # why it needed a person
    note: Mapped[str | None] = mapped_column(Text)
    resolved_by: Mapped[str] = mapped_column(String(255))
    resolved_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class BalanceObservation(Base):
    """Every comparison of a customer's Stripe credit with Moesif's balance, in minor units."""

    __tablename__ = "balance_observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36))
    observed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    subscription_id: Mapped[str] = mapped_column(String(255))
    currency: Mapped[str] = mapped_column(String(8))
    stripe_credit_minor: Mapped[int] = mapped_column(BigInteger)
    open_usage_minor: Mapped[int] = mapped_column(BigInteger)
    expected_minor: Mapped[int] = mapped_column(BigInteger)
    moesif_minor: Mapped[int] = mapped_column(BigInteger)
    difference_minor: Mapped[int] = mapped_column(BigInteger)  # expected − Moesif
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    correction_transaction_id: Mapped[str | None] = mapped_column(String(255))


class WebhookEvent(Base):
    """A Stripe webhook event and the work it implies, stored in one transaction before Stripe gets its 2xx."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(255))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    work: Mapped[str | None] = mapped_column(String(32))  # None: acknowledged, nothing to do
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | done | failed | ignored
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Replica(Base):
    """A live `reconciler run` process (PostgreSQL only); live while its heartbeat is fresh."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class CycleTick(Base):
    """One row per job tick: the replica whose insert wins plans that cycle; the others only execute it."""

    __tablename__ = "cycle_ticks"
    __table_args__ = (UniqueConstraint("job", "tick_key", name="uq_cycle_ticks_job_tick"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(32))
    tick_key: Mapped[str] = mapped_column(String(64))
    planned_by: Mapped[str] = mapped_column(String(36))
    planned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # set once every work item is written


class WorkItem(Base):
    """One stream period of a planned cycle, claimed by one replica at a time under a lease.

    `fencing_token` grows with every claim; ledger writes for the item check it in the same transaction, so a
    replica whose lease expired (and was reclaimed by another) can no longer write.
    """

    __tablename__ = "work_items"
    # Claims walk a job's pending (or lapsed) items in plan order (reconciler.ledger.coordination.claim_batch).
    __table_args__ = (Index("ix_work_items_job_state_id", "job", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tick_id: Mapped[int] = mapped_column(ForeignKey("cycle_ticks.id"), index=True)
    job: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | claimed | done
    lease_owner: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fencing_token: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PlanState(Base):
    """What the app last acknowledged (2xx) for a customer's user: the plan sync sends only differences."""

    __tablename__ = "plan_states"

    customer_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    plan: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BackfillRun(Base):
    """A backfill's checkpoint: the same command (same `key`) resumes an unfinished run where it stopped."""

    __tablename__ = "backfill_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)  # hash of range and filters
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    total: Mapped[int] = mapped_column(Integer)


class BackfillItem(Base):
    """One stream period a backfill run has finished."""

    __tablename__ = "backfill_items"
    __table_args__ = (UniqueConstraint("run_id", "unit_key", name="uq_backfill_items_run_unit"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("backfill_runs.id"), index=True)
    unit_key: Mapped[str] = mapped_column(String(255))
    done_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OpenMeterMeter(Base):
    """OpenMeter's meters as last listed: which may be summed window by window (SUM, COUNT), and the id that
    queries use, so that a meter deleted and made again under its slug is never queried with an old aggregation."""

    __tablename__ = "openmeter_meters"

    slug: Mapped[str] = mapped_column(String(64), primary_key=True)
    meter_id: Mapped[str] = mapped_column(String(64))
    aggregation: Mapped[str] = mapped_column(String(32))
    listed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UsageListing(Base):
    """One stream period of a running usage cycle's listing (reconciler.ledger.listing): the cycle writes Stripe's
    listing here a batch at a time and reads it back ordered by stream, so one customer's items on one meter are
    seen together however far apart Stripe listed them, without holding the listing in memory. A cycle deletes its
    rows when its planning ends; rows a crashed process left are deleted a day later."""

    __tablename__ = "usage_listing"
    # listing_id: when the listing was opened (epoch seconds, zero-padded), then random; see ListingLedger.open.
    __table_args__ = (Index("ix_usage_listing_listing_stream", "listing_id", "stream_key", "period_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    listing_id: Mapped[str] = mapped_column(String(36))
    stream_key: Mapped[str] = mapped_column(String(255))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    payload: Mapped[str] = mapped_column(Text)  # the stream period (reconciler.usage.codec.dump_listed)
