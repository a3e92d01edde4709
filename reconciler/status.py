"""`reconciler status`: what the jobs did last, when they run next, and what is waiting for attention."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from rich.console import Console
from sqlalchemy import Engine, desc, func, select

from reconciler.attention import items_needing_attention
from reconciler.config import Config
from reconciler.ledger.coordination import REPLICA_TIMEOUT
from reconciler.ledger.schema import (
    IntentState,
    MoesifTransaction,
    Replica,
    Run,
    UsageReport,
    WorkItem,
)
from reconciler.output import table
from reconciler.schedule import parse_schedule


def print_status(config: Config, engine: Engine, console: Console) -> None:
    now = datetime.now(UTC)
    schedules = {"usage_sync": config.schedule.usage_sync}
    if config.schedule.readback != "off":
        schedules["usage_readback"] = config.schedule.readback
    if config.balances.enabled:
        schedules["balance_reconcile"] = config.schedule.balance_reconcile
    if config.plans.enabled:
        schedules["plan_sync"] = config.schedule.plan_sync
    jobs = table("jobs", "job", "schedule", "last run", "outcome", "counts", "next run")
    with engine.connect() as connection:
        for job, schedule in schedules.items():
            last = connection.execute(select(Run).where(Run.job == job).order_by(desc(Run.started_at)).limit(1)).first()
            next_run = parse_schedule(schedule).get_next_fire_time(None, now)
            counts = (
                ", ".join(f"{k} {v}" for k, v in json.loads(last.summary).items() if v) if last and last.summary else ""
            )
            jobs.add_row(
                job,
                schedule,
                f"{last.started_at:%Y-%m-%d %H:%M:%S}" if last else "never",
                last.status if last else "",
                counts,
                f"{next_run:%Y-%m-%d %H:%M:%S}" if next_run else "",
            )
        pending_reports = connection.execute(
            select(func.count()).select_from(UsageReport).where(UsageReport.state == IntentState.PENDING)
        ).scalar_one()
        moesif_pending = connection.execute(
            select(func.count()).select_from(MoesifTransaction).where(MoesifTransaction.state == IntentState.PENDING)
        ).scalar_one()
        replicas = connection.execute(
            select(Replica.id, Replica.host, Replica.pid, Replica.heartbeat_at).order_by(Replica.started_at)
        ).all()
        leases = dict(
            connection.execute(
                select(WorkItem.lease_owner, func.count())
                .where(WorkItem.state == "claimed")
                .group_by(WorkItem.lease_owner)
            ).all()
        )
    console.print(jobs)
    console.print(f"pending usage reports: {pending_reports}; pending Moesif transactions: {moesif_pending}")
    for replica_id, host, pid, heartbeat_at in replicas:
        live = "live" if now - heartbeat_at < REPLICA_TIMEOUT else "silent"
        console.print(
            f"replica {replica_id} {host}:{pid} {live}, heartbeat {heartbeat_at:%H:%M:%S}, "
            f"{leases.get(replica_id, 0)} lease(s)",
            markup=False,
        )
    attention = items_needing_attention(engine)
    console.print(f"items needing a person: {len(attention)}")
    for item in attention:
        console.print(f"{item.line()} (since {item.since:%Y-%m-%d %H:%M:%S})", markup=False)
