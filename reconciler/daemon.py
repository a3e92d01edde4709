"""`reconciler run`: APScheduler 3 as a ticker, coordination in our own tables.

The in-memory job store is deliberate: APScheduler 3 does not support sharing a persistent job store between
processes, and the ledger already makes every cycle safe to repeat. `coalesce` and `max_instances=1` mean a
slow cycle is never run twice at once and missed ticks collapse into one. SIGTERM/SIGINT stop the cycle
after the item in flight, wait for it, and exit 0.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from reconciler.app import build_app
from reconciler.config import Config
from reconciler.schedule import parse_schedule

log = structlog.get_logger(__name__)


def run_daemon(config: Config) -> int:
    stop = threading.Event()
    application = build_app(config, stop_requested=stop.is_set)

    def usage_cycle() -> None:
        try:
            application.usage_sync.run_cycle()
        except Exception:  # the scheduler must outlive one bad cycle; the next tick tries again
            log.exception("usage sync cycle crashed")

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
    scheduler.start()
    log.info("reconciler running", usage_sync=config.schedule.usage_sync)
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        scheduler.shutdown(wait=True)  # lets the running cycle finish its item in flight
        application.close()
    log.info("reconciler stopped")
    return 0
