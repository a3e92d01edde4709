"""The registry of scheduled jobs: which are on for a config, and that each runs its own cycle."""

from __future__ import annotations

import pytest

from reconciler.config import parse_config
from reconciler.jobs import JOBS, JobName, enabled_jobs, job_schedules

BASE = {"stripe": {"api_key": "sk_test_abc"}, "openmeter": {"token": "om_token"}}
MOESIF = {"moesif": {"management_token": "m"}, "balances": {"enabled": True}}
PLANS = {"plans": {"enabled": True, "sync_url": "http://app.internal/sync", "price_to_plan": {"price_1": "pro"}}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {**BASE, "balances": {"enabled": False}},
            [JobName.USAGE_SYNC, JobName.USAGE_READBACK],
            id="usage only",
        ),
        pytest.param(
            {**BASE, **MOESIF, **PLANS},
            [JobName.USAGE_SYNC, JobName.USAGE_READBACK, JobName.BALANCE_RECONCILE, JobName.PLAN_SYNC],
            id="everything",
        ),
        pytest.param(
            {**BASE, **MOESIF, "schedule": {"readback": "off"}},
            [JobName.USAGE_SYNC, JobName.BALANCE_RECONCILE],
            id="read-back off",
        ),
    ],
)
def test_the_jobs_that_are_on(raw, expected):
    config = parse_config(raw)
    assert [job.name for job in enabled_jobs(config)] == expected
    assert list(job_schedules(config)) == expected


def test_each_job_runs_its_own_cycle():
    class Daemon:
        def __init__(self) -> None:
            self.ran: list[str] = []

        def __getattr__(self, name: str):
            return lambda: self.ran.append(name)

    for job in JOBS:
        daemon = Daemon()
        job.run(daemon)  # type: ignore[arg-type]
        assert daemon.ran == [
            {
                JobName.USAGE_SYNC: "usage_cycle",
                JobName.USAGE_READBACK: "readback_cycle",
                JobName.BALANCE_RECONCILE: "balance_cycle",
                JobName.PLAN_SYNC: "plan_cycle",
            }[job.name]
        ]


def test_the_schedules_are_the_configured_ones():
    config = parse_config({**BASE, "balances": {"enabled": False}, "schedule": {"usage_sync": "5m"}})
    assert job_schedules(config)[JobName.USAGE_SYNC] == "5m"
