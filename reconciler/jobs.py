"""The scheduled jobs, named once: each one's name, the schedule key it runs on, whether it is on, and how the
daemon runs it. The daemon schedules from this list, `status` lists it, and /readyz and /metrics expect what it
says is on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from reconciler.config import Config

if TYPE_CHECKING:
    from reconciler.daemon import Daemon


class JobName(StrEnum):
    """A job's name in the run log, the scheduler, /metrics labels and `status`."""

    USAGE_SYNC = "usage_sync"
    USAGE_READBACK = "usage_readback"
    BALANCE_RECONCILE = "balance_reconcile"
    PLAN_SYNC = "plan_sync"
    BACKFILL = "backfill"  # a command, never scheduled


@dataclass(frozen=True)
class ScheduledJob:
    name: JobName
    schedule: Callable[[Config], str]  # the job's schedule.* value
    enabled: Callable[[Config], bool]
    run: Callable[[Daemon], None]  # one scheduled cycle, as the daemon runs it (locks, ticks, metrics)


JOBS = (
    ScheduledJob(JobName.USAGE_SYNC, lambda c: c.schedule.usage_sync, lambda c: True, lambda d: d.usage_cycle()),
    ScheduledJob(
        JobName.USAGE_READBACK,
        lambda c: c.schedule.readback,
        lambda c: c.schedule.readback != "off",
        lambda d: d.readback_cycle(),
    ),
    ScheduledJob(
        JobName.BALANCE_RECONCILE,
        lambda c: c.schedule.balance_reconcile,
        lambda c: c.balances.enabled,
        lambda d: d.balance_cycle(),
    ),
    ScheduledJob(
        JobName.PLAN_SYNC, lambda c: c.schedule.plan_sync, lambda c: c.plans.enabled, lambda d: d.plan_cycle()
    ),
)


def enabled_jobs(config: Config) -> list[ScheduledJob]:
    """The jobs that are on, in a fixed order."""
    return [job for job in JOBS if job.enabled(config)]


def job_schedules(config: Config) -> dict[str, str]:
    """Each job that is on, with its schedule, in a fixed order."""
    return {job.name: job.schedule(config) for job in enabled_jobs(config)}
