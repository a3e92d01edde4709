"""The balance ledger's operations: every Moesif transaction is written before it is sent, so a top-up, a
refund or a correction is forwarded at most once per transaction id, whatever crashes in between."""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reconciler.balances.drift import Assessment, RecentTransaction
from reconciler.balances.model import (
    AlreadyRecordedError,
    BalanceAccount,
    OpenUsage,
    PlannedTransaction,
    StoredTransaction,
)
from reconciler.balances.money import to_units
from reconciler.balances.sweep import LastObservation
from reconciler.ledger.balance_lock import balance_job_lock
from reconciler.ledger.schema import BalanceObservation, MoesifTransaction, UsagePeriod
from reconciler.usage.model import IntentState


class BalanceLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def job_lock(self, *, exclusive: bool) -> AbstractContextManager[None]:
        """Balance cycles hold it shared, a person resolving a transaction exclusively (ledger.balance_lock)."""
        return balance_job_lock(self._engine, exclusive=exclusive)

    # -- Moesif transactions -------------------------------------------------------------------------

    def get(self, transaction_id: str) -> StoredTransaction | None:
        with self._sessions() as session:
            row = session.scalars(
                select(MoesifTransaction).where(MoesifTransaction.transaction_id == transaction_id)
            ).one_or_none()
            return None if row is None else _stored(row)

    def known_sources(self, kind: str, source_ids: list[str]) -> set[str]:
        """Which of these top-ups/refunds already have a transaction that is pending or sent."""
        if not source_ids:
            return set()
        with self._sessions() as session:
            rows = session.scalars(
                select(MoesifTransaction.source_id).where(
                    MoesifTransaction.kind == kind,
                    MoesifTransaction.source_id.in_(source_ids),
                    MoesifTransaction.state != IntentState.FAILED,
                )
            )
            return set(rows)

    def reopen_failed(self, kind: str, source_id: str) -> StoredTransaction | None:
        """A top-up or refund Moesif refused (e.g. its subscription did not exist yet): the money still has to
        reach Moesif, so the same transaction is tried again. None if there is no such refused transaction."""
        with self._sessions.begin() as session:
            row = session.scalars(
                select(MoesifTransaction)
                .where(
                    MoesifTransaction.kind == kind,
                    MoesifTransaction.source_id == source_id,
                    MoesifTransaction.state == IntentState.FAILED,
                )
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            row.state = IntentState.PENDING
            return _stored(row)

    def pending(self, customer_id: str, older_than: datetime) -> list[StoredTransaction]:
        """Transactions a crashed or failed run left pending. Younger ones may be in flight in another run
        right now and are left to it."""
        with self._sessions() as session:
            rows = session.scalars(
                select(MoesifTransaction)
                .where(
                    MoesifTransaction.customer_id == customer_id,
                    MoesifTransaction.state == IntentState.PENDING,
                    MoesifTransaction.created_at < older_than,
                )
                .order_by(MoesifTransaction.id)
            ).all()
            return [_stored(row) for row in rows]

    def flag_invoice_payments(self, invoice_paid: dict[str, str], paid_since: datetime) -> list[tuple[str, str, str]]:
        """Top-ups recorded for PaymentIntents that Stripe says paid an invoice (`invoice_paid`: PaymentIntent id ->
        invoice id, none created before `paid_since`), newly marked for a person: (customer, transaction id, invoice
        id) each. One still pending is never sent; one sent stays as it is, since only a person can tell what
        debiting it would do.

        A cycle lists every invoice payment of the look-back, so `invoice_paid` can hold 100,000s of ids: rather
        than asking the ledger about each, its top-ups recorded since `paid_since` (a top-up's row is written after
        its PaymentIntent was created) are matched against them, and only the matches are locked."""
        if not invoice_paid:
            return []
        with self._sessions() as session:
            recorded = session.scalars(
                select(MoesifTransaction.source_id).where(
                    MoesifTransaction.kind == "topup",
                    MoesifTransaction.attention.is_(None),
                    MoesifTransaction.created_at >= paid_since,
                )
            ).all()
        matches = [source_id for source_id in recorded if source_id in invoice_paid]
        if not matches:
            return []
        flagged = []
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(MoesifTransaction)
                .where(
                    MoesifTransaction.kind == "topup",
                    MoesifTransaction.source_id.in_(matches),
                    MoesifTransaction.attention.is_(None),
                )
                .with_for_update()
            ).all()
            for row in rows:
                invoice = invoice_paid[row.source_id]
                row.attention = f"paid invoice {invoice}: an invoice payment, not a top-up"
                if row.state == IntentState.PENDING:
                    row.state = IntentState.HELD
                    row.error = row.attention
                flagged.append((row.customer_id, row.transaction_id, invoice))
        return flagged

    def hold(self, planned: PlannedTransaction, run_id: str, reason: str) -> None:
        """Record money the job will not forward, once: it is never sent, and never found again as new."""
        try:
            with self._sessions.begin() as session:
                session.add(_row(planned, run_id, self._clock(), state=IntentState.HELD, error=reason))
        except IntegrityError:
            pass  # another replica held it first

    def record(
        self, planned: PlannedTransaction, run_id: str, *, no_correction_since: datetime | None = None
    ) -> StoredTransaction:
        """Write the transaction before it is sent. For a correction, `no_correction_since` refuses it
        (AlreadyRecordedError) when another correction for the subscription is pending or was sent since then:
        two runs seeing the same drift at once must not both correct it."""
        now = self._clock()
        try:
            with self._sessions.begin() as session:
                if no_correction_since is not None:
                    _serialize_subscription(session, planned.account.subscription_id)
                    recent = session.scalars(
                        select(MoesifTransaction.id).where(
                            MoesifTransaction.subscription_id == planned.account.subscription_id,
                            MoesifTransaction.kind == "correction",
                            (MoesifTransaction.state == IntentState.PENDING)
                            | (MoesifTransaction.sent_at >= no_correction_since),
                        )
                    ).first()
                    if recent is not None:
                        raise AlreadyRecordedError(f"a correction for {planned.account.subscription_id} is in flight")
                row = _row(planned, run_id, now, state=IntentState.PENDING)
                session.add(row)
                session.flush()
                return _stored(row)
        except IntegrityError:
            raise AlreadyRecordedError(planned.transaction_id) from None

    def mark_attempted(self, stored: StoredTransaction) -> None:
        """In a commit of its own, before a request for it leaves: from now on it may have been applied."""
        with self._sessions.begin() as session:
            row = session.get_one(MoesifTransaction, stored.id)
            if row.attempted_at is None:
                row.attempted_at = self._clock()

    def mark_sent(self, stored: StoredTransaction, *, outcome_was_unknown: bool, error: str | None = None) -> None:
        """Sent, never to be sent again. With `outcome_was_unknown` it is flagged for a person: while it may still
        be settling the balance comparison waits; after that, a drift shows whether it landed."""
        with self._sessions.begin() as session:
            row = session.get_one(MoesifTransaction, stored.id)
            row.state = IntentState.SENT
            row.sent_at = self._clock()
            row.attempts += 1
            row.outcome_unknown = row.outcome_unknown or outcome_was_unknown
            row.error = error

    def mark_failed(self, stored: StoredTransaction, error: str) -> None:
        with self._sessions.begin() as session:
            row = session.get_one(MoesifTransaction, stored.id)
            row.state = IntentState.FAILED
            row.attempts += 1
            row.error = error

    def note_unknown_outcome(self, stored: StoredTransaction, error: str) -> None:
        """Stays pending (resent with the same id next cycle) and is flagged for a person."""
        with self._sessions.begin() as session:
            row = session.get_one(MoesifTransaction, stored.id)
            row.attempts += 1
            row.outcome_unknown = True
            row.error = error

    def recent(self, subscription_id: str, since: datetime) -> list[RecentTransaction]:
        """Our transactions that may still be settling in Moesif (pending ones, possibly in flight in another
        run, included), and corrections not yet seen landing."""
        with self._sessions() as session:
            rows = session.scalars(
                select(MoesifTransaction).where(
                    MoesifTransaction.subscription_id == subscription_id,
                    (MoesifTransaction.state == IntentState.PENDING)
                    | (
                        (MoesifTransaction.state == IntentState.SENT)
                        & (
                            (MoesifTransaction.sent_at >= since)
                            | ((MoesifTransaction.kind == "correction") & MoesifTransaction.verified_at.is_(None))
                        )
                    ),
                )
            ).all()
        return [
            RecentTransaction(
                amount=to_units(row.amount_minor if row.type == "credit" else -row.amount_minor, row.currency),
                sent_at=row.sent_at or row.created_at,
                is_correction=row.kind == "correction",
            )
            for row in rows
        ]

    def verify_corrections(self, subscription_id: str) -> None:
        """The balances agree: every correction sent so far has landed."""
        now = self._clock()
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(MoesifTransaction).where(
                    MoesifTransaction.subscription_id == subscription_id,
                    MoesifTransaction.kind == "correction",
                    MoesifTransaction.state == IntentState.SENT,
                    MoesifTransaction.verified_at.is_(None),
                )
            )
            for row in rows:
                row.verified_at = now

    # -- observations --------------------------------------------------------------------------------

    def observe(
        self,
        account: BalanceAccount,
        run_id: str,
        *,
        stripe_credit_minor: int,
        open_usage_minor: int,
        moesif_minor: int,
        assessment: Assessment,
    ) -> int:
        with self._sessions.begin() as session:
            row = BalanceObservation(
                run_id=run_id,
                observed_at=self._clock(),
                customer_id=account.customer_id,
                subscription_id=account.subscription_id,
                currency=account.currency,
                stripe_credit_minor=stripe_credit_minor,
                open_usage_minor=open_usage_minor,
                expected_minor=stripe_credit_minor - open_usage_minor,
                moesif_minor=moesif_minor,
                difference_minor=stripe_credit_minor - open_usage_minor - moesif_minor,
                action=assessment.action.value,
                reason=assessment.reason,
            )
            session.add(row)
            session.flush()
            return row.id

    def latest_observations(self, customer_ids: Collection[str] = ()) -> dict[str, LastObservation]:
        """Each customer's newest observation (only `customer_ids`' if given), in one query."""
        newest = select(func.max(BalanceObservation.id)).group_by(BalanceObservation.customer_id)
        if customer_ids:
            newest = newest.where(BalanceObservation.customer_id.in_(list(customer_ids)))
        query = select(BalanceObservation).where(BalanceObservation.id.in_(newest.scalar_subquery()))
        with self._sessions() as session:
            rows = session.scalars(query)
            return {
                row.customer_id: LastObservation(
                    observed_at=row.observed_at,
                    subscription_id=row.subscription_id,
                    stripe_credit_minor=row.stripe_credit_minor,
                    open_usage_minor=row.open_usage_minor,
                    moesif_minor=row.moesif_minor,
                    action=row.action,
                )
                for row in rows
            }

    def link_correction(self, observation_id: int, transaction_id: str) -> None:
        with self._sessions.begin() as session:
            session.get_one(BalanceObservation, observation_id).correction_transaction_id = transaction_id

    # -- usage Moesif has burned but Stripe has not invoiced -----------------------------------------

    def open_usage(self, customer_id: str, now: datetime, invoice_grace_period: timedelta) -> list[OpenUsage]:
        with self._sessions() as session:
            rows = session.scalars(
                select(UsagePeriod).where(
                    UsagePeriod.customer_id == customer_id,
                    UsagePeriod.period_end > now - invoice_grace_period,
                    UsagePeriod.reported_total != 0,
                )
            ).all()
        return [
            OpenUsage(row.stripe_target, row.meter_id, row.kind, row.subscription_item_id, row.reported_total)
            for row in rows
        ]


def _serialize_subscription(session: Session, subscription_id: str) -> None:
    """On PostgreSQL, one transaction at a time per subscription (released at commit)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"moesif:{subscription_id}"})


def _row(
    planned: PlannedTransaction, run_id: str, now: datetime, *, state: str, error: str | None = None
) -> MoesifTransaction:
    return MoesifTransaction(
        transaction_id=planned.transaction_id,
        kind=planned.kind,
        source_id=planned.source_id,
        customer_id=planned.account.customer_id,
        subscription_id=planned.account.subscription_id,
        currency=planned.account.currency,
        amount_minor=planned.amount_minor,
        type=planned.type,
        state=state,
        outcome_unknown=False,
        attempts=0,
        error=error,
        run_id=run_id,
        created_at=now,
    )


def _stored(row: MoesifTransaction) -> StoredTransaction:
    account = BalanceAccount(row.customer_id, row.subscription_id, row.currency)
    planned = PlannedTransaction(
        kind=row.kind,
        source_id=row.source_id,
        transaction_id=row.transaction_id,
        account=account,
        amount_minor=row.amount_minor,
        type=row.type,
        description=f"{row.kind} {row.source_id}",
    )
    return StoredTransaction(
        id=row.id,
        planned=planned,
        state=row.state,
        outcome_unknown=row.outcome_unknown,
        attempted=row.attempted_at is not None,
    )
