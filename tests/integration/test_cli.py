"""The `reconciler` command as an operator runs it: a real subprocess, real config file, real HTTP."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import queue
import re
import socket
import subprocess
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import stripe
import yaml
from sqlalchemy import create_engine, text

from reconciler.clock import utc_now
from reconciler_sandbox.seed import seed_sandbox
from reconciler_sandbox.server import SANDBOX_OPENMETER_TOKEN, SANDBOX_STRIPE_KEY, Sandbox
from tests.integration.helpers import (
    PATIENCE_SECONDS,
    REPO_ROOT,
    command_line,
    customer_with_usage,
    reconciler,
    wait_until,
    write_config,
)


@pytest.fixture
def config_file(sandbox, tmp_path) -> Path:
    raw = sandbox.config_dict(
        f"sqlite:///{tmp_path / 'ledger.db'}", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}]
    )
    raw["logging"] = {"level": "DEBUG", "format": "json"}
    raw["server"] = {"port": 0, "ops_port": 0}
    return write_config(tmp_path / "config.yaml", raw)


def test_sync_usage_end_to_end_with_config_before_or_after_the_command(sandbox, config_file, tmp_path):
    customer_with_usage(sandbox)
    assert reconciler("--config", str(config_file), "db", "upgrade").returncode == 0
    first = reconciler("sync-usage", "--config", str(config_file))
    assert first.returncode == 0, first.stderr
    assert "reported" in first.stdout
    assert sandbox.stripe.meter_events[0].value == 42
    second = reconciler("--config", str(config_file), "sync-usage")  # from $RECONCILER_CONFIG works too
    assert second.returncode == 0
    assert len(sandbox.stripe.meter_events) == 1  # unchanged: nothing sent
    third = reconciler("sync-usage", env={"RECONCILER_CONFIG": str(config_file)})
    assert third.returncode == 0
    runs = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}").connect().execute(text("select count(*) from runs"))
    assert runs.scalar() == 3


def test_failed_items_exit_1_and_are_named(sandbox, config_file):
    customer_with_usage(sandbox, "cus_fine")
    counting = sandbox.stripe.add_meter("logins", formula="count")
    sandbox.stripe.add_customer(id="cus_counted")
    now = utc_now()
    sandbox.stripe.add_subscription(
        "cus_counted",
        [sandbox.stripe.add_price(meter=counting["id"])["id"]],
        current_period_start=int((now - timedelta(days=1)).timestamp()),
        current_period_end=int((now + timedelta(days=29)).timestamp()),
    )
    raw = yaml.safe_load(config_file.read_text())
    raw["usage"]["meters"].append({"stripe": "logins", "openmeter": "api_requests"})
    write_config(config_file, raw)
    reconciler("db", "upgrade", "--config", str(config_file))
    result = reconciler("sync-usage", "--config", str(config_file))
    assert result.returncode == 1
    assert "cus_counted" in result.stdout and "count" in result.stdout
    assert sandbox.stripe.meter_events[0].customer == "cus_fine"  # the others still synced


def test_dry_run_prints_the_plan_and_writes_nothing(sandbox, config_file, tmp_path):
    customer_with_usage(sandbox, value=7)
    reconciler("db", "upgrade", "--config", str(config_file))
    result = reconciler("sync-usage", "--dry-run", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "cus_cli" in result.stdout and "report" in result.stdout and "7 @" in result.stdout
    assert sandbox.stripe.meter_events == []
    with create_engine(f"sqlite:///{tmp_path / 'ledger.db'}").connect() as connection:
        assert connection.execute(text("select count(*) from runs")).scalar() == 0
        assert connection.execute(text("select count(*) from usage_periods")).scalar() == 0


def test_bad_config_exits_2_naming_the_key_path(tmp_path):
    path = write_config(
        tmp_path / "config.yaml",
        {"stripe": {"api_key": "sk_test_x"}, "openmeter": {"token": "t"}, "usage": {"window_size": "WEEK"}},
    )
    result = reconciler("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "usage.window_size: must be one of MINUTE, HOUR, DAY" in result.stderr


def test_missing_secret_names_the_environment_variable(tmp_path):
    result = reconciler("sync-usage", "--config", str(REPO_ROOT / "config.yaml"))
    assert result.returncode == 2
    assert "stripe.api_key: environment variable STRIPE_API_KEY is not set" in result.stderr
    assert "openmeter.token: environment variable OPENMETER_API_TOKEN is not set" in result.stderr


def test_check_config_masks_secrets_and_warns_about_grace(tmp_path):
    secret = "sk_live_do_not_print_me"
    others = ["om_do_not_print", "moesif_do_not_print", "whsec_do_not_print", "db_pw_do_not_print"]
    path = write_config(
        tmp_path / "config.yaml",
        {
            "database": {"url": "postgresql+psycopg://reconciler:db_pw_do_not_print@db.internal/reconciler"},
            "stripe": {"api_key": "${MY_KEY}", "webhook_secret": "whsec_do_not_print"},
            "openmeter": {"token": "om_do_not_print"},
            "moesif": {"management_token": "moesif_do_not_print"},
            "balances": {"enabled": True},
            "usage": {"grace_period": "2h"},
        },
    )
    result = reconciler("check-config", "--config", str(path), env={"MY_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert "window_size: HOUR" in result.stdout
    assert "db.internal" in result.stdout  # the URL is shown, its password is not
    for value in [secret, *others]:
        assert value not in result.stdout + result.stderr
    assert "warning: usage.grace_period (2h) is not shorter than stripe.invoice_grace_period (1h)" in result.stderr


def test_an_unmigrated_database_is_refused_with_the_command_to_run(sandbox, config_file):
    result = reconciler("sync-usage", "--config", str(config_file))
    assert result.returncode == 2
    assert "reconciler db upgrade" in result.stderr


def test_secrets_never_reach_logs_even_when_upstream_echoes_them(sandbox, config_file):
    customer_with_usage(sandbox)
    reconciler("db", "upgrade", "--config", str(config_file))
    echo = f"Invalid API Key provided: {SANDBOX_STRIPE_KEY} / token {SANDBOX_OPENMETER_TOKEN}"
    sandbox.stripe.inject_fault(
        "POST", "/v1/billing/meter_events", 400, body={"error": {"type": "invalid_request_error", "message": echo}}
    )
    result = reconciler("sync-usage", "--config", str(config_file))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Invalid API Key provided" in output  # the error itself is reported...
    assert SANDBOX_STRIPE_KEY not in output and SANDBOX_OPENMETER_TOKEN not in output  # ...without the secrets


def test_run_daemon_syncs_on_schedule_and_exits_0_on_sigterm(sandbox, config_file, daemons):
    customer_with_usage(sandbox, value=5)
    raw = yaml.safe_load(config_file.read_text())
    raw["schedule"] = {"usage_sync": "1s"}
    write_config(config_file, raw)
    reconciler("db", "upgrade", "--config", str(config_file))
    daemon = daemons(config_file)
    wait_until(lambda: sandbox.stripe.meter_events, what="the first report")
    assert [e.value for e in sandbox.stripe.meter_events] == [5]
    sandbox.openmeter.ingest("api_requests", "cus_cli", utc_now() - timedelta(days=1), 3)
    wait_until(lambda: len(sandbox.stripe.meter_events) >= 2, what="a later tick to report the new usage")
    assert daemon.stop() == 0
    assert [e.value for e in sandbox.stripe.meter_events] == [5, 3]
    assert daemon.wait_for("reconciler stopped")


def test_run_daemon_wakes_up_for_a_legacy_final_sync_between_ticks(sandbox, config_file, daemons):
    """However late the daemon's first cycle comes, it sees a period whose final sync falls due 5 s later, long
    before the next (yearly) tick; usage added after that first report must reach Stripe by the wake-up."""
    now = utc_now()
    sandbox.stripe.add_customer(id="cus_legacy")
    sandbox.stripe.add_price(id="price_legacy")
    subscription = sandbox.stripe.add_subscription(
        "cus_legacy",
        ["price_legacy"],
        current_period_start=int((now - timedelta(days=2)).timestamp()),
        current_period_end=int((now + timedelta(days=1)).timestamp()),
    )
    sandbox.openmeter.add_meter("api_requests")
    sandbox.openmeter.ingest("api_requests", "cus_legacy", now - timedelta(days=1), 2)
    raw = yaml.safe_load(config_file.read_text())
    raw["usage"]["meters"] = [{"stripe": "price_legacy", "openmeter": "api_requests"}]
    raw["usage"]["legacy_final_sync_before"] = "5m"
    raw["schedule"] = {"usage_sync": "0 0 1 1 *"}  # once a year: only the deadline can trigger a 2nd cycle
    write_config(config_file, raw)
    reconciler("db", "upgrade", "--config", str(config_file))
    item = subscription["items"]["data"][0]["id"]
    original = sandbox.stripe.handle
    first_listing, first_report = threading.Event(), threading.Event()

    def timed_by_the_daemon(method, path, query, headers, body):
        # Times follow the daemon's own first look, not the test's start: a slow start-up changes nothing.
        if method == "GET" and path == "/v1/subscriptions" and not first_listing.is_set():
            first_listing.set()
            period_end = utc_now() + timedelta(minutes=5, seconds=5)  # final sync due 5 s from now
            sandbox.stripe.update_subscription(subscription["id"], current_period_end=int(period_end.timestamp()))
        response = original(method, path, query, headers, body)
        if method == "POST" and "usage_records" in path and not first_report.is_set():
            first_report.set()
            sandbox.openmeter.ingest("api_requests", "cus_legacy", now - timedelta(hours=3), 1)
        return response

    sandbox.stripe.handle = timed_by_the_daemon
    daemon = daemons(config_file)
    daemon.wait_for("extra cycle scheduled for a final-sync deadline")
    wait_until(lambda: sandbox.stripe.usage_record_total(item) == 3, what="the final sync's total of 3")
    assert daemon.stop() == 0


def balance_customer(sandbox: Sandbox, *, grant: int, moesif_balance: float) -> None:
    customer_with_usage(sandbox, "cus_bal", value=0)
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_bal")
    sandbox.stripe.add_credit_grant("cus_bal", grant, effective_at=subscription["created"])
    sandbox.moesif.add_subscription(subscription["id"], "cus_bal", current_balance=moesif_balance)


def test_reconcile_balances_writes_a_json_report_and_corrects_drift(sandbox, config_file, tmp_path):
    balance_customer(sandbox, grant=5000, moesif_balance=45.0)
    reconciler("db", "upgrade", "--config", str(config_file))
    report = tmp_path / "report.json"
    result = reconciler("reconcile-balances", "--format", "json", "--output", str(report), "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    [line] = data["customers"]
    assert (line["customer"], line["stripe_expected"], line["moesif"], line["difference"], line["action"]) == (
        "cus_bal",
        "50.00",
        "45.00",
        "5.00",
        "correct",
    )
    assert sandbox.moesif.balance(line["subscription"]) == 50.0


def forward_only(config_file) -> None:
    """Balances that only forward money (stripe_source: none, nothing corrected), on a migrated ledger."""
    raw = yaml.safe_load(config_file.read_text())
    raw["balances"].update(stripe_source="none", auto_correct=False)
    write_config(config_file, raw)
    reconciler("db", "upgrade", "--config", str(config_file))


def test_a_top_up_that_cannot_be_forwarded_is_held_once_exits_1_and_stays_in_status(sandbox, config_file):
    """A top-up paid in another currency than the customer's Moesif subscription is not converted: it is named,
    counted, exits 1 (3 with --fail-on-drift), recorded once, and `status` keeps showing it to a person."""
    balance_customer(sandbox, grant=1, moesif_balance=0.0)
    created = int(utc_now().timestamp()) - 3600
    sandbox.stripe.add_payment_intent("cus_bal", 2500, "usd", id="pi_usd", created=created)
    sandbox.stripe.add_payment_intent("cus_bal", 1900, "eur", id="pi_eur", created=created + 1)
    forward_only(config_file)
    first = reconciler("reconcile-balances", "--format", "json", "--config", str(config_file))
    assert first.returncode == 1, first.stderr
    [customer] = json.loads(first.stdout)["customers"]
    [held] = customer["held"]
    assert held.startswith("topup pi_eur (19.00 EUR): paid in EUR but the Moesif subscription counts USD")
    assert json.loads(first.stdout)["summary"]["held"] == 1
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_bal")
    assert [t["transaction_id"] for t in sandbox.moesif.transactions] == ["pi_usd"]  # the rest still forwarded

    again = reconciler("reconcile-balances", "--fail-on-drift", "--config", str(config_file))
    assert again.returncode == 0, again.stdout  # recorded once: not found again as new
    assert sandbox.moesif.balance(subscription["id"]) == 25.0
    status = reconciler("status", "--config", str(config_file))
    assert "not forwarded to Moesif, held for a person: cus_bal pi_eur: paid in EUR" in " ".join(status.stdout.split())


def test_a_held_top_up_is_listed_by_report_and_status_until_it_is_resolved(sandbox, config_file, tmp_path):
    balance_customer(sandbox, grant=1, moesif_balance=0.0)
    sandbox.stripe.add_payment_intent("cus_bal", 1900, "eur", id="pi_eur", created=int(utc_now().timestamp()) - 60)
    forward_only(config_file)
    reconciler("reconcile-balances", "--config", str(config_file))

    data = json.loads(reconciler("report", "--format", "json", "--config", str(config_file)).stdout)
    [item] = data["attention"]
    assert [item[k] for k in ("job", "reason", "customer", "key")] == ["balance_reconcile", "held", "cus_bal", "pi_eur"]
    assert item["detail"].startswith("paid in EUR") and item["since"]
    assert data["needs_a_person"] is True and data["totals"]["needing_a_person"] == 1
    strict = reconciler("report", "--fail-on-drift", "--config", str(config_file))
    assert strict.returncode == 3 and "needs a person" in strict.stdout and "pi_eur" in strict.stdout
    page = tmp_path / "report.html"
    reconciler("report", "--format", "html", "--output", str(page), "--config", str(config_file))
    assert "<h2>Needs a person</h2>" in page.read_text() and '<td class="id">pi_eur</td>' in page.read_text()
    status = reconciler("status", "--config", str(config_file)).stdout
    assert "items needing a person: 1" in status and "held for a person: cus_bal pi_eur" in " ".join(status.split())

    ledger = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with ledger.begin() as connection:  # what `balances resolve` does
        connection.execute(text("update moesif_transactions set state = 'sent' where transaction_id = 'pi_eur'"))
    ledger.dispose()
    data = json.loads(reconciler("report", "--format", "json", "--config", str(config_file)).stdout)
    assert data["attention"] == [] and data["needs_a_person"] is False
    assert "items needing a person: 0" in reconciler("status", "--config", str(config_file)).stdout


def test_fail_on_drift_exits_3_when_drift_is_left_uncorrected(sandbox, config_file):
    balance_customer(sandbox, grant=5000, moesif_balance=45.0)
    raw = yaml.safe_load(config_file.read_text())
    raw["balances"]["auto_correct"] = False
    write_config(config_file, raw)
    reconciler("db", "upgrade", "--config", str(config_file))
    plain = reconciler("reconcile-balances", "--config", str(config_file))
    strict = reconciler("reconcile-balances", "--fail-on-drift", "--config", str(config_file))
    assert plain.returncode == 0 and strict.returncode == 3
    assert "cus_bal" in strict.stdout and "report" in strict.stdout and "+5.00" in strict.stdout
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_bal")
    assert sandbox.moesif.balance(subscription["id"]) == 45.0  # nothing was sent


def test_balance_config_that_would_make_everything_drift_is_refused(tmp_path):
    path = write_config(
        tmp_path / "config.yaml",
        {
            "stripe": {"api_key": "k"},
            "openmeter": {"token": "t"},
            "moesif": {"management_token": "m"},
            "balances": {"enabled": True, "stripe_source": "none", "auto_correct": True},
        },
    )
    result = reconciler("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "balances.auto_correct: needs a Stripe balance to compare with" in result.stderr


def test_reconcile_balances_needs_balances_enabled(sandbox, config_file):
    raw = yaml.safe_load(config_file.read_text())
    raw["balances"]["enabled"] = False
    write_config(config_file, raw)
    result = reconciler("reconcile-balances", "--config", str(config_file))
    assert result.returncode == 2 and "balances.enabled is false" in result.stderr


def as_if_sent_ago(sandbox, tmp_path, ago: timedelta) -> None:
    """Move the one report of a `sync-usage` back in time on both sides, when it was sent as well as its date."""
    then = utc_now() - ago
    [event] = sandbox.stripe.meter_events
    event.timestamp = event.created = int(then.timestamp())
    with create_engine(f"sqlite:///{tmp_path / 'ledger.db'}").begin() as connection:
        at = {"t": then.replace(tzinfo=None)}
        connection.execute(text("update usage_periods set last_event_at = :t"), at)
        connection.execute(text("update usage_reports set event_timestamp = :t, created_at = :t, sent_at = :t"), at)


MOESIF_POSTS = "/v1/~/billing/reports/balance_transactions"


def posts_of(sandbox: Sandbox, transaction_id: str) -> int:
    """POSTs that reached the Moesif fake for this transaction_id, applied or not."""
    return sum(
        1
        for r in sandbox.moesif.requests
        if r.method == "POST"
        and r.path.endswith("/balance_transactions")
        and json.loads(r.body)["transaction_id"] == transaction_id
    )


def a_top_up_whose_outcome_is_unknown(sandbox: Sandbox, config_file: Path, *, applied: bool) -> dict:
    """pi_lost (25.00 USD) forwarded with stripe_source: none; Moesif answers 503 (after applying it, or not) and,
    as Moesif may not deduplicate transaction ids, it is flagged and not resent. The cycle's JSON output."""
    balance_customer(sandbox, grant=1, moesif_balance=0.0)
    sandbox.moesif.dedupe_transaction_ids = False
    created = int(utc_now().timestamp()) - 3600
    sandbox.stripe.add_payment_intent("cus_bal", 2500, "usd", id="pi_lost", created=created)
    forward_only(config_file)
    sandbox.moesif.inject_fault("POST", MOESIF_POSTS, 503, after_apply=applied)
    result = reconciler("reconcile-balances", "--format", "json", "--config", str(config_file))
    assert posts_of(sandbox, "pi_lost") == 1
    return json.loads(result.stdout)


def test_with_stripe_source_none_an_unknown_outcome_asks_a_person_to_resolve_it(sandbox, config_file):
    """No comparison runs with stripe_source: none, so the flag must not promise one."""
    cycle = a_top_up_whose_outcome_is_unknown(sandbox, config_file, applied=False)
    [flag] = cycle["customers"][0]["flags"]
    assert flag.startswith("pi_lost: whether Moesif applied it is unknown and it was not resent")
    assert "nothing compares balances (balances.stripe_source: none)" in flag
    assert "reconciler balances resolve" in flag and "drift" not in flag
    status = reconciler("status", "--config", str(config_file))
    assert "check in Moesif (an attempt's outcome was unknown): cus_bal pi_lost" in status.stdout


def test_resolve_not_applied_resends_once_and_a_second_is_refused(sandbox, config_file):
    a_top_up_whose_outcome_is_unknown(sandbox, config_file, applied=False)
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_bal")
    assert sandbox.moesif.balance(subscription["id"]) == 0.0  # it never landed

    args = ("balances", "resolve", "pi_lost", "--not-applied", "--config", str(config_file))
    first = reconciler(*args, "--note", "not in Moesif's transaction list", "--by", "alice")
    assert first.returncode == 0, first.stderr
    assert "no balance comparison recorded for cus_bal" in first.stdout  # shown before acting
    assert "resent to Moesif with the same transaction_id" in first.stdout
    assert posts_of(sandbox, "pi_lost") == 2  # exactly one more
    assert sandbox.moesif.balance(subscription["id"]) == 25.0

    second = reconciler(*args)
    assert second.returncode == 2
    assert "pi_lost was already resent once (--not-applied by alice" in " ".join(second.stderr.split())
    assert posts_of(sandbox, "pi_lost") == 2

    status = reconciler("status", "--config", str(config_file))
    assert "pi_lost" not in status.stdout
    report = json.loads(reconciler("report", "--format", "json", "--config", str(config_file)).stdout)
    decisions = [a for a in report["audit"] if a["system"] == "person"]
    assert [(a["request"], a["key"], a["customer"]) for a in decisions] == [
        ("reconciler balances resolve --not-applied", "pi_lost", "cus_bal")
    ]
    assert decisions[0]["outcome"].startswith("by alice: was outcome unknown")
    assert decisions[0]["outcome"].endswith("; note: not in Moesif's transaction list")
    resends = [a for a in report["audit"] if a["request"].endswith("(resent)")]
    assert [(a["system"], a["key"], a["outcome"]) for a in resends] == [("moesif", "pi_lost", "sent")]
    assert report["totals"]["moesif_writes"] == 2


def test_resolve_applied_closes_it_without_sending(sandbox, config_file):
    a_top_up_whose_outcome_is_unknown(sandbox, config_file, applied=True)
    result = reconciler("balances", "resolve", "pi_lost", "--applied", "--by", "bob", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert posts_of(sandbox, "pi_lost") == 1
    status = reconciler("status", "--config", str(config_file))
    assert "pi_lost" not in status.stdout
    again = reconciler("balances", "resolve", "pi_lost", "--not-applied", "--config", str(config_file))
    assert again.returncode == 2 and "nothing to resolve" in again.stderr
    report = json.loads(reconciler("report", "--format", "json", "--config", str(config_file)).stdout)
    [decision] = [a for a in report["audit"] if a["system"] == "person"]
    assert (decision["request"], decision["key"]) == ("reconciler balances resolve --applied", "pi_lost")
    assert decision["outcome"].startswith("by bob: ")
    html = reconciler("report", "--format", "html", "--config", str(config_file)).stdout
    assert "reconciler balances resolve --applied" in html


def test_a_held_top_up_is_closed_by_hand_never_resent(sandbox, config_file):
    balance_customer(sandbox, grant=1, moesif_balance=0.0)
    sandbox.stripe.add_payment_intent("cus_bal", 1900, "eur", id="pi_eur", created=int(utc_now().timestamp()) - 60)
    forward_only(config_file)
    assert reconciler("reconcile-balances", "--config", str(config_file)).returncode == 1
    refused = reconciler("balances", "resolve", "pi_eur", "--not-applied", "--config", str(config_file))
    assert refused.returncode == 2 and "pi_eur is held" in refused.stderr
    closed = reconciler(
        "balances", "resolve", "pi_eur", "--applied", "--note", "credited by hand", "--config", str(config_file)
    )
    assert closed.returncode == 0, closed.stderr
    assert posts_of(sandbox, "pi_eur") == 0
    assert "pi_eur" not in reconciler("status", "--config", str(config_file)).stdout


def test_resolve_names_an_unknown_transaction_and_waits_for_no_running_cycle(sandbox, config_file, tmp_path):
    import fcntl

    a_top_up_whose_outcome_is_unknown(sandbox, config_file, applied=False)
    unknown = reconciler("balances", "resolve", "pi_nope", "--applied", "--config", str(config_file))
    assert unknown.returncode == 2 and "no Moesif transaction pi_nope in the ledger" in unknown.stderr
    with open(tmp_path / "ledger.db.balances.lock", "a+") as cycle:  # as a running balance cycle holds it
        fcntl.flock(cycle, fcntl.LOCK_SH)
        busy = reconciler("balances", "resolve", "pi_lost", "--not-applied", "--config", str(config_file))
    assert busy.returncode == 1 and "a balance cycle is running" in busy.stderr
    assert posts_of(sandbox, "pi_lost") == 1  # nothing sent, and it may still be resolved
    assert "pi_lost" in reconciler("status", "--config", str(config_file)).stdout


def test_verify_exits_3_when_stripe_holds_usage_the_reconciler_never_sent(sandbox, config_file, tmp_path):
    customer_with_usage(sandbox, value=5)
    reconciler("db", "upgrade", "--config", str(config_file))
    assert reconciler("sync-usage", "--config", str(config_file)).returncode == 0
    as_if_sent_ago(sandbox, tmp_path, timedelta(minutes=10))  # past the time Stripe's summaries may lag
    clean = reconciler("verify", "--format", "json", "--config", str(config_file))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert [p["finding"] for p in json.loads(clean.stdout)["periods"]] == ["ok"]

    client = stripe.StripeClient(SANDBOX_STRIPE_KEY, base_addresses={"api": sandbox.stripe_server.url})
    client.v1.billing.meter_events.create(  # another writer, on the same customer and meter
        params={
            "event_name": "api_calls",
            "identifier": "other-writer",
            "payload": {"stripe_customer_id": "cus_cli", "value": "2"},
            "timestamp": int((utc_now() - timedelta(days=1)).timestamp()),
        }
    )
    found = reconciler("verify", "--format", "json", "--config", str(config_file))
    assert found.returncode == 3
    [period] = json.loads(found.stdout)["periods"]
    assert (period["finding"], period["stripe"], period["reported"]) == ("foreign_usage", "7", 5)


def test_verify_waits_out_stripe_summary_lag_before_calling_a_report_missing(sandbox, config_file, tmp_path):
    """Stripe aggregates meter events asynchronously and gives no bound
    (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api): here the sandbox's summaries
    lag 9 minutes, and `stripe.summary_lag` (10m by default) covers that. verify's old fixed window (5 minutes) did
    not: a report sent 6 minutes ago was `missing_in_stripe`, exit 3."""
    sandbox.stripe.summary_lag_seconds = 9 * 60
    customer_with_usage(sandbox, value=5)
    reconciler("db", "upgrade", "--config", str(config_file))
    assert reconciler("sync-usage", "--config", str(config_file)).returncode == 0

    def verify() -> tuple[int, dict]:
        done = reconciler("verify", "--format", "json", "--config", str(config_file))
        [period] = json.loads(done.stdout)["periods"]
        return done.returncode, {key: period[key] for key in ("finding", "stripe", "reported")}

    as_if_sent_ago(sandbox, tmp_path, timedelta(minutes=6))
    assert verify() == (0, {"finding": "settling", "stripe": "0", "reported": 5})  # not yet known: no person needed
    as_if_sent_ago(sandbox, tmp_path, timedelta(minutes=10))
    assert verify() == (0, {"finding": "ok", "stripe": "5", "reported": 5})
    sandbox.stripe.meter_events.clear()  # Stripe dropped it after all: past the lag, that is a finding
    assert verify() == (3, {"finding": "missing_in_stripe", "stripe": "0", "reported": 5})


def test_report_writes_html_and_json_files(sandbox, config_file, tmp_path):
    customer_with_usage(sandbox, value=9)
    reconciler("db", "upgrade", "--config", str(config_file))
    reconciler("sync-usage", "--config", str(config_file))
    page, data = tmp_path / "report.html", tmp_path / "report.json"
    assert reconciler("report", "--format", "html", "--output", str(page), "--config", str(config_file)).returncode == 0
    assert reconciler("report", "--format", "json", "--output", str(data), "--config", str(config_file)).returncode == 0
    totals = json.loads(data.read_text())["totals"]
    assert totals["reported"] == 9 and totals["stripe_writes"] == 1
    assert (
        page.read_text().startswith("<!DOCTYPE html>")
        and "<dt>Usage reported to Stripe</dt><dd>9</dd>" in page.read_text()
    )


def test_every_result_command_writes_csv_and_html(sandbox, config_file, tmp_path):
    customer_with_usage(sandbox, value=4)
    reconciler("db", "upgrade", "--config", str(config_file))
    reconciler("sync-usage", "--config", str(config_file))
    since = (utc_now() - timedelta(days=10)).date().isoformat()
    until = (utc_now() + timedelta(days=1)).isoformat()
    commands = {
        "sync-usage": ["sync-usage", "--dry-run"],
        "verify": ["verify"],
        "backfill": ["backfill", "--from", since, "--to", until, "--dry-run"],
        "report": ["report"],
    }
    for name, args in commands.items():
        as_csv = reconciler(*args, "--format", "csv", "--config", str(config_file))
        assert as_csv.returncode in (0, 3), as_csv.stderr
        rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
        assert rows and rows[0]["customer"] == "cus_cli", name
        page = tmp_path / f"{name}.html"
        as_html = reconciler(*args, "--format", "html", "--output", str(page), "--config", str(config_file))
        assert as_html.returncode in (0, 3), as_html.stderr
        text = page.read_text()
        assert text.startswith("<!DOCTYPE html>") and "cus_cli" in text and "http" not in text, name


def test_sync_usage_json_output(sandbox, config_file):
    customer_with_usage(sandbox, value=6)
    reconciler("db", "upgrade", "--config", str(config_file))
    dry = json.loads(reconciler("sync-usage", "--dry-run", "--format", "json", "--config", str(config_file)).stdout)
    assert [(p["customer"], p["action"], p["quantity"]) for p in dry["plan"]] == [("cus_cli", "report", 6)]
    real = reconciler("sync-usage", "--format", "json", "--config", str(config_file))
    assert real.returncode == 0 and json.loads(real.stdout)["summary"]["reported"] == 1


def test_logs_in_a_pipe_are_json_lines_whose_fields_are_json_values(sandbox, config_file, daemons):
    """`logging.format: auto` with stderr a pipe: every line JSON, a list a JSON list (it used to be its repr)."""
    raw = yaml.safe_load(config_file.read_text())
    raw["logging"]["format"] = "auto"
    write_config(config_file, raw)
    customer_with_usage(sandbox)
    reconciler("db", "upgrade", "--config", str(config_file))
    synced = reconciler("sync-usage", "--config", str(config_file))
    assert synced.returncode == 0, synced.stderr
    events = [json.loads(line)["event"] for line in synced.stderr.splitlines()]
    assert "usage sync started" in events and "usage sync finished" in events
    daemon = daemons(config_file)
    jobs = daemon.wait_for("reconciler running")["jobs"]
    assert isinstance(jobs, list) and {"usage_sync", "balance_reconcile"} <= set(jobs)
    assert daemon.stop() == 0


def test_status_takes_format_and_output_and_its_json_holds_what_the_table_shows(sandbox, config_file, tmp_path):
    balance_customer(sandbox, grant=1, moesif_balance=0.0)
    sandbox.stripe.add_payment_intent("cus_bal", 1900, "eur", id="pi_eur", created=int(utc_now().timestamp()) - 60)
    forward_only(config_file)
    reconciler("sync-usage", "--config", str(config_file))
    reconciler("reconcile-balances", "--config", str(config_file))
    result = reconciler("status", "--format", "json", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jobs = {job["job"]: job for job in data["jobs"]}
    assert list(jobs) == ["usage_sync", "usage_readback", "balance_reconcile"]
    usage, balances = jobs["usage_sync"], jobs["balance_reconcile"]
    assert (usage["job"], usage["schedule"], usage["outcome"]) == ("usage_sync", "*/15 * * * *", "succeeded")
    assert datetime.fromisoformat(usage["next_run"]) > datetime.fromisoformat(usage["last_run"])
    assert balances["job"] == "balance_reconcile" and balances["counts"]["held"] == 1
    assert (data["pending_usage_reports"], data["pending_moesif_transactions"], data["replicas"]) == (0, 0, [])
    [item] = data["attention"]
    assert (item["job"], item["reason"], item["customer"], item["key"]) == (
        "balance_reconcile",
        "held",
        "cus_bal",
        "pi_eur",
    )
    table = reconciler("status", "--config", str(config_file)).stdout
    assert item["line"] in table and "held 1" in table
    written = tmp_path / "status.json"
    assert (
        reconciler("status", "--format", "json", "--output", str(written), "--config", str(config_file)).returncode == 0
    )
    assert json.loads(written.read_text())["attention"] == data["attention"]
    as_csv = list(
        csv.DictReader(io.StringIO(reconciler("status", "--format", "csv", "--config", str(config_file)).stdout))
    )
    assert [row["job"] for row in as_csv] == list(jobs)


def test_tables_in_a_pipe_keep_every_id_amount_and_state_whole(sandbox, tmp_path):
    """Piped with COLUMNS=80, rich squeezed tables into 80 columns and cut `cus_sandbox_acme` to `cus_san…`: now
    every row of every table is one line, with its ids, amounts and states whole."""
    seed_sandbox(sandbox.stripe, sandbox.openmeter, sandbox.moesif, utc_now())
    raw = {**sandbox.config_dict(f"sqlite:///{tmp_path / 'ledger.db'}", plans=True), "server": {"port": 0}}
    config = write_config(tmp_path / "config.yaml", raw)

    def piped(*args: str) -> str:
        result = reconciler(*args, "--config", str(config), env={"COLUMNS": "80"})
        assert result.returncode in (0, 3), result.stderr
        assert "…" not in result.stdout, result.stdout
        return result.stdout

    def row(table: str, *cells: object) -> None:
        assert any(all(f" {cell} " in line for cell in cells) for line in table.splitlines()), (cells, table)

    piped("db", "upgrade")
    customers = ("cus_sandbox_acme", "cus_sandbox_globex", "cus_sandbox_initech")
    since, until = (utc_now() - timedelta(days=40)).date().isoformat(), (utc_now() + timedelta(days=1)).isoformat()
    named = {  # in order: each command's table, and the customers it names
        ("sync-usage", "--dry-run"): customers,
        ("sync-usage",): (),  # the counts only
        ("reconcile-balances",): customers,
        ("sync-plans",): customers[:2],  # initech has no plan price
        ("verify",): customers,
        ("backfill", "--from", since, "--to", until, "--dry-run"): customers,
    }
    for command, names in named.items():
        output = piped(*command)
        assert all(f" {name} " in output for name in names), output

    report, data = piped("report"), json.loads(piped("report", "--format", "json"))
    for p in data["periods"]:
        row(report, p["customer"], p["stripe_target"], p["status"], p["measured"], p["reported"])
    for item in data["attention"]:
        row(report, item["job"], item["reason"], item["customer"], item["key"])
    status, data = piped("status"), json.loads(piped("status", "--format", "json"))
    for job in data["jobs"]:
        row(
            status,
            job["job"],
            job["schedule"],
            job["outcome"],
            ", ".join(f"{k} {v}" for k, v in job["counts"].items() if v),
        )


def free_port() -> int:
    """A port nobody listens on: bound by the system's choice, then let go."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DATABASE_COMMANDS = [
    ["db", "upgrade"],
    ["status"],
    ["sync-usage"],
    ["reconcile-balances"],
    ["read-back"],
    ["verify"],
    ["report"],
    ["backfill", "--from", "2026-01-01", "--to", "2026-02-01", "--yes"],
    ["balances", "resolve", "pi_x", "--applied"],
    ["run"],
]


def test_an_unreachable_database_fails_every_command_in_one_line_with_exit_2(sandbox, tmp_path):
    raw = sandbox.config_dict("", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}])
    raw["server"] = {"port": 0, "ops_port": 0}
    raw["logging"] = {"level": "INFO", "format": "json"}
    port = free_port()
    for url, expected in (
        (f"postgresql+psycopg://reconciler:db_pw_not_shown@127.0.0.1:{port}/ledger", f"127.0.0.1:{port}/ledger"),
        (f"sqlite:///{tmp_path / 'no-such-directory' / 'ledger.db'}", "no-such-directory/ledger.db"),
    ):
        raw["database"] = {"url": url}
        path = write_config(tmp_path / "config.yaml", raw)
        for command in DATABASE_COMMANDS:
            result = reconciler(*command, "--config", str(path), timeout=60)
            assert result.returncode == 2, (command, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: cannot reach the database"), (command, lines)
            assert expected in lines[0] and "db_pw_not_shown" not in lines[0], (command, lines)
            assert "***" in lines[0] or url.startswith("sqlite")
            assert not result.stdout, command


def test_at_debug_an_operational_error_comes_with_its_traceback(sandbox, tmp_path):
    raw = sandbox.config_dict(f"postgresql+psycopg://reconciler@127.0.0.1:{free_port()}/ledger")
    raw["logging"] = {"level": "DEBUG", "format": "json"}
    result = reconciler("status", "--config", str(write_config(tmp_path / "config.yaml", raw)))
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the database")


def test_a_second_sandbox_on_a_taken_port_fails_in_one_line_with_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = reconciler(
            "sandbox", "--stripe-port", str(port), "--openmeter-port", "0", "--moesif-port", "0", timeout=60
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: the fake Stripe API cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_the_sandbox_prints_every_variable_the_sample_config_needs_to_reach_it():
    """The README's local try-out exports what `reconciler sandbox` prints, then runs on config.yaml: every
    `${VAR}` config.yaml reads for Stripe, OpenMeter and Moesif with no default, or with the real API's address as
    its default, must be among them."""
    process = subprocess.Popen(
        command_line("sandbox", "--stripe-port", "0", "--openmeter-port", "0", "--moesif-port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in process.stdout], daemon=True).start()
        printed = [lines.get(timeout=PATIENCE_SECONDS)]
        with contextlib.suppress(queue.Empty):  # the sandbox prints its lines at once, then serves
            while True:
                printed.append(lines.get(timeout=5))
        exports = [line.removeprefix("export ").partition("=") for line in printed if line.startswith("export ")]
        exported = {name: value for name, _, value in exports}
        sample = (REPO_ROOT / "config.yaml").read_text()
        references = re.findall(r"\$\{((?:STRIPE|OPENMETER|MOESIF)_[A-Z_]+)(:-[^}]*)?\}", sample)
        needed = {name for name, default in references if not default or default[2:].startswith("https://")}
        assert {"STRIPE_API_BASE", "MOESIF_URL", "MOESIF_MANAGEMENT_TOKEN"} <= needed  # the pattern reads them
        assert needed <= set(exported), needed - set(exported)
    finally:
        process.terminate()
        process.communicate(timeout=30)
