"""`reconciler run` as a service: operations endpoints, signals, single-instance SQLite, status, retention."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import structlog
import yaml
from sqlalchemy import create_engine, text

from reconciler.clock import utc_now
from reconciler.config import ServerConfig, parse_config
from reconciler.daemon import Daemon
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.retention import prune_ledger
from reconciler.logs import configure_logging
from reconciler.metrics import Metrics
from reconciler.service.ops_server import Probes, readiness_problems
from reconciler_sandbox.server import SANDBOX_MOESIF_TOKEN, SANDBOX_OPENMETER_TOKEN, SANDBOX_STRIPE_KEY
from tests.integration.helpers import (
    PATIENCE_SECONDS,
    DaemonProcess,
    customer_with_usage,
    metric_value,
    reconciler,
    wait_until,
    write_config,
)
from tests.integration.test_cli import balance_customer


def test_health_readiness_and_metrics_of_a_running_service(sandbox, service_config, daemons):
    customer_with_usage(sandbox, value=4)
    daemon = daemons(service_config)
    assert httpx.get(daemon.ops_url("/healthz")).status_code == 200
    daemon.wait_for("usage sync finished")
    wait_until(lambda: httpx.get(daemon.ops_url("/readyz")).status_code == 200, what="/readyz to turn ready")
    assert httpx.get(daemon.ops_url("/readyz")).json() == {"status": "ready"}

    before = httpx.get(daemon.ops_url("/metrics")).text
    cycles_before = metric_value(before, "reconciler_cycles_total", job="usage_sync", outcome="succeeded")
    assert metric_value(before, "reconciler_usage_items_total", result="reported") == 1
    assert metric_value(before, "reconciler_usage_quantity_reported_total", meter="api_calls", direction="up") == 4
    assert metric_value(before, "reconciler_upstream_request_duration_seconds_count", api="stripe") >= 2
    assert metric_value(before, "reconciler_last_success_timestamp_seconds", job="usage_sync") > 0

    def cycles_succeeded() -> float:
        metrics = httpx.get(daemon.ops_url("/metrics")).text
        return metric_value(metrics, "reconciler_cycles_total", job="usage_sync", outcome="succeeded")

    wait_until(lambda: cycles_succeeded() > cycles_before, what="the next scheduled cycle to be counted")
    after = httpx.get(daemon.ops_url("/metrics")).text
    assert metric_value(after, "reconciler_pending_intents") == 0
    for secret in (SANDBOX_STRIPE_KEY, SANDBOX_OPENMETER_TOKEN, SANDBOX_MOESIF_TOKEN):
        assert secret not in after  # no secret in any metric name, label or value
    assert daemon.stop() == 0


def test_operations_endpoints_are_on_a_loopback_listener_of_their_own(service_config, daemons):
    assert ServerConfig().ops_host == "127.0.0.1"  # outside a container, nothing but this host reaches them
    daemon = daemons(service_config)  # server.ops_host is not set: the default
    running = daemon.wait_for("reconciler running")
    assert running["ops_host"] == "127.0.0.1" and running["ops_port"] != running["webhook_port"]
    for path in ("/metrics", "/readyz", "/healthz"):
        assert httpx.get(daemon.webhook_url(path)).status_code == 404, path
    assert httpx.get(daemon.ops_url("/metrics")).status_code == 200
    assert httpx.get(daemon.ops_url("/healthz")).status_code == 200
    assert httpx.post(daemon.ops_url("/webhooks/stripe"), content=b"{}").status_code == 404
    assert daemon.stop() == 0


def test_metrics_show_what_needs_a_person_and_for_how_long(sandbox, service_config, daemons):
    balance_customer(sandbox, grant=1, moesif_balance=0.0)  # a top-up in EUR for a USD customer: held
    sandbox.stripe.add_payment_intent("cus_bal", 1900, "eur", id="pi_eur", created=int(utc_now().timestamp()) - 60)
    raw = yaml.safe_load(service_config.read_text())
    raw["balances"].update(enabled=True, stripe_source="none", auto_correct=False)
    raw["schedule"]["balance_reconcile"] = "0 0 1 1 *"  # once, at start
    write_config(service_config, raw)
    daemon = daemons(service_config)
    daemon.wait_for("balance reconcile finished")

    def scrape(name: str, **labels: str) -> float:
        return metric_value(httpx.get(daemon.ops_url("/metrics")).text, name, **labels)

    assert scrape("reconciler_items_needing_attention", job="balance_reconcile", reason="held") == 1
    age = scrape("reconciler_oldest_item_needing_attention_seconds", job="balance_reconcile")
    assert age > 0
    assert scrape("reconciler_oldest_item_needing_attention_seconds", job="usage_sync") == 0
    wait_until(  # read at each scrape: the age grows between cycles
        lambda: scrape("reconciler_oldest_item_needing_attention_seconds", job="balance_reconcile") > age,
        what="the oldest item's age to grow",
    )
    assert daemon.stop() == 0


def test_readiness_turns_unready_when_the_database_goes_away_or_a_cycle_is_overdue(tmp_path):
    database = tmp_path / "ledger.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    now = [utc_now()]
    probes = Probes(
        engine=engine,
        metrics=Metrics(),
        scheduler_running=lambda: True,
        jobs=lambda: ["usage_sync"],
        max_cycle_age=lambda: timedelta(minutes=30),
        clock=lambda: now[0],
    )
    assert readiness_problems(probes) == ["usage_sync: no completed cycle yet"]
    with engine.begin() as connection:
        connection.execute(
            text(
                "insert into runs (id, job, started_at, finished_at, status, host, pid) values "
                "('r1', 'usage_sync', :t, :t, 'succeeded', 'h', 1)"
            ),
            {"t": now[0].replace(tzinfo=None)},
        )
    assert readiness_problems(probes) == []
    now[0] += timedelta(hours=1)
    assert "overdue" in readiness_problems(probes)[0]
    engine.dispose()
    database.unlink()  # the database goes away (SQLite re-creates an empty file on connect)
    assert "reconciler db upgrade" in readiness_problems(probes)[0]
    unreachable = Probes(
        engine=create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"),
        metrics=Metrics(),
        scheduler_running=lambda: True,
        jobs=lambda: [],
        max_cycle_age=lambda: timedelta(1),
        clock=utc_now,
    )
    assert readiness_problems(unreachable)[0].startswith("database unreachable")


def test_a_second_daemon_on_the_same_sqlite_database_refuses_to_start(service_config, daemons):
    first = daemons(service_config)
    first.wait_for("reconciler running")
    second = reconciler("run", "--config", str(service_config), timeout=30)
    assert second.returncode == 2
    assert "another `reconciler run` is already using" in second.stderr
    assert first.stop() == 0


def test_sigterm_during_a_cycle_exits_0_and_leaves_nothing_pending(sandbox, service_config, daemons, tmp_path):
    customers = 40  # several times the workers (stripe.max_concurrency) so that the stop lands mid-cycle
    for i in range(customers):
        customer_with_usage(sandbox, f"cus_{i}", value=i + 1)
    sandbox.openmeter.inject_fault("GET", "/api/v1/meters", 200, times=0)  # no-op: keeps fakes comparable
    stop_sent = threading.Event()
    original = sandbox.stripe.handle

    def held_until_the_stop(method, path, query, headers, body):
        response = original(method, path, query, headers, body)
        if method == "POST":
            stop_sent.wait(timeout=PATIENCE_SECONDS)  # reports in flight are answered only once SIGTERM is sent
        return response

    sandbox.stripe.handle = held_until_the_stop
    daemon = daemons(service_config)
    wait_until(lambda: sandbox.stripe.meter_events, what="the first report")
    daemon.process.send_signal(signal.SIGTERM)
    stop_sent.set()
    assert daemon.process.wait(timeout=PATIENCE_SECONDS) == 0
    stopped = daemon.wait_for("reconciler stopped")
    assert stopped
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from usage_reports where state = 'pending'")).scalar() == 0
        sent = connection.execute(text("select count(*) from usage_reports where state = 'sent'")).scalar()
    assert 1 <= sent == len(sandbox.stripe.meter_events) < customers  # stopped early, and nothing half-done


def test_sighup_applies_a_new_schedule_and_rejects_an_invalid_file(sandbox, service_config, daemons):
    raw = yaml.safe_load(service_config.read_text())
    raw["schedule"]["usage_sync"] = "0 0 1 1 *"
    write_config(service_config, raw)
    daemon = daemons(service_config)
    daemon.wait_for("usage sync finished")

    raw["schedule"]["usage_sync"] = "1s"
    write_config(service_config, raw)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("config reloaded", usage_sync="1s")
    # Under the old yearly schedule no further cycle would run; under the new one they come every second.
    runs_before = {e["run_id"] for e in daemon.events if e.get("event") == "usage sync finished"}
    new_runs: set[str] = set()
    while len(new_runs) < 2:
        finished = daemon.wait_for("usage sync finished", status="succeeded")
        daemon.events.remove(finished)
        new_runs |= {finished["run_id"]} - runs_before
    assert len(new_runs) >= 2

    raw["usage"]["window_size"] = "FORTNIGHT"
    write_config(service_config, raw)
    daemon.process.send_signal(signal.SIGHUP)
    rejected = daemon.wait_for("config reload rejected; the running config stays")
    assert "usage.window_size: must be one of MINUTE, HOUR, DAY" in rejected["problems"]
    assert httpx.get(daemon.ops_url("/healthz")).status_code == 200
    assert daemon.stop() == 0


def test_status_shows_jobs_and_items_needing_attention(sandbox, service_config):
    customer_with_usage(sandbox, "cus_ok")
    sandbox.stripe.inject_fault(
        "POST",
        "/v1/billing/meter_events",
        400,
        body={"error": {"type": "invalid_request_error", "message": "no such customer"}},
    )
    reconciler("sync-usage", "--config", str(service_config))
    result = reconciler("status", "--config", str(service_config))
    assert result.returncode == 0, result.stderr
    assert "usage_sync" in result.stdout and "partial" in result.stdout
    assert "failing: cus_ok api_calls" in result.stdout and "no such customer" in result.stdout


def test_retention_prunes_only_closed_history(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(engine)
    old, recent = datetime(2024, 1, 1), datetime(2026, 11, 1)
    with engine.begin() as connection:
        for i, (end, status) in enumerate([(old, "final"), (old, "provisional"), (recent, "final")]):
            connection.execute(
                text(
                    "insert into usage_periods (id, stream_key, period_start, period_end, kind, customer_id,"
                    " subscription_id, subscription_item_id, stripe_target, openmeter_meter, subject, status,"
                    " reported_total, next_sequence, failures, created_at, updated_at) values (:id, :key, :start, :end,"
                    " 'sum', 'c', 's', 'si', 't', 'm', 'c', :status, 1, 2, 0, :start, :start)"
                ),
                {"id": i + 1, "key": f"k{i}", "start": end - timedelta(days=30), "end": end, "status": status},
            )
            connection.execute(
                text(
                    "insert into usage_reports (period_id, sequence, identifier, quantity, total_after,"
                    " event_timestamp, final, state, attempts, run_id, created_at)"
                    " values (:id, 1, :ident, 1, 1, :t, 0, 'sent', 1, 'r', :t)"
                ),
                {"id": i + 1, "ident": f"id{i}", "t": end},
            )
    pruned = prune_ledger(engine, datetime(2025, 10, 1, tzinfo=UTC))
    assert (pruned["usage_periods"], pruned["usage_reports"]) == (1, 1)
    with engine.connect() as connection:
        left = connection.execute(text("select status, period_end from usage_periods order by id")).all()
    assert [row[0] for row in left] == ["provisional", "final"]  # an open period is never pruned
    engine.dispose()


def test_reloads_and_shutdown_close_every_client_they_opened(sandbox, service_config, daemons):
    """20 SIGHUP reloads, each followed by cycles on the new app (so its clients open connections to the fakes):
    the process holds as many files and sockets as after the first, and no socket is ever left to the garbage
    collector (which Python reports as an unclosed-socket ResourceWarning)."""
    balance_customer(sandbox, grant=5000, moesif_balance=50.0)
    raw = yaml.safe_load(service_config.read_text())
    raw["balances"].update(enabled=True)
    raw["schedule"]["balance_reconcile"] = "1s"
    write_config(service_config, raw)
    daemon = DaemonProcess(service_config, env={"PYTHONWARNINGS": "always::ResourceWarning"})
    try:
        daemon.wait_for("balance reconcile finished")

        def open_files() -> int:
            return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))

        def reload_and_use_the_new_app() -> None:
            # A new grant: the balance cycle on the new app has Moesif's balance to read and correct, so its
            # Moesif client opens a connection too.
            subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_bal")
            sandbox.stripe.add_credit_grant("cus_bal", 100, effective_at=subscription["created"])
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for("config reloaded")
            # Only lines logged after the reload from here on: cycles that start now run on the new app.
            daemon.events.clear()
            daemon.wait_for("usage sync started")
            daemon.wait_for("balance reconcile started")
            daemon.wait_for("balance reconcile finished")
            daemon.wait_for("usage sync finished")
            daemon.events.clear()

        reload_and_use_the_new_app()  # warm-up: what lives as long as the process
        before = open_files()
        for _ in range(20):
            reload_and_use_the_new_app()
        assert open_files() <= before + 4, f"{before} open files before 20 reloads, {open_files()} after"
        assert daemon.stop() == 0
        daemon.wait_for("reconciler stopped")
        daemon.process.wait()
        while True:  # every line up to the end
            try:
                daemon.wait_for("the end of the output", timeout=1)
            except AssertionError:
                break
        unclosed = [e["event"] for e in daemon.events if "ResourceWarning" in e["event"]]
        assert not unclosed, unclosed
    finally:
        daemon.kill()


@pytest.mark.parametrize("key", ["port", "ops_port"])
def test_a_port_in_use_stops_run_in_one_line_before_any_job_starts(service_config, tmp_path, key):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw = yaml.safe_load(service_config.read_text())
        raw["server"].update(host="127.0.0.1", ops_host="127.0.0.1", **{key: port})
        write_config(service_config, raw)
        result = reconciler("run", "--config", str(service_config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (server.{key}): Address already in use"
    ]
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from runs")).scalar() == 0  # no job started
    engine.dispose()


def test_status_shows_a_run_whose_process_was_killed_as_interrupted(sandbox, service_config, daemons):
    customer_with_usage(sandbox, "cus_held")
    reported, release = threading.Event(), threading.Event()
    original = sandbox.stripe.handle

    def held(method, path, query, headers, body):
        if method == "POST":  # the cycle stays mid-report until the test is done with it
            reported.set()
            release.wait(timeout=PATIENCE_SECONDS)
        return original(method, path, query, headers, body)

    sandbox.stripe.handle = held
    daemon = daemons(service_config)
    wait_until(reported.is_set, what="a report in flight")

    def usage_sync_outcome() -> str:
        result = reconciler("status", "--config", str(service_config))
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if "usage_sync" in line)

    assert "running" in usage_sync_outcome() and "interrupted" not in usage_sync_outcome()
    daemon.process.kill()  # SIGKILL: no chance to finish the run's row
    daemon.process.wait()
    release.set()
    assert "interrupted" in usage_sync_outcome()


def test_a_stop_signal_arriving_while_the_main_thread_writes_a_log_line_is_not_a_deadlock(tmp_path):
    """Python runs a signal handler on the main thread between two of its bytecodes, perhaps while that thread
    holds structlog's (non-reentrant) write lock on stderr. A handler that logged would wait on that lock forever:
    the daemon then hung on SIGTERM sent just after it logged "reconciler running" (seen under full-suite load).
    Here another thread stands in for the main one: while the lock is held, the handler must still return."""
    config = parse_config(
        {
            "stripe": {"api_key": "sk_test_abc"},
            "openmeter": {"token": "om_token"},
            "database": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        }
    )
    upgrade(make_engine(config.database.url))
    configure_logging("INFO", "json")  # the daemon's own logging: structlog's PrintLogger on stderr
    daemon = Daemon(config, None)
    handler = threading.Thread(target=daemon.request_stop, args=(signal.SIGTERM, None), daemon=True)
    try:
        with structlog._output._get_lock_for_file(sys.stderr):  # what PrintLogger.msg holds while it writes
            handler.start()
            handler.join(timeout=5)
            assert not handler.is_alive(), "the SIGTERM handler waited on the log's write lock"
        assert daemon.stop.is_set()
        assert daemon.stop_signal == "SIGTERM"
    finally:
        handler.join()
        structlog.reset_defaults()
        daemon.app.close()
        daemon.engine.dispose()
        daemon._lock_file.close()
