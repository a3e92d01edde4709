"""The webhook fast path on a running service: signed events stored once, then acted on at once."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import httpx
import pytest
import stripe
import yaml
from sqlalchemy import create_engine, text

from reconciler.clock import utc_now
from reconciler.webhooks.events import BALANCE_SYNC, USAGE_SYNC, work_for_event
from tests.integration.helpers import customer_with_usage, reconciler, wait_until, write_config

SECRET = "whsec_test_reconciler"


@pytest.fixture
def webhook_config(service_config):
    raw = yaml.safe_load(service_config.read_text())
    raw["stripe"]["webhook_secret"] = SECRET
    raw["schedule"]["usage_sync"] = "0 0 1 1 *"  # once a year: only webhooks can cause a second cycle
    write_config(service_config, raw)
    return service_config


def signed(event: dict, *, secret: str = SECRET, age: int = 0) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=int(time.time()) - age)
    return payload.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


def event(kind: str, obj: dict, **data) -> dict:
    return {
        "id": f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": kind,
        "api_version": "2026-10-28.endive",
        "created": int(time.time()),
        "data": {"object": obj, **data},
    }


def test_signed_invoice_created_triggers_an_immediate_sync_once_even_if_replayed(
    sandbox,
    webhook_config,
    daemons,
    tmp_path,
):
    customer_with_usage(sandbox, "cus_hook", value=3)
    daemon = daemons(webhook_config)
    daemon.wait_for("usage sync finished")
    assert [e.value for e in sandbox.stripe.meter_events] == [3]
    sandbox.openmeter.ingest("api_requests", "cus_hook", utc_now() - timedelta(days=1), 4)

    invoice_created = event("invoice.created", {"id": "in_1", "object": "invoice", "customer": "cus_hook"})
    body, headers = signed(invoice_created)
    first = httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=headers)
    assert first.status_code == 200 and first.json() == {"received": True, "duplicate": False}
    wait_until(lambda: len(sandbox.stripe.meter_events) == 2, what="the event's sync")
    assert [e.value for e in sandbox.stripe.meter_events] == [3, 4]

    replay = httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=signed(invoice_created)[1])
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    # A later event is worked off after anything the replay could have caused: wait for it, not for a while.
    later = event("invoice.created", {"id": "in_2", "object": "invoice", "customer": "cus_hook"})
    body, headers = signed(later)
    assert httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=headers).json()["duplicate"] is False
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")

    def webhook_states() -> list[str]:
        with engine.connect() as connection:
            return connection.execute(text("select state from webhook_events order by received_at")).scalars().all()

    wait_until(lambda: webhook_states() == ["done", "done"], what="both distinct events worked off")
    assert daemon.stop() == 0
    with engine.connect() as connection:
        cycles = connection.execute(text("select count(*) from runs where job = 'usage_sync'")).scalar()
    assert cycles == 3  # the startup cycle and one for each distinct event; the replay added no work


def test_bad_signature_stale_timestamp_and_bad_body_are_rejected(sandbox, webhook_config, daemons):
    daemon = daemons(webhook_config)
    url = daemon.url("/webhooks/stripe")
    body, headers = signed(event("invoice.created", {"customer": "cus_x"}), secret="whsec_wrong")
    assert httpx.post(url, content=body, headers=headers).status_code == 400
    body, headers = signed(event("invoice.created", {"customer": "cus_x"}), age=600)  # beyond the 300 s tolerance
    assert httpx.post(url, content=body, headers=headers).status_code == 400
    assert httpx.post(url, content=b"{}", headers={"Content-Type": "application/json"}).status_code == 400
    garbage = "not json"
    header = stripe.WebhookSignature.generate_signature_header(garbage, SECRET)
    assert httpx.post(url, content=garbage.encode(), headers={"Stripe-Signature": header}).status_code == 400
    assert daemon.stop() == 0


def test_payment_intent_succeeded_forwards_the_top_up_at_once(sandbox, webhook_config, daemons):
    customer_with_usage(sandbox, "cus_pay", value=0)
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_pay")
    sandbox.moesif.add_subscription(subscription["id"], "cus_pay")
    raw = yaml.safe_load(webhook_config.read_text())
    raw["balances"] = {"enabled": True, "stripe_source": "none", "topups": {"lookback": "7d"}}
    raw["schedule"]["balance_reconcile"] = "0 0 1 1 *"
    write_config(webhook_config, raw)
    daemon = daemons(webhook_config)
    daemon.wait_for("balance reconcile finished")
    intent = sandbox.stripe.add_payment_intent("cus_pay", 1234, id="pi_hook")
    body, headers = signed(event("payment_intent.succeeded", intent))
    assert httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    wait_until(lambda: sandbox.moesif.balance(subscription["id"]) == 12.34, what="the top-up in Moesif")
    assert daemon.stop() == 0


def test_a_meter_error_report_is_recorded_against_the_item(sandbox, webhook_config, daemons):
    customer_with_usage(sandbox, "cus_err", value=2)
    daemon = daemons(webhook_config)
    daemon.wait_for("usage sync finished")
    identifier = sandbox.stripe.meter_events[0].identifier
    report = {
        "object": "billing.meter_error_report",
        "reason": {
            "error_count": 1,
            "error_types": [
                {
                    "code": "meter_event_customer_not_found",
                    "error_count": 1,
                    "sample_errors": [{"error_message": "No customer cus_err", "request": {"identifier": identifier}}],
                }
            ],
        },
    }
    body, headers = signed(event("v1.billing.meter.error_report_triggered", report))
    assert httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    daemon.wait_for("Stripe rejected a meter event")
    assert daemon.stop() == 0
    status = reconciler("status", "--config", str(webhook_config))
    assert "rejected by Stripe: meter_event_customer_not_found: No customer cus_err" in status.stdout


def test_which_events_imply_work():
    metered = {"items": {"data": [{"price": {"recurring": {"usage_type": "metered"}}}]}, "customer": "cus_1"}
    licensed = {"items": {"data": [{"price": {"recurring": {"usage_type": "licensed"}}}]}, "customer": "cus_1"}
    new_period = {"previous_attributes": {"items": {}}}
    assert work_for_event(event("customer.subscription.updated", metered, **new_period)).kind == USAGE_SYNC
    assert work_for_event(event("customer.subscription.updated", metered, previous_attributes={"metadata": {}})) is None
    assert work_for_event(event("customer.subscription.updated", licensed, **new_period)) is None
    assert work_for_event(event("customer.subscription.deleted", metered)).customer_id == "cus_1"
    assert work_for_event(event("payment_intent.succeeded", {"customer": "cus_2"})).kind == BALANCE_SYNC
    assert work_for_event(event("charge.refunded", {"customer": "cus_2"})) is None


def test_a_subscription_webhook_syncs_the_users_plan_at_once(sandbox, webhook_config, daemons):
    raw = yaml.safe_load(webhook_config.read_text())
    raw["plans"] = sandbox.config_dict("sqlite://", plans=True)["plans"]
    raw["schedule"]["plan_sync"] = "0 0 1 1 *"
    write_config(webhook_config, raw)
    sandbox.stripe.add_customer(id="cus_plan")
    for price in ("price_sandbox_starter", "price_sandbox_pro"):
        sandbox.stripe.add_price(id=price, usage_type="licensed")
    now = int(time.time())
    subscription = sandbox.stripe.add_subscription(
        "cus_plan",
        ["price_sandbox_starter"],
        metadata={"user_id": "u7"},
        current_period_start=now - 60,
        current_period_end=now + 86400,
    )
    daemon = daemons(webhook_config)
    daemon.wait_for("plan sync finished")
    assert sandbox.app.users == {"u7": {"plan": "starter", "status": "active"}}
    item = subscription["items"]["data"][0]["id"]
    sandbox.stripe.set_item_price(item, "price_sandbox_pro")  # the upgrade, then its webhook
    body, headers = signed(
        event(
            "customer.subscription.updated", {**subscription, "customer": "cus_plan"}, previous_attributes={"items": {}}
        )
    )
    assert httpx.post(daemon.url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    wait_until(lambda: sandbox.app.users.get("u7") == {"plan": "pro", "status": "active"}, what="the plan")
    assert daemon.stop() == 0
