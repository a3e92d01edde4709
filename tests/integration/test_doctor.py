"""`reconciler doctor`: a read-only preflight, driven as an operator runs it against the sandbox, which serves
the webhook endpoints and event destinations as Stripe documents them."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from sqlalchemy import create_engine, make_url, text

from reconciler.clock import utc_now
from reconciler.webhooks.events import THIN_METER_ERROR_EVENTS, snapshot_events_needed
from reconciler_sandbox.seed import seed_sandbox
from tests.integration.helpers import reconciler, write_config

PUBLIC_URL = "https://billing.example.com"
POSTGRES_URL = os.environ.get("RECONCILER_TEST_POSTGRES_URL")


@pytest.fixture
def prepared(sandbox, tmp_path):
    """The seeded sandbox with the webhook endpoint and the thin event destination a new user creates, and a
    migrated ledger: everything doctor checks is in order."""
    seed_sandbox(sandbox.stripe, sandbox.openmeter, sandbox.moesif, utc_now())
    events = snapshot_events_needed(balances=True, plans=False)
    sandbox.stripe.add_webhook_endpoint(f"{PUBLIC_URL}/webhooks/stripe", sorted(events))
    sandbox.stripe.add_event_destination(f"{PUBLIC_URL}/webhooks/stripe/thin", "whsec_thin", THIN_METER_ERROR_EVENTS)
    raw = sandbox.config_dict(f"sqlite:///{tmp_path / 'ledger.db'}")
    raw["stripe"] |= {"webhook_secret": "whsec_snapshot", "thin_webhook_secret": "whsec_thin"}
    raw["server"] = {"public_url": PUBLIC_URL, "port": 0, "ops_port": 0}
    config = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(config)).returncode == 0
    sandbox.stripe.requests.clear()
    return config, raw


def doctor_json(config) -> tuple[int, dict[str, dict]]:
    run = reconciler("doctor", "--format", "json", "--config", str(config))
    data = json.loads(run.stdout)
    assert data["healthy"] == (run.returncode == 0), run.stdout
    return run.returncode, {c["name"]: c for c in data["checks"]}


def test_a_sandbox_set_up_as_documented_passes_every_check_reading_only(sandbox, prepared):
    config, _ = prepared
    run = reconciler("doctor", "--config", str(config))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "ready"
    checks = lines[:-1]
    assert all(line.startswith(("ok ", "warn ")) for line in checks), run.stdout
    for name in (
        "database",
        "stripe key",
        "stripe api",
        "grace periods",
        "stripe target api_calls",
        "stripe target storage_gb",
        "stripe target price_legacy_sms",
        "unmapped metered prices",
        "stripe webhook endpoint",
        "stripe thin event destination",
        "moesif",
        "openmeter api",
        "openmeter meter api_requests",
    ):
        assert any(line.split(maxsplit=1)[1].startswith(name) for line in checks), f"no {name!r} line:\n{run.stdout}"
    assert not [line for line in checks if line.startswith("warn ")], run.stdout
    # Read-only: not one write to Stripe (or any side effect the fakes would record).
    assert {r.method for r in sandbox.stripe.requests} == {"GET"}
    assert {r.method for r in sandbox.moesif.requests} <= {"GET"}
    # The legacy price was read under the legacy API version, which proves that version is accepted.
    legacy = [r for r in sandbox.stripe.requests if r.path == "/v1/prices/price_legacy_sms"]
    assert legacy and legacy[0].headers["stripe-version"] == "2025-02-24.acacia"


def test_every_problem_is_named_with_what_to_do_and_exits_1(sandbox, prepared, tmp_path):
    config, raw = prepared
    api_calls = next(m for m in sandbox.stripe.meters.values() if m["event_name"] == "api_calls")
    api_calls["status"] = "inactive"
    tickets = next(m for m in sandbox.stripe.meters.values() if m["event_name"] == "support_tickets")
    sandbox.stripe.add_customer(id="cus_tickets")
    now = int(utc_now().timestamp())
    sandbox.stripe.add_subscription(
        "cus_tickets",
        [sandbox.stripe.add_price(meter=tickets["id"])["id"]],
        current_period_start=now - 86400,
        current_period_end=now + 29 * 86400,
    )
    endpoint = next(iter(sandbox.stripe.webhook_endpoints.values()))
    endpoint["enabled_events"].remove("invoice.created")
    sandbox.stripe.event_destinations[0].enabled = False
    raw["database"]["url"] = f"sqlite:///{tmp_path / 'new.db'}"
    raw["moesif"]["management_token"] = "wrong_token"
    raw["usage"]["meters"].append({"stripe": "api_calls_typo", "openmeter": "no_such_meter"})
    write_config(config, raw)

    code, checks = doctor_json(config)

    assert code == 1
    expected = {
        "database": ("has no reconciler tables", "reconciler db upgrade"),
        "stripe target api_calls": ("is inactive", "active"),
        "stripe target api_calls_typo": ("no Stripe meter has event_name 'api_calls_typo'", "usage.meters"),
        "unmapped metered prices": ("support_tickets (1 item)", "usage.meters"),
        "stripe webhook endpoint": ("does not subscribe to ['invoice.created']", "add those events"),
        "stripe thin event destination": ("is disabled", "enable it"),
        "moesif": ("Moesif refused the token", "MOESIF_MANAGEMENT_TOKEN"),
        "openmeter meter no_such_meter": ("no meter with this slug", "usage.meters[].openmeter"),
    }
    for name, (detail, fix) in expected.items():
        assert checks[name]["outcome"] == "fail", checks[name]
        assert detail in checks[name]["detail"], checks[name]
        assert fix in checks[name]["fix"], checks[name]
    # What is in order is still checked and says so.
    assert checks["stripe target storage_gb"]["outcome"] == "ok"
    assert checks["openmeter meter api_requests"]["outcome"] == "ok"


def test_a_rejected_key_fails_stripe_in_one_line_and_the_rest_is_still_checked(sandbox, prepared):
    config, raw = prepared
    raw["stripe"]["api_key"] = "sk_test_not_the_sandbox_key"
    write_config(config, raw)
    code, checks = doctor_json(config)
    assert code == 1
    assert checks["stripe api"]["outcome"] == "fail"
    assert "STRIPE_API_KEY" in checks["stripe api"]["fix"]
    assert "sk_test_not_the_sandbox_key" not in json.dumps(checks)  # never echoed
    assert not any(name.startswith("stripe target") for name in checks)  # one line, not one per mapping
    assert checks["database"]["outcome"] == "ok"
    assert checks["openmeter api"]["outcome"] == "ok"


def test_endpoints_that_post_elsewhere_are_not_taken_for_ours(sandbox, prepared):
    config, raw = prepared
    raw["server"]["public_url"] = "https://other.example.com"
    write_config(config, raw)
    code, checks = doctor_json(config)
    assert code == 1
    assert (
        "no webhook endpoint posts to https://other.example.com/webhooks/stripe"
        in (checks["stripe webhook endpoint"]["detail"])
    )
    assert "https://other.example.com/webhooks/stripe/thin" in checks["stripe thin event destination"]["detail"]


@pytest.mark.postgres
def test_on_postgresql_replicas_that_would_outgrow_max_connections_are_warned(sandbox, prepared, tmp_path):
    if not POSTGRES_URL:
        pytest.skip("RECONCILER_TEST_POSTGRES_URL is not set")
    _, raw = prepared
    schema = f"doctor_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        allowed = connection.execute(text("SHOW max_connections")).scalar_one()
    try:
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        raw["database"] = {"url": url.render_as_string(hide_password=False)}
        config = write_config(tmp_path / "pg.yaml", raw)
        assert reconciler("db", "upgrade", "--config", str(config)).returncode == 0
        _, checks = doctor_json(config)
        assert checks["database connections"]["outcome"] == "ok"

        if int(allowed) > 120:
            pytest.skip(f"max_connections is {allowed}: more than one replica's 128 workers at most can outgrow")
        raw["stripe"]["max_concurrency"] = int(allowed)  # one replica's workers alone would take every connection
        _, checks = doctor_json(write_config(tmp_path / "pg.yaml", raw))
        crowded = checks["database connections"]
        assert crowded["outcome"] == "warn" and "stripe.max_concurrency" in crowded["fix"], crowded
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
