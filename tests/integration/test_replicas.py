"""Several `reconciler run` replicas on one PostgreSQL database, one of them killed mid-cycle."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.clock import utc_now
from tests.integration.helpers import PATIENCE_SECONDS, customer_with_usage, reconciler, wait_until, write_config

POSTGRES_URL = os.environ.get("RECONCILER_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url():
    if not POSTGRES_URL:
        pytest.skip("RECONCILER_TEST_POSTGRES_URL is not set: PostgreSQL replica tests skipped")
    schema = f"replicas_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.mark.parametrize("meter_events", ["v1", "v2_stream"])
def test_three_replicas_one_killed_mid_cycle_report_every_change_exactly_once(
    sandbox, postgres_url, tmp_path, daemons, meter_events
):
    raw = sandbox.config_dict(postgres_url, meters=[{"stripe": "api_calls", "openmeter": "api_requests"}])
    raw["stripe"]["meter_events"] = meter_events  # v2_stream: the killed replica's batch was in flight
    raw["balances"]["enabled"] = False
    raw["server"] = {"port": 0, "ops_port": 0, "shutdown_timeout": "20s"}
    raw["schedule"] = {"usage_sync": "2s"}
    raw["ledger"] = {"lease_ttl": "4s"}
    raw["logging"] = {"level": "INFO", "format": "json"}
    config = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(config)).returncode == 0

    customers = [f"cus_r{i:02d}" for i in range(24)]
    for i, customer in enumerate(customers):
        customer_with_usage(sandbox, customer, value=i + 1)
    killed = threading.Event()

    def held_until_the_kill(handle):
        def held(method, path, query, headers, body):
            response = handle(method, path, query, headers, body)
            if method == "POST" and len(sandbox.stripe.meter_events) >= 6:
                killed.wait(timeout=PATIENCE_SECONDS)  # the cycles are mid-way, reports in flight, when the kill lands
            return response

        return held

    sandbox.stripe.handle = held_until_the_kill(sandbox.stripe.handle)
    # The stream's own host: a batch Stripe applied is still unanswered when its replica dies.
    sandbox.stripe._handle_meter_events_host = held_until_the_kill(sandbox.stripe._handle_meter_events_host)
    replicas = [daemons(config) for _ in range(3)]
    for replica in replicas:
        replica.wait_for("reconciler running")
    replicas[0].wait_for("request budgets shared", replicas=3)  # each takes a third of every API's budget
    wait_until(lambda: len(sandbox.stripe.meter_events) >= 6, what="the first six reports")
    replicas[0].process.send_signal(signal.SIGKILL)  # no chance to hand anything back
    replicas[0].process.wait()
    killed.set()

    # More usage arrives while the survivors carry on: each change must reach Stripe exactly once.
    for customer in customers[::4]:
        sandbox.openmeter.ingest("api_requests", customer, utc_now() - timedelta(hours=2), 100)
    expected = {c: Decimal(i + 1 + (100 if i % 4 == 0 else 0)) for i, c in enumerate(customers)}

    def stripe_totals() -> dict[str, Decimal]:
        totals = {c: Decimal(0) for c in customers}
        for event in sandbox.stripe.meter_events:
            totals[event.customer] += event.value
        return totals

    wait_until(lambda: stripe_totals() == expected, what=f"Stripe's totals to reach {expected}")
    changes = {c: 2 if i % 4 == 0 else 1 for i, c in enumerate(customers)}
    events_per_customer = {c: sum(1 for e in sandbox.stripe.meter_events if e.customer == c) for c in customers}
    # One accepted event per change at most (a change that lands before the first report travels with it);
    # with sum meters, any event counted twice would also have broken the totals above.
    assert all(events_per_customer[c] <= changes[c] for c in customers), events_per_customer
    assert len({e.identifier for e in sandbox.stripe.meter_events}) == len(sandbox.stripe.meter_events)

    engine = create_engine(postgres_url)

    def count(sql: str) -> int:
        with engine.connect() as connection:
            return connection.execute(text(sql)).scalar()

    # Past the lease TTL a survivor's cycle takes over the dead replica's claims and settles its pending intents.
    held_by_the_dead = (
        "select count(*) from work_items w join replicas r on w.lease_owner = r.id "
        f"where w.state = 'claimed' and r.pid = {replicas[0].process.pid}"
    )
    pending_intents = "select count(*) from usage_reports where state = 'pending'"
    wait_until(
        lambda: count(held_by_the_dead) == count(pending_intents) == 0,
        what="the dead replica's claims taken over and its intents settled",
    )
    assert [replica.stop() for replica in replicas[1:]] == [0, 0]
    leftover = count("select count(*) from work_items where state = 'claimed'")
    pending = count(pending_intents)
    engine.dispose()
    # No lease is left behind: the dead replica's were taken over, the others' handed back on SIGTERM.
    assert (leftover, pending) == (0, 0)
