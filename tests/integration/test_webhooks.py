"""The webhook fast path on a running service: signed events stored once, then acted on at once."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
import stripe
import yaml
from sqlalchemy import create_engine, text

from reconciler.clock import utc_now
from reconciler.webhooks.events import BALANCE_SYNC, METER_ERRORS, USAGE_SYNC, work_for_event
from reconciler_sandbox.server import SANDBOX_STRIPE_KEY
from reconciler_sandbox.stripe_fake import stripe_signature
from tests.integration.helpers import (
    PATIENCE_SECONDS,
    customer_with_usage,
    reconciler,
    wait_until,
    write_config,
)

SECRET = "whsec_test_reconciler"
THIN_SECRET = "whsec_test_thin_destination"


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
    first = httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers)
    assert first.status_code == 200 and first.json() == {"received": True, "duplicate": False}
    wait_until(lambda: len(sandbox.stripe.meter_events) == 2, what="the event's sync")
    assert [e.value for e in sandbox.stripe.meter_events] == [3, 4]

    replay = httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=signed(invoice_created)[1])
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    # A later event is worked off after anything the replay could have caused: wait for it, not for a while.
    later = event("invoice.created", {"id": "in_2", "object": "invoice", "customer": "cus_hook"})
    body, headers = signed(later)
    assert (
        httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers).json()["duplicate"] is False
    )
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
    url = daemon.webhook_url("/webhooks/stripe")
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
    assert httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    wait_until(lambda: sandbox.moesif.balance(subscription["id"]) == 12.34, what="the top-up in Moesif")
    assert daemon.stop() == 0


@pytest.fixture
def thin_config(webhook_config):
    raw = yaml.safe_load(webhook_config.read_text())
    raw["stripe"]["thin_webhook_secret"] = THIN_SECRET
    write_config(webhook_config, raw)
    return webhook_config


def signed_thin(body: dict, secret: str = THIN_SECRET) -> tuple[bytes, dict[str, str]]:
    """A thin event as its destination signs it (https://docs.stripe.com/webhooks#verify-manually)."""
    payload = json.dumps(body).encode()
    return payload, {"Stripe-Signature": stripe_signature(payload, secret, int(time.time()))}


def test_a_meter_event_stripe_rejects_later_is_shown_rejected(sandbox, thin_config, daemons):
    # Stripe reports meter events it rejects asynchronously only as thin events, to a thin-payload destination
    # signed with that destination's secret; their details come from GET /v2/core/events/{id}
    # (https://docs.stripe.com/api/v2/core/events/event-types, https://docs.stripe.com/event-destinations).
    customer_with_usage(sandbox, "cus_err", value=2)
    with sandbox.stripe.lock:  # the customer is gone by the time Stripe processes the event: accepted, then rejected
        del sandbox.stripe.customers["cus_err"]
    daemon = daemons(thin_config)
    daemon.wait_for("usage sync finished")
    [rejected] = sandbox.stripe.rejected_meter_events
    destination = sandbox.stripe.add_event_destination(daemon.webhook_url("/webhooks/stripe/thin"), THIN_SECRET)
    [pushed] = sandbox.stripe.flush_meter_error_reports()
    assert pushed["type"] == "v1.billing.meter.error_report_triggered" and "data" not in pushed
    assert destination.deliveries == [(pushed["id"], 200)]
    daemon.wait_for("Stripe rejected a meter event", identifier=rejected.identifier)
    body, headers = signed_thin(pushed)  # Stripe redelivers until it gets a 2xx: a repeat is no new work
    assert (
        httpx.post(daemon.webhook_url("/webhooks/stripe/thin"), content=body, headers=headers).json()["duplicate"]
        is True
    )
    assert daemon.stop() == 0
    status = reconciler("status", "--config", str(thin_config))
    assert "rejected by Stripe: meter_event_customer_not_found: No customer with id cus_err was found." in status.stdout


def test_no_meter_found_names_identifiers_the_ledger_may_not_know(sandbox, thin_config, daemons):
    # v1.billing.meter.no_meter_found: async usage events whose event_name matched no meter, a thin event with no
    # related object (https://docs.stripe.com/api/v2/core/events/event-types).
    daemon = daemons(thin_config)
    sandbox.stripe.add_event_destination(daemon.webhook_url("/webhooks/stripe/thin"), THIN_SECRET)
    client = stripe.StripeClient(SANDBOX_STRIPE_KEY, base_addresses={"api": sandbox.stripe_server.url})
    client.v1.billing.meter_events.create(  # another integration on the same account, sending to no meter
        params={"event_name": "retired_meter", "identifier": "not-ours-1", "payload": {"stripe_customer_id": "cus_x"}}
    )
    [pushed] = sandbox.stripe.flush_meter_error_reports()
    assert pushed["type"] == "v1.billing.meter.no_meter_found" and "related_object" not in pushed
    logged = daemon.wait_for("Stripe rejected a meter event the ledger does not know", identifier="not-ours-1")
    assert logged["code"] == "no_meter" and logged["known"] is False
    assert daemon.stop() == 0


def test_thin_events_need_their_own_path_and_secret(sandbox, thin_config, daemons):
    # Each event destination signs with its own secret (https://docs.stripe.com/event-destinations): a thin body
    # signed with the snapshot endpoint's secret is refused, and the snapshot endpoint takes no thin bodies.
    sandbox.stripe.add_meter("api_calls")
    thin = {
        "id": "evt_test_thin_1",
        "object": "v2.core.event",
        "type": "v1.billing.meter.no_meter_found",
        "created": "2026-01-01T00:00:00.000Z",
        "livemode": False,
    }
    daemon = daemons(thin_config)
    body, headers = signed_thin(thin, secret=SECRET)
    assert httpx.post(daemon.webhook_url("/webhooks/stripe/thin"), content=body, headers=headers).status_code == 400
    assert httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers).status_code == 400
    snapshot = signed_thin(event("invoice.created", {"customer": "cus_x"}), secret=THIN_SECRET)
    assert (
        httpx.post(daemon.webhook_url("/webhooks/stripe/thin"), content=snapshot[0], headers=snapshot[1]).status_code
        == 400
    )
    assert daemon.stop() == 0


def test_the_thin_endpoint_is_off_without_its_secret(sandbox, webhook_config, daemons):
    daemon = daemons(webhook_config)
    answer = httpx.post(daemon.webhook_url("/webhooks/stripe/thin"), content=b"{}")
    assert answer.status_code == 404 and "stripe.thin_webhook_secret" in answer.json()["error"]
    assert daemon.stop() == 0


def test_a_snapshot_shaped_meter_error_report_is_no_work():
    # Stripe never sends v1.billing.meter.error_report_triggered as a snapshot event
    # (https://docs.stripe.com/api/v2/core/events/event-types lists it among the thin events only).
    report = event("v1.billing.meter.error_report_triggered", {"object": "billing.meter_error_report"})
    assert work_for_event(report) is None
    thin = {"id": "evt_1", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered"}
    assert work_for_event(thin).kind == METER_ERRORS


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
    assert httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    wait_until(lambda: sandbox.app.users.get("u7") == {"plan": "pro", "status": "active"}, what="the plan")
    assert daemon.stop() == 0


def test_the_service_reads_back_and_resends_what_an_error_report_names_before_the_invoice_closes(
    sandbox, thin_config, daemons
):
    # A period that ended 35 minutes ago: final sync due (usage.grace_period 30m), invoice still open (1h).
    ended = utc_now().replace(microsecond=0) - timedelta(minutes=35)
    start = ended - timedelta(days=30)
    meter = sandbox.stripe.add_meter("api_calls", formula="sum")
    sandbox.stripe.add_customer(id="cus_rb")
    sandbox.stripe.add_subscription(
        "cus_rb",
        [sandbox.stripe.add_price(meter=meter["id"])["id"]],
        current_period_start=int(start.timestamp()),
        current_period_end=int(ended.timestamp()),
    )
    sandbox.openmeter.add_meter("api_requests")
    sandbox.openmeter.ingest("api_requests", "cus_rb", ended - timedelta(days=1), 6)
    sandbox.stripe.reject_asynchronously(1)  # the final event: accepted, then rejected
    raw = yaml.safe_load(thin_config.read_text())
    raw["stripe"]["summary_lag"] = "1s"
    raw["schedule"]["readback"] = "1s"
    write_config(thin_config, raw)

    daemon = daemons(thin_config)
    daemon.wait_for("usage sync finished")
    [rejected] = sandbox.stripe.rejected_meter_events
    sandbox.stripe.add_event_destination(daemon.webhook_url("/webhooks/stripe/thin"), THIN_SECRET)
    sandbox.stripe.flush_meter_error_reports()
    resending = daemon.wait_for("read back", finding="resending")
    assert (resending["customer"], resending["stripe"], resending["reported"]) == ("cus_rb", "0", 6)

    def billed() -> int:
        return sandbox.stripe.meter_total("cus_rb", "api_calls", int(start.timestamp()), int(ended.timestamp()))

    wait_until(lambda: billed() == 6, what="the resend billed")
    daemon.wait_for("read back", finding="ok", customer="cus_rb")  # read back once more, now agreeing
    assert daemon.stop() == 0
    identifiers = [e.identifier for e in sandbox.stripe.meter_events]
    assert len(identifiers) == 1 and identifiers[0] != rejected.identifier
    assert billed() == 6


def post_in_part(url: str, headers: dict[str, str], sent: bytes) -> tuple[int, dict]:
    """POST with `headers` (they may claim a body that never comes), send only `sent`, and read the answer: a server
    that waited for the whole body would never answer."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=PATIENCE_SECONDS)
    try:
        connection.putrequest("POST", address.path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(sent)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_over_the_limit_is_refused_before_it_is_read(sandbox, thin_config, daemons):
    daemon = daemons(thin_config)  # server.max_body_bytes: the default, 1 MiB
    for path in ("/webhooks/stripe", "/webhooks/stripe/thin"):
        claimed = {"Content-Type": "application/json", "Content-Length": str(200 * 1024 * 1024)}
        status, answer = post_in_part(daemon.webhook_url(path), claimed, b'{"id": "evt_')
        assert status == 413 and "server.max_body_bytes" in answer["error"]
    body, headers = signed(event("invoice.created", {"id": "in_1", "object": "invoice"}))
    assert httpx.post(daemon.webhook_url("/webhooks/stripe"), content=body, headers=headers).status_code == 200
    assert daemon.stop() == 0


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(sandbox, thin_config, daemons):
    raw = yaml.safe_load(thin_config.read_text())
    raw["server"]["max_body_bytes"] = 10_000
    write_config(thin_config, raw)
    daemon = daemons(thin_config)
    # No Content-Length: 10,001 bytes in chunks, and never the last chunk that would end the body.
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [b"x" * 1000] * 10 + [b"x"])
    for path in ("/webhooks/stripe", "/webhooks/stripe/thin"):
        status, answer = post_in_part(daemon.webhook_url(path), {"Transfer-Encoding": "chunked"}, chunks)
        assert status == 413 and "10000 bytes" in answer["error"]
    assert daemon.stop() == 0


def test_a_signed_body_that_is_not_an_event_is_a_400_with_a_reason(sandbox, thin_config, daemons):
    daemon = daemons(thin_config)
    valid = event("invoice.created", {"id": "in_1", "object": "invoice", "customer": "cus_x"})
    malformed = {
        "a JSON array": ([valid], "not a JSON event object"),
        "an object with no id": ({k: v for k, v in valid.items() if k != "id"}, "no event id"),
        "a string where an object belongs": ({**valid, "data": "x"}, "data.object is not an object"),
    }
    for what, (body, reason) in malformed.items():
        payload, headers = signed(body)
        answer = httpx.post(daemon.webhook_url("/webhooks/stripe"), content=payload, headers=headers)
        assert answer.status_code == 400, (what, answer.text)
        assert answer.json() == {"error": f"invalid payload: {reason}"}, what
    for body in ([{"id": "evt_1", "object": "v2.core.event"}], "evt_1", {"object": "v2.core.event", "id": 7}):
        payload, headers = signed_thin(body)
        answer = httpx.post(daemon.webhook_url("/webhooks/stripe/thin"), content=payload, headers=headers)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"].startswith("invalid payload: "), body
    assert daemon.stop() == 0
    daemon.wait_for("reconciler stopped")
    logged = json.dumps(daemon.events)
    assert "Traceback" not in logged and '"exception"' not in logged and "not stored" not in logged
