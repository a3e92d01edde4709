"""`reconciler status`: what the jobs did last, when they run next, and what is waiting for attention; as a table
for a person or as JSON holding all of it."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from sqlalchemy import Engine, Row, desc, func, select

from reconciler.attention import AttentionItem, items_needing_attention
from reconciler.config import Config
from reconciler.jobs import job_schedules
from reconciler.ledger.coordination import REPLICA_TIMEOUT
from reconciler.ledger.schema import (
    MoesifTransaction,
    Replica,
    Run,
    UsageReport,
    WorkItem,
)
from reconciler.output import View, json_value, table
from reconciler.results import RunStatus
from reconciler.schedule import parse_schedule
from reconciler.usage.model import IntentState


@dataclass(frozen=True)
class JobStatus:
    job: str
    schedule: str
    last_run: datetime | None  # when the last run started; None: never
    outcome: str  # the last run's status (succeeded, partial, …); "" if it never ran
    counts: dict[str, int]  # the last run's summary
    next_run: datetime | None

    def row(self) -> dict[str, str]:
        """The job as the table shows it: counts that are not zero, times to the second."""
        return {
            "job": self.job,
            "schedule": self.schedule,
            "last run": f"{self.last_run:%Y-%m-%d %H:%M:%S}" if self.last_run else "never",
            "outcome": self.outcome,
            "counts": ", ".join(f"{k} {v}" for k, v in self.counts.items() if v),
            "next run": f"{self.next_run:%Y-%m-%d %H:%M:%S}" if self.next_run else "",
        }


@dataclass(frozen=True)
class ReplicaStatus:
    id: str
    host: str
    pid: int
    live: bool  # its heartbeat is fresh
    heartbeat_at: datetime
    leases: int  # work items it holds


@dataclass(frozen=True)
class Status:
    jobs: list[JobStatus]
    pending_usage_reports: int
    pending_moesif_transactions: int
    replicas: list[ReplicaStatus]
    attention: list[AttentionItem]


def current_status(config: Config) -> Status:
    """`reconciler status`: read from the migrated ledger, now."""
    from reconciler.app import opened_ledger
    from reconciler.clock import utc_now

    with opened_ledger(config) as engine:
        return read_status(config, engine, utc_now())


def read_status(config: Config, engine: Engine, now: datetime) -> Status:
    schedules = job_schedules(config)
    jobs = []
    with engine.connect() as connection:
        replicas = connection.execute(
            select(Replica.id, Replica.host, Replica.pid, Replica.heartbeat_at).order_by(Replica.started_at)
        ).all()
        for job, schedule in schedules.items():
            last = connection.execute(select(Run).where(Run.job == job).order_by(desc(Run.started_at)).limit(1)).first()
            jobs.append(
                JobStatus(
                    job,
                    schedule,
                    last.started_at if last else None,
                    shown_status(last, replicas, now) if last else "",
                    json.loads(last.summary) if last and last.summary else {},
                    parse_schedule(schedule).get_next_fire_time(None, now),
                )
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
    return Status(
        jobs,
        pending_reports,
        moesif_pending,
        [
            ReplicaStatus(key, host, pid, now - heartbeat_at < REPLICA_TIMEOUT, heartbeat_at, leases.get(key, 0))
            for key, host, pid, heartbeat_at in replicas
        ],
        items_needing_attention(engine),
    )


def view(status: Status) -> View:
    return View(
        "status",
        [job.row() for job in status.jobs],
        lambda: status_json(status),
        lambda console: status_table(status, console),
    )


def status_table(status: Status, console: Console) -> None:
    jobs = table("jobs", "job", "schedule", "last run", "outcome", "counts", "next run")
    for job in status.jobs:
        jobs.add_row(*job.row().values())
    console.print(jobs)
    console.print(
        f"pending usage reports: {status.pending_usage_reports}; "
        f"pending Moesif transactions: {status.pending_moesif_transactions}"
    )
    for r in status.replicas:
        console.print(
            f"replica {r.id} {r.host}:{r.pid} {'live' if r.live else 'silent'}, heartbeat {r.heartbeat_at:%H:%M:%S}, "
            f"{r.leases} lease(s)",
            markup=False,
        )
    console.print(f"items needing a person: {len(status.attention)}")
    for item in status.attention:
        console.print(f"{item.line()} (since {item.since:%Y-%m-%d %H:%M:%S})", markup=False)


def status_json(status: Status) -> str:
    document: dict[str, Any] = asdict(status)
    document["attention"] = [{**asdict(item), "line": item.line()} for item in status.attention]
    return json.dumps(document, indent=2, default=json_value)


def shown_status(run: Row[Any], replicas: Sequence[Row[Any]], now: datetime) -> str:
    """A run's status, except that a run still marked `running` whose process is gone shows as `interrupted`: on
    this host, its pid is no longer alive; on another host, it is a replica (PostgreSQL) whose heartbeat stopped.
    Anything else (a one-shot command on another host, say) cannot be checked from here and shows as recorded."""
    if run.status != RunStatus.RUNNING:
        return str(run.status)
    if run.host == socket.gethostname():
        return RunStatus.RUNNING.value if _alive(run.pid) else RunStatus.INTERRUPTED.value
    for _id, host, pid, heartbeat_at in replicas:
        if (host, pid) == (run.host, run.pid) and now - heartbeat_at >= REPLICA_TIMEOUT:
            return RunStatus.INTERRUPTED.value
    return RunStatus.RUNNING.value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
