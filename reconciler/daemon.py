"""`reconciler run`: the service. APScheduler 3 as a ticker, coordination in our own tables.

The in-memory job store is deliberate: APScheduler 3 does not support sharing a persistent job store between
processes, and the ledger already makes every cycle safe to repeat. `coalesce` and `max_instances=1` mean a
slow cycle is never run twice at once and missed ticks collapse into one.

Signals: SIGTERM/SIGINT stop the cycle after the item in flight, wait for it (at most
`server.shutdown_timeout`) and exit 0. SIGHUP re-reads the config file: schedules, budgets, tolerances and
meter mappings change without a restart; an invalid file is logged with its key paths and the running config
stays. The app a reload replaces is closed (its HTTP clients and pools) once no job runs on it any more.

Start-up binds both listeners before the scheduler starts, so a port in use stops the daemon before any job runs.
"""

from __future__ import annotations

import fcntl
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from reconciler.app import App, build_app, open_database
from reconciler.attention import AttentionCollector
from reconciler.clock import utc_now
from reconciler.config import Config, ConfigError, load_config
from reconciler.doctor import Outcome, assess_connections
from reconciler.errors import SetupError
from reconciler.jobs import JOBS, JobName, enabled_jobs
from reconciler.ledger.coordination import Coordinator
from reconciler.ledger.database import connections_allowed
from reconciler.ledger.retention import prune_ledger
from reconciler.ledger.schema import MoesifTransaction, UsageReport
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.logs import configure_logging
from reconciler.metrics import GaugeCallback, Metrics
from reconciler.schedule import parse_schedule, tick_key
from reconciler.service.ops_server import Listener, Probes, WebhookEndpoint, build_ops_app, build_webhook_app
from reconciler.usage.model import IntentState
from reconciler.webhooks.inbox import WebhookInbox
from reconciler.webhooks.worker import WebhookWorker

log = structlog.get_logger(__name__)

# Wake up this long after a final-sync deadline, so the cycle surely sees it as due.
DEADLINE_MARGIN = timedelta(seconds=5)
PRUNE_SCHEDULE = "17 3 * * *"  # daily, off the hour
HEARTBEAT_SECONDS = 5


class AlreadyRunningError(SetupError):
    """Another `reconciler run` holds this SQLite database."""


def hold_sqlite_lock(database_url: str) -> IO[str] | None:
    """SQLite has no row locks to share work with: allow one daemon per database file (a second refuses to
    start). The lock is an flock on `<db>.lock`, released by the kernel even if the process is killed."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    lock_file = open(f"{url.database}.lock", "a+")  # noqa: SIM115 - held open for the process's lifetime
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise AlreadyRunningError(
            f"another `reconciler run` is already using {url.database}: SQLite supports one daemon per database; "
            "use PostgreSQL to run replicas"
        ) from None
    return lock_file


class Daemon:
    def __init__(self, config: Config, config_path: Path | None):
        self.config = config
        self.config_path = config_path
        self.stop = threading.Event()
        self.stop_signal: str | None = None  # the signal that set `stop`, logged by the main loop
        self.reload_requested = threading.Event()
        self.metrics = Metrics()
        self._usage_lock = threading.Lock()  # one usage cycle at a time (ticks and deadline wake-ups)
        self._deadline_requests: queue.SimpleQueue[datetime] = queue.SimpleQueue()
        self.engine = open_database(config)  # first: an unreachable database is named as such, not as a lock file
        self._lock_file = hold_sqlite_lock(config.database.url)
        # On PostgreSQL any number of replicas share the work; SQLite (one daemon per file) runs it all locally.
        self.coordinator = (
            Coordinator(self.engine, utc_now, config.ledger.lease_ttl)
            if self.engine.dialect.name == "postgresql"
            else None
        )
        self.app: App = build_app(config, self.stop.is_set, engine=self.engine, metrics=self.metrics)
        # Jobs running on each app (by id): a reload closes the app it replaces once its last job has ended.
        self._app_users: dict[int, int] = {}
        self._apps_lock = threading.Lock()
        self.metrics.add_collector(
            GaugeCallback(
                "reconciler_pending_intents",
                "Reports and Moesif transactions written but not yet acknowledged.",
                self._pending_intents,
            )
        )
        self.metrics.add_collector(AttentionCollector(self.engine, utc_now, self.enabled_jobs))
        self.scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300}
        )
        self.listeners: list[Listener] = []  # the webhook listener, then the operations one
        self._live_replicas = 0
        self.inbox = WebhookInbox(self.engine, utc_now)
        self._webhook_ledger = UsageLedger(self.engine, utc_now)
        self._webhook_wake = threading.Event()

    @contextmanager
    def _current_app(self) -> Iterator[App]:
        """The app a job runs on, held for the whole job: a reload swaps `self.app` but closes the old one only
        when the last job holding it ends (here, or in `reload` if none holds it)."""
        with self._apps_lock:
            app = self.app
            self._app_users[id(app)] = self._app_users.get(id(app), 0) + 1
        try:
            yield app
        finally:
            with self._apps_lock:
                self._app_users[id(app)] -= 1
                last = self._app_users[id(app)] == 0
                if last:
                    del self._app_users[id(app)]
                retired = last and app is not self.app
            if retired:
                app.close()

    # -- jobs ----------------------------------------------------------------------------------------

    def usage_cycle(self, tick: str | None = None) -> None:
        with self._usage_lock, self._current_app() as app:
            if self.stop.is_set():
                return
            try:
                if self.coordinator is None:
                    result = app.usage_sync.run_cycle()
                else:
                    key = tick or tick_key(self.config.schedule.usage_sync, utc_now())
                    result = app.usage_sync.run_shared_cycle(self.coordinator, key)
            except Exception:  # the scheduler must outlive one bad cycle; the next tick tries again
                log.exception("usage sync cycle crashed")
                return
        if result.next_final_sync is not None:
            # Scheduling happens on the main thread: a job thread touching the scheduler can deadlock with
            # its shutdown, which holds the job store lock while it waits for running jobs.
            self._deadline_requests.put(result.next_final_sync + DEADLINE_MARGIN)

    def wake_for_deadline(self, when: datetime) -> None:
        """A final sync is due before the next regular tick (legacy prices' last sync before period end, meter
        periods' final sync after grace): run an extra cycle then rather than miss it."""
        regular = self.scheduler.get_job(JobName.USAGE_SYNC)
        if regular is not None and regular.next_run_time is not None and regular.next_run_time <= when:
            return
        self.scheduler.add_job(
            self.usage_cycle,
            trigger="date",
            run_date=when,
            id="usage_sync_deadline",
            name="usage sync (final-sync deadline)",
            replace_existing=True,
            kwargs={"tick": f"deadline-{when:%Y%m%dT%H%M%S}"},  # the same key on every replica
        )
        log.info("extra cycle scheduled for a final-sync deadline", at=when.isoformat())

    def balance_cycle(self) -> None:
        with self._current_app() as app:
            balance_sync = app.balance_sync
            if balance_sync is None or self.stop.is_set():
                return
            if self.coordinator is not None:
                # The balance job is not split: one replica per tick runs it.
                key = tick_key(self.config.schedule.balance_reconcile, utc_now())
                if self.coordinator.claim_tick(JobName.BALANCE_RECONCILE, key) is None:
                    return
            try:
                balance_sync.run_cycle()
            except Exception:
                log.exception("balance reconcile cycle crashed")

    def plan_cycle(self) -> None:
        with self._current_app() as app:
            plan_sync = app.plan_sync
            if plan_sync is None or self.stop.is_set():
                return
            if self.coordinator is not None:
                key = tick_key(self.config.schedule.plan_sync, utc_now())
                if self.coordinator.claim_tick(JobName.PLAN_SYNC, key) is None:
                    return  # another replica runs this tick
            try:
                plan_sync.run_cycle()
            except Exception:
                log.exception("plan sync cycle crashed")

    def readback_cycle(self) -> None:
        """Stripe's summaries read back for periods whose invoices have not closed yet; what error reports explain is
        resent by a usage cycle for those customers at once."""
        if self.stop.is_set():
            return
        if self.coordinator is not None:
            key = tick_key(self.config.schedule.readback, utc_now())
            if self.coordinator.claim_tick(JobName.USAGE_READBACK, key) is None:
                return  # another replica runs this tick
        try:
            with self._current_app() as app:
                app.read_back_and_resend(self._usage_lock)
        except Exception:
            log.exception("read-back crashed")

    def prune(self) -> None:
        try:
            now = utc_now()
            pruned = prune_ledger(self.engine, now - self.config.ledger.retention, work_cutoff=now - timedelta(days=1))
            log.info("ledger pruned", **pruned)
        except Exception:
            log.exception("ledger pruning failed")

    def heartbeat(self) -> None:
        """PostgreSQL replicas: stay live, keep leases fresh, and take our share of the request budgets."""
        assert self.coordinator is not None
        try:
            self.coordinator.heartbeat()
            live = self.coordinator.live_replicas()
            self.app.share_budgets(live)
            if live != self._live_replicas:
                self._live_replicas = live
                log.info(
                    "request budgets shared",
                    replicas=live,
                    stripe_global_per_second=round(self.app.stripe.budget.global_per_second, 2),
                )
                self._warn_if_connections_run_out(live)
        except Exception:
            log.exception("heartbeat failed")

    def _warn_if_connections_run_out(self, live: int) -> None:
        """Replicas added one by one can outgrow PostgreSQL's max_connections: say so when they do (`doctor` checks
        the same), before workers are refused connections mid-cycle."""
        try:
            check = assess_connections(self.config.connections_needed(), live, connections_allowed(self.engine))
        except Exception:
            log.warning("could not read PostgreSQL's max_connections", exc_info=True)
            return
        if check.outcome is not Outcome.OK:
            log.warning("database connections may run out", detail=check.detail, fix=check.fix)

    def _schedule_jobs(self, *, first_run_now: bool) -> None:
        """Every job the registry (reconciler.jobs) says is on, on its schedule, and ledger pruning; a job switched
        off by a reload is unscheduled."""
        now = datetime.now(UTC)
        on = {job.name: job for job in enabled_jobs(self.config)}
        for job in JOBS:
            existing = self.scheduler.get_job(job.name)
            if job.name not in on:
                if existing:
                    existing.remove()
                continue
            self._schedule(job.name, partial(job.run, self), job.schedule(self.config), now if first_run_now else None)
        self._schedule("prune_ledger", self.prune, PRUNE_SCHEDULE, None)

    def _schedule(self, job_id: str, function: Callable[[], None], schedule: str, first_run: datetime | None) -> None:
        trigger = parse_schedule(schedule)
        existing = self.scheduler.get_job(job_id)
        if existing:
            existing.reschedule(trigger=trigger)
        else:
            run_now = {"next_run_time": first_run} if first_run else {}
            self.scheduler.add_job(function, trigger=trigger, id=job_id, name=job_id.replace("_", " "), **run_now)

    def enabled_jobs(self) -> list[str]:
        return [job.name for job in enabled_jobs(self.config)]

    def _pending_intents(self) -> float:
        with self.engine.connect() as connection:
            usage = connection.execute(
                select(func.count()).select_from(UsageReport).where(UsageReport.state == IntentState.PENDING)
            ).scalar_one()
            moesif = connection.execute(
                select(func.count())
                .select_from(MoesifTransaction)
                .where(MoesifTransaction.state == IntentState.PENDING)
            ).scalar_one()
        return float(usage + moesif)

    # -- reload --------------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: swap in a new config if it is valid; keep the running one otherwise."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload rejected; the running config stays", problems=exc.problems)
            return
        if new.database.url != self.config.database.url:
            log.warning("database.url changed: that takes a restart; the rest of the new config applies")
            new = new.model_copy(update={"database": self.config.database})
        listening = ("host", "port", "ops_host", "ops_port")
        if any(getattr(new.server, key) != getattr(self.config.server, key) for key in listening):
            log.warning("server.host/port/ops_host/ops_port changed: that takes a restart")
        configure_logging(new.logging.level, new.logging.format, new.secret_values())
        self.config = new
        replacement = build_app(new, self.stop.is_set, engine=self.engine, metrics=self.metrics)
        with self._apps_lock:
            old, self.app = self.app, replacement
            idle = id(old) not in self._app_users
        if idle:  # else the last job running on it closes it (`_current_app`)
            old.close()
        if self.coordinator is not None:
            self.app.share_budgets(self.coordinator.live_replicas())
        self._schedule_jobs(first_run_now=False)
        log.info(
            "config reloaded",
            usage_sync=new.schedule.usage_sync,
            balance_reconcile=new.schedule.balance_reconcile if new.balances.enabled else "disabled",
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """The SIGTERM/SIGINT handler. It must not log: a handler runs on the main thread between two of its
        bytecodes, perhaps while that thread holds the log's write lock (structlog's PrintLogger takes a
        non-reentrant lock per file), and logging here would then wait on that lock forever."""
        self.stop_signal = signal.Signals(signum).name
        self.stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

        if self.config.server.enabled:
            probes = Probes(
                engine=self.engine,
                metrics=self.metrics,
                scheduler_running=lambda: self.scheduler.running and not self.stop.is_set(),
                jobs=self.enabled_jobs,
                max_cycle_age=lambda: self.config.server.max_cycle_age,
                clock=utc_now,
            )
            webhooks = WebhookEndpoint(
                secret=lambda: s.get_secret_value() if (s := self.config.stripe.webhook_secret) else None,
                inbox=self.inbox,
                wake=self._webhook_wake.set,
                thin_secret=lambda: s.get_secret_value() if (s := self.config.stripe.thin_webhook_secret) else None,
                parse_thin=lambda *args: self.app.stripe.parse_thin_event(*args),
                max_body_bytes=lambda: self.config.server.max_body_bytes,
            )
            server = self.config.server
            # Both bound before any job is scheduled: a port in use (SetupError) stops the daemon with no job started.
            webhook = Listener("webhook", build_webhook_app(webhooks), server.host, server.port, "server.port")
            try:
                ops = Listener("operations", build_ops_app(probes), server.ops_host, server.ops_port, "server.ops_port")
            except SetupError:
                webhook.stop()
                raise
            self.listeners = [webhook, ops]
            for listener in self.listeners:
                listener.start()
        self._schedule_jobs(first_run_now=True)
        if self.coordinator is not None:
            self.coordinator.register()
            self.metrics.add_collector(
                GaugeCallback(
                    "reconciler_leases_held", "Work items this replica holds a lease on.", self.coordinator.leases_held
                )
            )
            self.scheduler.add_job(self.heartbeat, trigger="interval", seconds=HEARTBEAT_SECONDS, id="heartbeat")
            self.heartbeat()
        self.scheduler.start()
        self._webhook_thread = threading.Thread(target=self._work_off_webhooks, name="webhook-worker")
        self._webhook_thread.start()
        # The bound addresses (with port 0, the ports the system picked): operators and tests read them here.
        # No listeners (server.enabled: false), no addresses.
        bound: dict[str, str | int] = {}
        for prefix, listener in zip(("webhook", "ops"), self.listeners, strict=False):
            bound[f"{prefix}_host"], bound[f"{prefix}_port"] = listener.address
        log.info("reconciler running", jobs=self.enabled_jobs(), **bound)
        try:
            while not self.stop.wait(timeout=0.5):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                while not self._deadline_requests.empty():
                    self.wake_for_deadline(self._deadline_requests.get())
            log.info("stop requested", signal=self.stop_signal)
        finally:
            self._shut_down()
        log.info("reconciler stopped")
        return 0

    def _work_off_webhooks(self) -> None:
        """Runs stored webhook work as soon as it arrives (and what is due for a retry every few seconds)."""
        while not self.stop.is_set():
            self._webhook_wake.wait(timeout=5)
            self._webhook_wake.clear()
            if self.stop.is_set():
                return
            try:
                with self._current_app() as app:
                    WebhookWorker(
                        self.inbox, lambda app=app: app, self._webhook_ledger, self._usage_lock, self.metrics
                    ).work_off()
            except Exception:
                log.exception("webhook worker failed; retrying shortly")

    def _shut_down(self) -> None:
        """Let the running cycles finish their item in flight, within `server.shutdown_timeout`."""
        self._webhook_wake.set()
        waiter = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True}, daemon=True)
        waiter.start()
        deadline = time.monotonic() + self.config.server.shutdown_timeout.total_seconds()
        waiter.join(deadline - time.monotonic())
        self._webhook_thread.join(max(0.0, deadline - time.monotonic()))
        if waiter.is_alive() or self._webhook_thread.is_alive():
            log.error(
                "cycles still running after server.shutdown_timeout; exiting anyway (intents stay pending "
                "and are resent by the next run)"
            )
        for listener in self.listeners:
            listener.stop()
        if self.coordinator is not None:
            self.coordinator.leave()  # unfinished claims go back to the others at once
        self.app.close()  # every job's clients; the engine is the daemon's
        self.engine.dispose()
        if self._lock_file is not None:
            self._lock_file.close()


def run_daemon(config: Config, config_path: Path | None = None) -> int:
    return Daemon(config, config_path).run()
