"""The scheduled jobs, named once: the schedule each runs on and whether it is on, for the daemon (what it
schedules, what /readyz and /metrics expect) and for `status`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from reconciler.config import Config


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    schedule: Callable[[Config], str]
    enabled: Callable[[Config], bool]


JOBS = (
    ScheduledJob("usage_sync", lambda c: c.schedule.usage_sync, lambda c: True),
    ScheduledJob("usage_readback", lambda c: c.schedule.readback, lambda c: c.schedule.readback != "off"),
    ScheduledJob("balance_reconcile", lambda c: c.schedule.balance_reconcile, lambda c: c.balances.enabled),
    ScheduledJob("plan_sync", lambda c: c.schedule.plan_sync, lambda c: c.plans.enabled),
)


def job_schedules(config: Config) -> dict[str, str]:
    """Each job that is on, with its schedule, in a fixed order."""
    return {job.name: job.schedule(config) for job in JOBS if job.enabled(config)}
