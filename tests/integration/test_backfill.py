"""`backfill`: past periods re-driven through the same rules and ledger, resumable, never sent twice."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from datetime import timedelta
from decimal import Decimal

from freezegun import freeze_time

from reconciler.clock import utc_now
from reconciler.ledger.backfill_checkpoints import Checkpoints
from reconciler.usage.backfill import Backfill, command_key
from tests.conftest import ts, utc
from tests.integration.helpers import (
    PATIENCE_SECONDS,
    command_env,
    command_line,
    customer_with_usage,
    reconciler,
    wait_until,
    write_config,
)

DEC, JAN, FEB, MAR, APR = utc(2025, 12, 1), utc(2026, 1, 1), utc(2026, 2, 1), utc(2026, 3, 1), utc(2026, 4, 1)


def backfill(h, *, dry_run: bool = False):
    runner = Backfill(h.sync, Checkpoints(h.engine, utc_now), h.runs)
    units = runner.plan(DEC, MAR, frozenset(), frozenset())
    return runner.run(units, command_key(DEC, MAR, frozenset(), frozenset()), dry_run=dry_run)


def month_total(h, start, end) -> Decimal:
    return h.stripe.meter_total("cus_A", "api_calls", ts(start), ts(end))


def test_three_periods_with_late_usage_one_reachable_correction_two_listed_out_of_reach(harness):
    h = harness
    h.stripe.add_customer(id="cus_A")
    meter = h.stripe.add_meter("api_calls", formula="sum")
    price = h.stripe.add_price(meter=meter["id"], unit_amount=25)
    h.openmeter.add_meter("api_requests")
    subscription = h.stripe.add_subscription(
        "cus_A", [price["id"]], current_period_start=ts(DEC), current_period_end=ts(JAN), created=ts(DEC)
    )
    item = subscription["items"]["data"][0]["id"]
    with freeze_time(utc(2025, 12, 20)) as clock:
        for start, end, when in (
            (DEC, JAN, utc(2025, 12, 20)),
            (JAN, FEB, utc(2026, 1, 20)),
            (FEB, MAR, utc(2026, 2, 20)),
        ):
            clock.move_to(when)
            h.stripe.set_item_period(item, ts(start), ts(end))
            h.openmeter.ingest("api_requests", "cus_A", start + timedelta(days=2), 10)
            h.cycle()
        clock.move_to(MAR + timedelta(minutes=10))  # February ended ten minutes ago: its invoice is still open
        h.stripe.set_item_period(item, ts(MAR), ts(APR))
        for start in (DEC, JAN, FEB):  # a late batch lands in each period
            h.openmeter.ingest("api_requests", "cus_A", start + timedelta(days=9), 3)

        dry = backfill(h, dry_run=True)
        assert [(line.period_start[:10], line.action) for line in dry.lines] == [
            ("2025-12-01", "out_of_reach"),
            ("2026-01-01", "out_of_reach"),
            ("2026-02-01", "would_report"),
        ]
        assert len(h.stripe.meter_events) == 3  # the dry run sent nothing

        first = backfill(h)
        second = backfill(h)
    actions = [(line.period_start[:10], line.action, line.quantity, line.amount) for line in first.lines]
    assert actions == [
        ("2025-12-01", "out_of_reach", 3, "0.75"),
        ("2026-01-01", "out_of_reach", 3, "0.75"),
        ("2026-02-01", "report", 3, None),
    ]
    assert "after the period was final" in first.lines[0].reason
    assert [line.action for line in second.lines] == ["out_of_reach", "out_of_reach", "unchanged"]
    assert (month_total(h, DEC, JAN), month_total(h, JAN, FEB), month_total(h, FEB, MAR)) == (10, 10, 13)
    assert len(h.stripe.meter_events) == 4  # one correction, into February only


def test_a_killed_backfill_resumes_from_its_checkpoint_and_reports_nothing_twice(sandbox, tmp_path):
    raw = sandbox.config_dict(
        f"sqlite:///{tmp_path / 'ledger.db'}", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}]
    )
    raw["balances"]["enabled"] = False
    raw["logging"] = {"level": "INFO", "format": "json"}
    config = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(config)).returncode == 0
    customers = [f"cus_k{i}" for i in range(8)]
    for i, customer in enumerate(customers):
        customer_with_usage(sandbox, customer, value=i + 1)
    original = sandbox.stripe.handle
    killed = threading.Event()

    def held_until_the_kill(method, path, query, headers, body):
        response = original(method, path, query, headers, body)
        if method == "POST" and len(sandbox.stripe.meter_events) >= 3:
            killed.wait(timeout=PATIENCE_SECONDS)  # the kill lands with the backfill part way through
        return response

    sandbox.stripe.handle = held_until_the_kill
    since, until = (utc_now() - timedelta(days=10)).date().isoformat(), (utc_now() + timedelta(days=1)).isoformat()
    args = command_line(
        "backfill",
        "--from",
        since,
        "--to",
        until,
        "--yes",
        "--format",
        "json",
        "--config",
        str(config),
    )
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=command_env())
    wait_until(lambda: len(sandbox.stripe.meter_events) >= 3, what="three reports")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed.set()
    sent_before = len(sandbox.stripe.meter_events)
    assert 3 <= sent_before < len(customers)

    second = subprocess.run(args, capture_output=True, text=True, env=command_env(), timeout=PATIENCE_SECONDS)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["resumed_from"] >= sent_before - 1  # the checkpoint: where the killed run stopped
    assert f"resumed backfill run: {result['resumed_from']} of {len(customers)}" in second.stderr
    per_customer = {c: [e.value for e in sandbox.stripe.meter_events if e.customer == c] for c in customers}
    assert per_customer == {c: [Decimal(i + 1)] for i, c in enumerate(customers)}  # each exactly once


def test_the_progress_bar_shows_on_a_terminal_and_not_in_a_pipe(sandbox, tmp_path):
    raw = sandbox.config_dict(
        f"sqlite:///{tmp_path / 'ledger.db'}", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}]
    )
    raw["balances"]["enabled"] = False
    config = write_config(tmp_path / "config.yaml", raw)
    reconciler("db", "upgrade", "--config", str(config))
    customer_with_usage(sandbox, "cus_bar", value=2)
    since = (utc_now() - timedelta(days=10)).date().isoformat()
    until = (utc_now() + timedelta(days=1)).isoformat()
    argv = command_line("backfill", "--from", since, "--to", until, "--dry-run", "--config", str(config))
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=PATIENCE_SECONDS, env=command_env())
    assert piped.returncode == 0, piped.stderr
    assert "1/1" not in piped.stdout and "backfill progress" in piped.stderr  # plain log lines instead
    on_terminal = subprocess.run(
        ["script", "-qec", " ".join(argv), "/dev/null"],
        capture_output=True,
        text=True,
        timeout=PATIENCE_SECONDS,
        env=command_env({"COLUMNS": "120"}),
    )
    assert on_terminal.returncode == 0, on_terminal.stdout
    assert "1/1" in on_terminal.stdout and "backfill progress" not in on_terminal.stdout  # the bar: done/total
