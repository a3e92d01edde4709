"""Pruning ledger rows older than `ledger.retention`: only closed history, never anything still in play."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, delete, select

from reconciler.ledger.schema import (
    BalanceObservation,
    CycleTick,
    LateDrift,
    MoesifTransaction,
    PeriodStatus,
    Run,
    UsagePeriod,
    UsageReport,
    WebhookEvent,
    WorkItem,
)
from reconciler.usage.model import IntentState


def prune_ledger(engine: Engine, cutoff: datetime, work_cutoff: datetime | None = None) -> dict[str, int]:
    """Delete final periods that ended before `cutoff` (with their reports and drift), finished runs,
    observations and acknowledged Moesif transactions older than it, and finished replica work (planned
    ticks and done work items) older than `work_cutoff`. Returns counts per table."""
    old_periods = select(UsagePeriod.id).where(
        UsagePeriod.status == PeriodStatus.FINAL, UsagePeriod.period_end < cutoff
    )
    counts = {}
    with engine.begin() as connection:
        counts["usage_reports"] = connection.execute(
            delete(UsageReport).where(UsageReport.period_id.in_(old_periods))
        ).rowcount
        counts["late_drift"] = connection.execute(
            delete(LateDrift).where(LateDrift.period_id.in_(old_periods))
        ).rowcount
        counts["usage_periods"] = connection.execute(
            delete(UsagePeriod).where(UsagePeriod.id.in_(old_periods.scalar_subquery()))
        ).rowcount
        counts["runs"] = connection.execute(
            delete(Run).where(Run.finished_at.is_not(None), Run.finished_at < cutoff)
        ).rowcount
        counts["balance_observations"] = connection.execute(
            delete(BalanceObservation).where(BalanceObservation.observed_at < cutoff)
        ).rowcount
        counts["moesif_transactions"] = connection.execute(
            delete(MoesifTransaction).where(
                MoesifTransaction.state == IntentState.SENT, MoesifTransaction.sent_at < cutoff
            )
        ).rowcount
        counts["webhook_events"] = connection.execute(
            delete(WebhookEvent).where(
                WebhookEvent.state.in_(("done", "failed", "ignored")), WebhookEvent.received_at < cutoff
            )
        ).rowcount
        if work_cutoff is not None:
            old_ticks = select(CycleTick.id).where(CycleTick.planned_at < work_cutoff)
            counts["work_items"] = connection.execute(
                delete(WorkItem).where(WorkItem.tick_id.in_(old_ticks), WorkItem.state == "done")
            ).rowcount
            still_used = select(WorkItem.tick_id)
            counts["cycle_ticks"] = connection.execute(
                delete(CycleTick).where(CycleTick.planned_at < work_cutoff, CycleTick.id.not_in(still_used))
            ).rowcount
    return counts
