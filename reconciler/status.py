"""`reconciler status`: what the jobs did last, when they run next, and what is waiting for attention."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, Row, desc, func, select

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
    jobs = Table(title="jobs")
    for column in ("job", "schedule", "last run", "outcome", "counts", "next run"):
        jobs.add_column(column)
    with engine.connect() as connection:
        replicas = connection.execute(
            select(Replica.id, Replica.host, Replica.pid, Replica.heartbeat_at).order_by(Replica.started_at)
        ).all()
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
                shown_status(last, replicas, now) if last else "",
                counts,
                f"{next_run:%Y-%m-%d %H:%M:%S}" if next_run else "",
            )
        pending_reports = connection.execute(
            select(func.count()).select_from(UsageReport).where(UsageReport.state == IntentState.PENDING)
        ).scalar_one()
        moesif_pending = connection.execute(
            select(func.count()).select_from(MoesifTransaction).where(MoesifTransaction.state == IntentState.PENDING)
        ).scalar_one()
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


def shown_status(run: Row[Any], replicas: Sequence[Row[Any]], now: datetime) -> str:
    """A run's status, except that a run still marked `running` whose process is gone shows as `interrupted`: on
    this host, its pid is no longer alive; on another host, it is a replica (PostgreSQL) whose heartbeat stopped.
    Anything else (a one-shot command on another host, say) cannot be checked from here and shows as recorded."""
    if run.status != "running":
        return str(run.status)
    if run.host == socket.gethostname():
        return "running" if _alive(run.pid) else "interrupted"
    for _id, host, pid, heartbeat_at in replicas:
        if (host, pid) == (run.host, run.pid) and now - heartbeat_at >= REPLICA_TIMEOUT:
            return "interrupted"
    return "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
