"""What to do for one stream in one period: a pure function of the target, the ledger and `now`.

The rules, in order:
1. A final period is never reported again; a changed total is late drift, recorded once per new value.
2. A period Stripe no longer accepts writes for (legacy: after rollover; meters: after the invoice
   finalizes) is closed as it stands; a difference is late drift.
3. An unchanged total costs no Stripe call; it only becomes final once the final sync is due.
4. Otherwise report: `last` meters and legacy records get the total, `sum` meters the signed difference
   against what the ledger says Stripe already holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from reconciler.usage.model import StreamKind, StreamPeriod
from reconciler.usage.periods import legacy_record_timestamp, meter_event_timestamp


class Action(StrEnum):
    UNCHANGED = "unchanged"
    REPORT = "report"
    FINALIZE = "finalize"  # no call: mark the period final with what Stripe already holds
    LATE_DRIFT = "late_drift"  # no call: record a difference Stripe can no longer be told about
    FAIL = "fail"


@dataclass(frozen=True)
class LedgerState:
    """What the ledger knows of a stream period before this decision."""

    is_final: bool
    reported_total: int
    last_event_at: datetime | None
    late_total: int | None
    recorded_target: int | None = None  # the last measured total written to the ledger
    has_error: bool = False  # the last attempt failed; a success must clear it
    next_sequence: int = 1  # an intent based on this state is valid only while the period is still here


NEW_PERIOD = LedgerState(is_final=False, reported_total=0, last_event_at=None, late_total=None)


@dataclass(frozen=True)
class Timing:
    grace_period: timedelta  # usage.grace_period
    invoice_grace_period: timedelta  # stripe.invoice_grace_period
    legacy_final_sync_before: timedelta  # usage.legacy_final_sync_before


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    target: int
    quantity: int | None = None  # the value to send (REPORT)
    timestamp: datetime | None = None  # event / usage record time (REPORT)
    final: bool = False  # after this decision the period is final


def decide(work: StreamPeriod, ledger: LedgerState, target: int, now: datetime, timing: Timing) -> Decision:
    period, kind = work.period, work.stream.kind
    reported = ledger.reported_total

    if ledger.is_final:
        if target in (reported, ledger.late_total):
            return Decision(Action.UNCHANGED, "period is final and its total has not changed", target)
        return Decision(Action.LATE_DRIFT, f"total changed from {reported} after the period was final", target)

    if kind is StreamKind.LEGACY:
        writable = work.is_current and now < period.end
        final_due = now >= period.end - timing.legacy_final_sync_before
        closed_reason = "the legacy item's period has rolled over; Stripe accepts records only in the current one"
    else:
        writable = now < period.end + timing.invoice_grace_period
        final_due = now >= period.end + timing.grace_period
        closed_reason = "the period's invoice has finalized (period end + stripe.invoice_grace_period)"

    if not writable:
        if target == reported:
            return Decision(Action.FINALIZE, "period closed with Stripe holding the measured total", target, final=True)
        return Decision(Action.LATE_DRIFT, f"{closed_reason}; Stripe holds {reported}", target, final=True)

    if target == reported:
        if final_due:
            return Decision(Action.FINALIZE, "final sync: total unchanged", target, final=True)
        return Decision(Action.UNCHANGED, "total unchanged since the last report", target)

    if kind is StreamKind.LEGACY:
        if target < 0:
            return Decision(Action.FAIL, f"usage total {target} is negative; usage records must be ≥ 0", target)
        return Decision(
            Action.REPORT,
            "set total",
            target,
            quantity=target,
            timestamp=legacy_record_timestamp(period),
            final=final_due,
        )

    timestamp = meter_event_timestamp(period, now, ledger.last_event_at, final=final_due)
    if timestamp is None:
        return Decision(
            Action.FAIL,
            "no valid meter event timestamp: it must lie inside the period, after the previous event, "
            "not in the future and within Stripe's 35-day window",
            target,
        )
    quantity = target if kind is StreamKind.METER_LAST else target - reported
    return Decision(
        Action.REPORT,
        "report total" if kind is StreamKind.METER_LAST else "report difference",
        target,
        quantity=quantity,
        timestamp=timestamp,
        final=final_due,
    )


def writes_nothing(ledger: LedgerState, decision: Decision) -> bool:
    """True when the decision leaves the ledger as it is: unchanged, and the measured total already recorded."""
    return decision.action is Action.UNCHANGED and ledger.recorded_target == decision.target and not ledger.has_error


def reopen_for_backfill(work: StreamPeriod, ledger: LedgerState, now: datetime, timing: Timing) -> LedgerState:
    """A backfill may still correct a final `sum` period while Stripe bills its events (before the invoice
    finalizes). Differences are order-independent there, so the correction may share the final event's
    timestamp. A `last` meter's final event is its newest and cannot be superseded; legacy records only go
    into the current period: both stay final (a difference is late drift)."""
    reachable = now < work.period.end + timing.invoice_grace_period
    if ledger.is_final and reachable and work.stream.kind is StreamKind.METER_SUM:
        return replace(ledger, is_final=False, last_event_at=None)
    return ledger


def final_sync_due_at(work: StreamPeriod, ledger: LedgerState, timing: Timing) -> datetime | None:
    """When this period's final sync must run (a scheduler wakes up then), or None once it is final."""
    if ledger.is_final:
        return None
    if work.stream.kind is StreamKind.LEGACY:
        return work.period.end - timing.legacy_final_sync_before if work.is_current else None
    return work.period.end + timing.grace_period
