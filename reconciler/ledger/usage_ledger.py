"""The usage ledger's operations. Each one is its own short transaction, committed before it returns, so the
process may die between any two calls and the ledger still tells the truth:

    record_intent  (committed)  ->  Stripe call  ->  mark_sent / mark_failed  (committed)

A crash after `record_intent` leaves a pending intent; the next cycle resends it with the same identifier
and idempotency key before deciding anything new, so Stripe counts it once. After a 5xx answer the intent moves
on to a fresh key (`renew_idempotency_key`, committed before the resend) with the same identifier.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reconciler.ledger.coordination import check_fence, check_fences
from reconciler.ledger.schema import REJECTED_BY_STRIPE, LateDrift, PeriodStatus, UsagePeriod, UsageReport
from reconciler.usage.decide import NEW_PERIOD, Action, Decision, LedgerState
from reconciler.usage.model import (
    ContendedError,
    Fence,
    Intent,
    IntentState,
    RecordedPeriod,
    Stream,
    StreamEvent,
    StreamPeriod,
)
from reconciler.usage.periods import epoch_seconds

MAX_IDENTIFIER_LENGTH = 100  # Stripe's limit for meter event identifiers
NONCE_BYTES = 6  # 12 hex characters in each identifier
REVISIT_CHUNK = 1000  # ended periods read in one query (periods_to_revisit)


def new_nonce() -> str:
    """Random hex for a new intent's identifier: 48 bits, so no two ledgers' intents share an identifier."""
    return secrets.token_hex(NONCE_BYTES)


def report_identifier(stream_key: str, period_start: datetime, sequence: int, nonce: str) -> str:
    """A new intent's identifier: readable (stream, period, sequence) plus `nonce`. Stored with the intent and never
    recomputed, so it is fixed across the intent's resends. The nonce makes it new beyond this ledger's life: a
    ledger restored from a backup, or created afresh, reuses (stream, period, sequence) triples whose identifiers
    may already exist at Stripe with another quantity, and Stripe would refuse the event as a duplicate."""
    readable = f"{stream_key}:{epoch_seconds(period_start)}:{sequence}:{nonce}"
    if len(readable) > MAX_IDENTIFIER_LENGTH:
        digest = hashlib.sha256(readable.encode()).hexdigest()[:40]
        readable = f"rcn:{digest}:{sequence}:{nonce}"
    if len(readable) > MAX_IDENTIFIER_LENGTH:
        raise ValueError(f"meter event identifier {readable!r} is longer than Stripe's {MAX_IDENTIFIER_LENGTH}")
    return readable


class _HotPath:
    """The statements every reported item runs, built once: executed with parameters on a connection, they skip
    the ORM and hit SQLAlchemy's compiled cache each time."""

    periods, reports = UsagePeriod.__table__, UsageReport.__table__
    LOCK_PERIOD = (
        select(
            periods.c.id, periods.c.next_sequence, periods.c.reported_total, periods.c.unit_amount, periods.c.currency
        )
        .where(periods.c.stream_key == bindparam("stream_key"), periods.c.period_start == bindparam("period_start"))
        .with_for_update()
    )
    INSERT_PERIOD = insert(periods)
    UPDATE_PERIOD = update(periods).where(periods.c.id == bindparam("b_id"))
    PENDING_OF_PERIOD = (
        select(reports.c.id)
        .where(reports.c.period_id == bindparam("period_id"), reports.c.state == IntentState.PENDING)
        .limit(1)
    )
    INSERT_REPORT = insert(reports)
    # Every item of a measured batch, warm or cold: its period's state, and which periods have an intent pending.
    # By stream key alone, the unique index's first column: SQLite scans the whole index for a (key, start) tuple IN,
    # which made a warm cycle quadratic in the ledger's size. A stream's other periods are dropped after.
    PERIOD_STATES = select(
        periods.c.id,
        periods.c.stream_key,
        periods.c.period_start,
        periods.c.status,
        periods.c.reported_total,
        periods.c.last_event_at,
        periods.c.late_total,
        periods.c.target,
        periods.c.last_error,
        periods.c.next_sequence,
    ).where(periods.c.stream_key.in_(bindparam("stream_keys", expanding=True)))
    PENDING_AMONG = select(reports.c.period_id).where(
        reports.c.period_id.in_(bindparam("ids", expanding=True)), reports.c.state == IntentState.PENDING
    )


class UsageLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime], fence: Fence | None = None):
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        self._fence = fence

    def fenced(self, fence: Fence | None) -> UsageLedger:
        """The same ledger, with every write checking `fence` (a work item's lease) in its transaction."""
        return self if fence is None else UsageLedger(self._engine, self._clock, fence)

    def _write(self) -> Any:
        """A write transaction; with a fence, it fails (LeaseLostError) unless our lease still holds."""
        return _FencedTransaction(self._sessions, self._fence)

    @property
    def fence(self) -> Fence | None:
        """The lease every write of this ledger checks (None: unfenced)."""
        return self._fence

    @contextmanager
    def _write_core(self, also_fenced_by: Sequence[Fence] = ()) -> Iterator[Connection]:
        """`_write` on a bare connection, for the statements every reported item runs (`_HotPath`): a Session's
        own begin and commit cost more CPU than those statements. `also_fenced_by`: other work items' leases the
        transaction must hold too (it writes for them)."""
        with self._engine.begin() as connection:
            check_fences(connection, [*([self._fence] if self._fence else []), *also_fenced_by])
            yield connection

    # -- reading -------------------------------------------------------------------------------------

    def state(self, work: StreamPeriod) -> LedgerState:
        with self._sessions() as session:
            return self._state_of(self._period(session, work.stream.key, work.period.start))

    def settled_states(self, units: Sequence[StreamPeriod]) -> dict[tuple[str, datetime], LedgerState]:
        """The state of every unit with no intent pending, for a whole batch in two queries (a unit with one is
        left out: it goes the one-by-one way, which resends it first). A state read here may be stale by the time
        it is used; `record_intent` checks it under the row lock, so a stale one can only skip a cycle, never
        count usage twice."""
        if not units:
            return {}
        keys = {(unit.stream.key, unit.period.start) for unit in units}
        with self._engine.connect() as connection:  # in Core, as `_HotPath` says why
            rows = connection.execute(_HotPath.PERIOD_STATES, {"stream_keys": list({key for key, _ in keys})}).all()
            rows = [row for row in rows if (row.stream_key, row.period_start) in keys]
            pending = set(connection.scalars(_HotPath.PENDING_AMONG, {"ids": [row.id for row in rows]}))
        states = dict.fromkeys(keys, NEW_PERIOD)
        for row in rows:
            key = (row.stream_key, row.period_start)
            if row.id in pending:
                states.pop(key, None)
            else:
                states[key] = self._state_of(row)
        return states

    @staticmethod
    def _state_of(row: UsagePeriod | Row[Any] | None) -> LedgerState:
        if row is None:
            return NEW_PERIOD
        return LedgerState(
            is_final=row.status == PeriodStatus.FINAL,
            reported_total=row.reported_total,
            last_event_at=row.last_event_at,
            late_total=row.late_total,
            recorded_target=row.target,
            has_error=row.last_error is not None,
            next_sequence=row.next_sequence,
        )

    def pending_intent(self, work: StreamPeriod) -> Intent | None:
        with self._sessions() as session:
            row = self._period(session, work.stream.key, work.period.start)
            if row is None:
                return None
            report = session.scalars(
                select(UsageReport)
                .where(UsageReport.period_id == row.id, UsageReport.state == IntentState.PENDING)
                .order_by(UsageReport.sequence)
            ).first()
            return None if report is None else self._intent(report, work.stream)

    def stream_events_between(self, stream_key: str, start: datetime, end: datetime) -> list[StreamEvent]:
        """This stream's reports dated in `[start, end)`, whatever their period."""
        with self._sessions() as session:
            reports = session.scalars(
                select(UsageReport)
                .join(UsagePeriod, UsagePeriod.id == UsageReport.period_id)
                .where(
                    UsagePeriod.stream_key == stream_key,
                    UsageReport.event_timestamp >= start,
                    UsageReport.event_timestamp < end,
                )
            ).all()
            return [
                StreamEvent(
                    report.id,
                    str(report.state),
                    int(report.quantity),
                    max(filter(None, (report.created_at, report.attempted_at, report.sent_at))),
                )
                for report in reports
            ]

    def periods_to_revisit(
        self, now: datetime, lookback: timedelta, customers: frozenset[str] = frozenset()
    ) -> Iterator[RecordedPeriod]:
        """Ended periods that still need a final sync or a late-drift check (every provisional period that has ended,
        and final ones that ended within `lookback`; only `customers`' if given), a chunk at a time in short reads.
        The cycle skips those Stripe still lists."""
        after = 0
        while True:
            query = (
                select(UsagePeriod)
                .where(UsagePeriod.id > after, UsagePeriod.period_end <= now)
                .where((UsagePeriod.status == PeriodStatus.PROVISIONAL) | (UsagePeriod.period_end > now - lookback))
            )
            if customers:
                query = query.where(UsagePeriod.customer_id.in_(sorted(customers)))
            with self._sessions() as session:
                rows = session.scalars(query.order_by(UsagePeriod.id).limit(REVISIT_CHUNK)).all()
                periods = [recorded_period(row) for row in rows]
            yield from periods
            if len(periods) < REVISIT_CHUNK:
                return
            after = periods[-1].id

    # -- writing -------------------------------------------------------------------------------------

    def record_intent(self, work: StreamPeriod, decision: Decision, run_id: str, based_on: LedgerState) -> Intent:
        """Durably write what we are about to send. Raises ContendedError if another process wrote an intent
        for this period since `based_on` was read (its decision would rest on a stale reported total).

        Every reported item takes this path, so it runs prepared Core statements (`_HotPath`) on the session's
        connection: the ORM's unit of work and statement building cost several times the statements' own CPU."""
        assert decision.quantity is not None and decision.timestamp is not None
        now = self._clock()
        stream = work.stream
        try:
            with self._write_core() as connection:
                period = self._lock_period(connection, work, now)
                in_flight = connection.execute(_HotPath.PENDING_OF_PERIOD, {"period_id": period.id}).first()
                if (
                    period.next_sequence != based_on.next_sequence
                    or period.reported_total != based_on.reported_total
                    or in_flight is not None
                ):
                    # Under the row lock: another process wrote or is sending an intent for this period since
                    # `based_on` was read, so a difference computed from it could count usage twice.
                    raise ContendedError(f"another process is reporting {stream.key} for this period")
                sequence = period.next_sequence
                connection.execute(
                    _HotPath.UPDATE_PERIOD,
                    {
                        "b_id": period.id,
                        "next_sequence": sequence + 1,
                        "target": decision.target,
                        "period_end": work.period.end,  # a cancellation can shorten the period
                        "unit_amount": stream.unit_amount or period.unit_amount,  # the price can change
                        "currency": stream.currency or period.currency,
                        "updated_at": now,
                    },
                )
                identifier = report_identifier(stream.key, work.period.start, sequence, new_nonce())
                inserted = connection.execute(
                    _HotPath.INSERT_REPORT,
                    {
                        "period_id": period.id,
                        "sequence": sequence,
                        "identifier": identifier,
                        "quantity": decision.quantity,
                        "total_after": decision.target,
                        "event_timestamp": decision.timestamp,
                        "final": decision.final,
                        "state": IntentState.PENDING,
                        "attempts": 0,
                        "idempotency_key_number": 0,
                        "run_id": run_id,
                        "created_at": now,
                    },
                )
                return Intent(
                    id=inserted.inserted_primary_key[0],
                    identifier=identifier,
                    kind=stream.kind,
                    customer_id=stream.customer_id,
                    item_id=stream.item_id,
                    meter=stream.meter,
                    quantity=decision.quantity,
                    total_after=decision.target,
                    event_timestamp=decision.timestamp,
                    final=decision.final,
                    created_at=now,
                )
        except IntegrityError as exc:
            raise ContendedError(f"another process is reporting {stream.key} for this period") from exc

    @staticmethod
    def _lock_period(connection: Connection, work: StreamPeriod, now: datetime) -> Any:
        """The period's row (id, next_sequence, reported_total, unit_amount, currency), locked until the transaction
        ends; created if it is new (a concurrent creation fails the transaction with an IntegrityError)."""
        key = {"stream_key": work.stream.key, "period_start": work.period.start}
        row = connection.execute(_HotPath.LOCK_PERIOD, key).first()
        if row is None:
            # The new row is ours alone until the transaction ends: its fields are the ones just written.
            new = _new_period(work, now)
            inserted = connection.execute(_HotPath.INSERT_PERIOD, new)
            return _NewPeriodRow(
                id=inserted.inserted_primary_key[0],
                next_sequence=new["next_sequence"],
                reported_total=new["reported_total"],
                unit_amount=new["unit_amount"],
                currency=new["currency"],
            )
        return row

    def mark_sent(self, intent: Intent) -> None:
        """Stripe accepted the intent: it now holds `total_after` for the period."""
        self.mark_all_sent([intent])

    def mark_all_sent(self, intents: Sequence[Intent], also_fenced_by: Sequence[Fence] = ()) -> None:
        """Stripe accepted every one of `intents`: one transaction for all (a group commit), in Core with one
        statement per table and kind of change (the ORM's unit of work cost most of this path's CPU). Intents of
        other claimed work items than this ledger's may come along with their leases (`also_fenced_by`): a
        replica's marks for a batch of claims are one transaction too, which fails whole if any lease lapsed."""
        if not intents:
            return
        now = self._clock()
        with self._write_core(also_fenced_by) as connection:
            unsent = {
                report_id: (period_id, last_event_at)
                for report_id, period_id, last_event_at in connection.execute(
                    select(UsageReport.id, UsageReport.period_id, UsagePeriod.last_event_at)
                    .join(UsagePeriod, UsagePeriod.id == UsageReport.period_id)
                    .where(UsageReport.id.in_([intent.id for intent in intents]))
                    .where(UsageReport.state != IntentState.SENT)
                )
            }
            reports: list[dict[str, Any]] = []
            periods: dict[int, dict[str, Any]] = {}  # each period's row after its intents, in their order
            for intent in intents:
                if intent.id not in unsent:
                    continue  # already marked (a resend's outcome): marking twice would count its attempt twice
                period_id, last_event_at = unsent.pop(intent.id)
                reports.append({"b_id": intent.id})
                period = periods.setdefault(period_id, {"b_id": period_id, "last_event_at": last_event_at})
                period["reported_total"] = intent.total_after
                period["last_event_at"] = max(filter(None, (period["last_event_at"], intent.event_timestamp)))
                period["final"] = period.get("final", False) or intent.final
            if not reports:
                return
            report_table, period_table = UsageReport.__table__, UsagePeriod.__table__
            connection.execute(
                update(report_table)
                .where(report_table.c.id == bindparam("b_id"))
                .values(state=IntentState.SENT, sent_at=now, attempts=report_table.c.attempts + 1, error=None),
                reports,
            )
            for final in (False, True):
                rows = [
                    {key: value for key, value in row.items() if key != "final"}
                    for row in periods.values()
                    if row["final"] is final
                ]
                if rows:
                    settled = {"status": PeriodStatus.FINAL, "finalized_at": now} if final else {}
                    connection.execute(
                        update(period_table)
                        .where(period_table.c.id == bindparam("b_id"))
                        .values(failures=0, last_error=None, updated_at=now, **settled),
                        rows,
                    )

    def mark_failed(self, intent: Intent, error: str) -> None:
        """Stripe refused the intent, so it was not applied: the next cycle decides afresh."""
        now = self._clock()
        with self._write() as session:
            report = session.get_one(UsageReport, intent.id)
            report.state = IntentState.FAILED
            report.attempts += 1
            report.error = error
            self._note_failure(session.get_one(UsagePeriod, report.period_id), error, now)

    def note_attempt(self, intent: Intent, error: str) -> None:
        """A send whose outcome is unknown: the intent stays pending and is resent next cycle."""
        now = self._clock()
        with self._write() as session:
            report = session.get_one(UsageReport, intent.id)
            report.attempts += 1
            report.error = error
            self._note_failure(session.get_one(UsagePeriod, report.period_id), error, now)

    def note_resend(self, intent: Intent) -> None:
        """A resend is about to leave: committed first, so a crash mid-request still leaves when it may have landed."""
        with self._write() as session:
            session.get_one(UsageReport, intent.id).attempted_at = self._clock()

    def renew_idempotency_key(self, intent: Intent) -> Intent:
        """Move a pending intent on to a fresh idempotency key, committed before any request uses it: Stripe saved a
        5xx answer to the key in use and replays it to every resend with that key. Returns the intent under it."""
        with self._write() as session:
            report = session.get_one(UsageReport, intent.id, with_for_update=True)
            report.idempotency_key_number += 1
            return replace(intent, key_number=report.idempotency_key_number)

    def note_failure(self, work: StreamPeriod, error: str) -> None:
        now = self._clock()
        with self._write() as session:
            row = self._period(session, work.stream.key, work.period.start)
            if row is not None:
                self._note_failure(row, error, now)

    def record_rejected_event(self, identifier: str, error: str) -> bool:
        """Stripe rejected a meter event after accepting it (an error report): note it on the report and its
        period, where `status` shows it, until the read-back settles it. False if the identifier is not ours."""
        now = self._clock()
        with self._write() as session:
            report = session.scalars(select(UsageReport).where(UsageReport.identifier == identifier)).one_or_none()
            if report is None:
                return False
            report.error = f"{REJECTED_BY_STRIPE}{error}"
            report.rejected_at = now  # evidence for the read-back (ledger/readback_ledger.py), which settles it
            self._note_failure(session.get_one(UsagePeriod, report.period_id), report.error, now)
            return True

    def observe(self, work: StreamPeriod, decision: Decision, run_id: str) -> None:
        """Record a decision that needs no Stripe call: unchanged, final, or late drift."""
        now = self._clock()
        with self._write() as session:
            row = self._period_for_update(session, work, now)
            row.target = decision.target
            row.updated_at = now
            row.failures = 0
            row.last_error = None
            if decision.action is Action.LATE_DRIFT:
                session.add(
                    LateDrift(
                        period_id=row.id,
                        observed_at=now,
                        reported_total=row.reported_total,
                        observed_total=decision.target,
                        reason=decision.reason,
                        run_id=run_id,
                    )
                )
                row.late_total = decision.target
            if decision.final and row.status != PeriodStatus.FINAL:
                row.status = PeriodStatus.FINAL
                row.finalized_at = now

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _period(session: Session, stream_key: str, period_start: datetime) -> UsagePeriod | None:
        return session.scalars(
            select(UsagePeriod).where(UsagePeriod.stream_key == stream_key, UsagePeriod.period_start == period_start)
        ).one_or_none()

    def _period_for_update(self, session: Session, work: StreamPeriod, now: datetime) -> UsagePeriod:
        row = session.scalars(
            select(UsagePeriod)
            .where(UsagePeriod.stream_key == work.stream.key, UsagePeriod.period_start == work.period.start)
            .with_for_update()
        ).one_or_none()
        if row is not None:
            row.period_end = work.period.end  # a cancellation can shorten the period
            row.unit_amount = work.stream.unit_amount or row.unit_amount  # the price can change
            row.currency = work.stream.currency or row.currency
            return row
        row = UsagePeriod(**_new_period(work, now))
        session.add(row)
        session.flush()
        return row

    @staticmethod
    def _note_failure(row: UsagePeriod, error: str, now: datetime) -> None:
        row.failures += 1
        row.last_error = error
        row.updated_at = now

    @staticmethod
    def _intent(report: UsageReport, stream: Stream) -> Intent:
        return Intent(
            id=report.id,
            identifier=report.identifier,
            kind=stream.kind,
            customer_id=stream.customer_id,
            item_id=stream.item_id,
            meter=stream.meter,
            quantity=report.quantity,
            total_after=report.total_after,
            event_timestamp=report.event_timestamp,
            final=report.final,
            created_at=report.created_at,
            attempts=report.attempts,
            key_number=report.idempotency_key_number,
            attempted_at=report.attempted_at,
        )


@dataclass(frozen=True)
class _NewPeriodRow:
    """`_lock_period`'s answer for a row it has just inserted, shaped like the row `LOCK_PERIOD` selects."""

    id: int
    next_sequence: int
    reported_total: int
    unit_amount: str | None
    currency: str | None


def _new_period(work: StreamPeriod, now: datetime) -> dict[str, Any]:
    """The `usage_periods` row of a period the ledger has not seen yet."""
    stream = work.stream
    return {
        "stream_key": stream.key,
        "period_start": work.period.start,
        "period_end": work.period.end,
        "kind": stream.kind.value,
        "customer_id": stream.customer_id,
        "subscription_id": stream.subscription_id,
        "subscription_item_id": stream.item_id,
        "stripe_target": stream.stripe_target,
        "meter_id": stream.meter.id if stream.meter else None,
        "openmeter_meter": stream.openmeter_meter,
        "subject": stream.subject,
        "unit_amount": stream.unit_amount,
        "currency": stream.currency,
        "status": PeriodStatus.PROVISIONAL,
        "reported_total": 0,
        "next_sequence": 1,
        "failures": 0,
        "created_at": now,
        "updated_at": now,
    }


def recorded_period(row: UsagePeriod) -> RecordedPeriod:
    """The usage domain's value of a `usage_periods` row."""
    return RecordedPeriod(
        id=row.id,
        stream_key=row.stream_key,
        kind=row.kind,
        customer_id=row.customer_id,
        subscription_id=row.subscription_id,
        subscription_item_id=row.subscription_item_id,
        stripe_target=row.stripe_target,
        meter_id=row.meter_id,
        openmeter_meter=row.openmeter_meter,
        subject=row.subject,
        period_start=row.period_start,
        period_end=row.period_end,
        reported_total=row.reported_total,
        next_sequence=row.next_sequence,
        unit_amount=row.unit_amount,
        currency=row.currency,
    )


class _FencedTransaction:
    def __init__(self, sessions: sessionmaker[Session], fence: Fence | None):
        self._context = sessions.begin()
        self._fence = fence

    def __enter__(self) -> Session:
        session = self._context.__enter__()
        if self._fence is not None:
            check_fence(session, self._fence)
        return session

    def __exit__(self, *exc: Any) -> Any:
        return self._context.__exit__(*exc)
