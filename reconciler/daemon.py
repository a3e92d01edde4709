"""`reconciler run`: APScheduler 3 as a ticker, coordination in our own tables.

The in-memory job store is deliberate: APScheduler 3 does not support sharing a persistent job store between
processes, and the ledger already makes every cycle safe to repeat. `coalesce` and `max_instances=1` mean a
slow cycle is never run twice at once and missed ticks collapse into one. SIGTERM/SIGINT stop the cycle
after the item in flight, wait for it, and exit 0.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from reconciler.app import build_app
from reconciler.config import Config
from reconciler.schedule import parse_schedule

log = structlog.get_logger(__name__)


# Wake up this long after a final-sync deadline, so the cycle surely sees it as due.
DEADLINE_MARGIN = timedelta(seconds=5)


def run_daemon(config: Config) -> int:
    stop = threading.Event()
    one_cycle_at_a_time = threading.Lock()
    application = build_app(config, stop_requested=stop.is_set)

    def usage_cycle() -> None:
        with one_cycle_at_a_time:
            if stop.is_set():
                return
            try:
                result = application.usage_sync.run_cycle()
            except Exception:  # the scheduler must outlive one bad cycle; the next tick tries again
                log.exception("usage sync cycle crashed")
                return
        if result.next_final_sync is not None:
            wake_for_deadline(result.next_final_sync + DEADLINE_MARGIN)

    def wake_for_deadline(when: datetime) -> None:
        """A final sync is due before the next regular tick (legacy prices' last sync before period end,
        meter periods' final sync after grace): run an extra cycle then rather than miss it."""
        regular = scheduler.get_job("usage_sync")
        if regular is not None and regular.next_run_time is not None and regular.next_run_time <= when:
            return
        scheduler.add_job(
            usage_cycle,
            trigger="date",
            run_date=when,
            id="usage_sync_deadline",
            name="usage sync (final-sync deadline)",
            replace_existing=True,
        )
        log.info("extra cycle scheduled for a final-sync deadline", at=when.isoformat())

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
    )
    scheduler.add_job(
        usage_cycle,
        trigger=parse_schedule(config.schedule.usage_sync),
        id="usage_sync",
        name="usage sync",
        next_run_time=datetime.now(UTC),  # one cycle right away, then on schedule
    )
    if application.balance_sync is not None:
        balance_sync = application.balance_sync

        def balance_cycle() -> None:
            try:
                balance_sync.run_cycle()
            except Exception:
                log.exception("balance reconcile cycle crashed")

        scheduler.add_job(
            balance_cycle,
            trigger=parse_schedule(config.schedule.balance_reconcile),
            id="balance_reconcile",
            name="balance reconcile",
            next_run_time=datetime.now(UTC),
        )
    scheduler.start()
    log.info(
        "reconciler running",
        usage_sync=config.schedule.usage_sync,
        balance_reconcile=config.schedule.balance_reconcile if application.balance_sync else "disabled",
    )
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        scheduler.shutdown(wait=True)  # lets the running cycle finish its item in flight
        application.close()
    log.info("reconciler stopped")
    return 0
