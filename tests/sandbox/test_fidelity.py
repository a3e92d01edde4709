"""The sandbox's contract with the providers' documentation: every Stripe, OpenMeter and Moesif behaviour the
product relies on, one test each, run against the sandbox fakes over loopback HTTP with the real SDKs and HTTP
clients (stripe-python, the openmeter SDK, httpx).

Each test's docstring gives the provider documentation URL it follows. Where the documentation is silent, the
docstring says so and names the pessimistic behaviour the fake chose (the answer worse for the client), so that the
product is tested against the harder case.

When a provider's documentation changes, this file changes first, then the fake. A sandbox behaviour with no test
here is a guess.

Plumbing (parameter parsing, authentication, fault injection mechanics, reset, concurrency) stays in the per-fake
modules, test_stripe_fake.py, test_stripe_fake_payments.py, test_openmeter_fake.py and test_moesif_fake.py, whose
helpers this module borrows.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import openmeter
import pytest
import stripe
from corehttp.exceptions import HttpResponseError

from reconciler_sandbox.httpserver import DROP_CONNECTION, LoopbackServer
from reconciler_sandbox.moesif_fake import FakeMoesif
from reconciler_sandbox.openmeter_fake import FakeOpenMeter
from reconciler_sandbox.stripe_fake import FakeStripe
from tests.sandbox.conftest import NOW, Clock, openmeter_sdk, stripe_sdk
from tests.sandbox.test_moesif_fake import TXN_PATH, _balance, _txn
from tests.sandbox.test_openmeter_fake import T0, _raw
from tests.sandbox.test_stripe_fake import (
    LEGACY,
    PERIOD_END,
    PERIOD_START,
    _legacy_item,
    _meter_event,
    _seed_subscriptions,
    _usage,
)

DAY = 86400


# -- the three fakes, each served on its own loopback port --------------------------------------------------------


@pytest.fixture
def stripe_fake(clock: Clock) -> FakeStripe:
    return FakeStripe(clock=clock)


@pytest.fixture
def stripe_server(stripe_fake: FakeStripe) -> Iterator[LoopbackServer]:
    with LoopbackServer(stripe_fake) as srv:
        yield srv


@pytest.fixture
def stripe_client(stripe_server: LoopbackServer) -> Iterator[stripe.StripeClient]:
    with stripe_sdk(stripe_server.url) as client:
        yield client


@pytest.fixture
def openmeter_fake() -> FakeOpenMeter:
    return FakeOpenMeter()


@pytest.fixture
def openmeter_server(openmeter_fake: FakeOpenMeter) -> Iterator[LoopbackServer]:
    with LoopbackServer(openmeter_fake) as srv:
        yield srv


@pytest.fixture
def openmeter_client(openmeter_server: LoopbackServer) -> Iterator[openmeter.Client]:
    with openmeter_sdk(openmeter_server.url) as c:
        yield c


# -- Stripe: idempotency (https://docs.stripe.com/api/idempotent_requests) ----------------------------------------


def test_idempotent_replay_and_mismatch(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/idempotent_requests: a retry with the same key returns the saved
    status code and body and performs nothing again; "the idempotency layer compares incoming parameters to those of
    the original request and errors if they're not the same" (stripe-python raises IdempotencyError). The docs are
    silent on how a replay is marked; the sandbox sends `Idempotent-Replayed: true` as Stripe does."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    first = _meter_event(stripe_client, "cus_1", "3", identifier="e1", idempotency_key="k1")
    again = _meter_event(stripe_client, "cus_1", "3", identifier="e1", idempotency_key="k1")
    assert again.to_dict() == first.to_dict()
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert len(stripe_fake.meter_events) == 1
    with pytest.raises(stripe.IdempotencyError):
        _meter_event(stripe_client, "cus_1", "4", identifier="e1", idempotency_key="k1")
    assert len(stripe_fake.meter_events) == 1


def test_lost_response_then_idempotent_retry(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/idempotent_requests: "if a connection error
    occurs, you can safely repeat the request without risk of creating a second object" - the retry with the key gets
    the saved 200 of the request that was applied; https://docs.stripe.com/api/billing/meter-event/create: a retry
    without the key is caught by the identifier instead."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    stripe_fake.inject_fault("POST", "/v1/billing/meter_events", DROP_CONNECTION, after_apply=True)
    with pytest.raises(stripe.APIConnectionError):
        _meter_event(stripe_client, "cus_1", "1", identifier="lost", idempotency_key="k-lost")
    assert len(stripe_fake.meter_events) == 1  # applied although the client got no answer
    retry = _meter_event(stripe_client, "cus_1", "1", identifier="lost", idempotency_key="k-lost")
    assert retry.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(stripe_fake.meter_events) == 1
    # A retry without the key hits the identifier check instead.
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(stripe_client, "cus_1", "1", identifier="lost")
    assert exc.value.user_message == "An event already exists with identifier lost."


@pytest.mark.parametrize("applied", [False, True], ids=["before-apply", "after-apply"])
def test_a_5xx_is_saved_to_its_idempotency_key_and_replayed(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, applied: bool
):
    """https://docs.stripe.com/api/idempotent_requests: "Stripe saves the status code and body of the first request
    made with a given idempotency key after endpoint execution begins. Retries with the same key return the saved
    response, including 500 errors." Only a fresh key gets past it."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    stripe_fake.inject_fault("POST", "/v1/billing/meter_events", 500, after_apply=applied)
    with pytest.raises(stripe.APIError) as first:
        _meter_event(stripe_client, "cus_1", "1", identifier="e5", idempotency_key="k5")
    with pytest.raises(stripe.APIError) as retry:
        _meter_event(stripe_client, "cus_1", "1", identifier="e5", idempotency_key="k5")
    assert retry.value.http_status == 500
    assert retry.value.headers["Idempotent-Replayed"] == "true"
    assert retry.value.headers["Original-Request"] == first.value.request_id
    assert len(stripe_fake.meter_events) == int(applied)  # the replay applied nothing
    if applied:
        with pytest.raises(stripe.InvalidRequestError) as duplicate:
            _meter_event(stripe_client, "cus_1", "1", identifier="e5", idempotency_key="k5-1")
        # the identifier still deduplicates the event
        assert duplicate.value.user_message == "An event already exists with identifier e5."
    else:
        assert _meter_event(stripe_client, "cus_1", "1", identifier="e5", idempotency_key="k5-1").identifier == "e5"
    assert len(stripe_fake.meter_events) == 1


def test_a_5xx_does_not_replace_the_answer_a_key_already_holds(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/idempotent_requests:
    Stripe saves the answer of the *first* request made with a key; an error on a later retry (a 5xx from the edge,
    before the endpoint) replaces nothing and the key still replays the first answer. The docs do not describe the
    later 5xx; the sandbox answers it unsaved, the client having to retry."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    first = _meter_event(stripe_client, "cus_1", "1", identifier="e6", idempotency_key="k6")
    stripe_fake.inject_fault("POST", "/v1/billing/meter_events", 503)
    with pytest.raises(stripe.APIError):
        _meter_event(stripe_client, "cus_1", "1", identifier="e6", idempotency_key="k6")
    again = _meter_event(stripe_client, "cus_1", "1", identifier="e6", idempotency_key="k6")
    assert again.to_dict() == first.to_dict() and again.last_response.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("status", "delay_seconds", "error"),
    [
        (DROP_CONNECTION, 0.0, stripe.APIConnectionError),
        (429, 0.0, stripe.RateLimitError),
        (504, 1.0, stripe.APIConnectionError),  # held back past the client's timeout, never applied
    ],
    ids=["dropped-connection", "rate-limited", "timeout-before-execution"],
)
def test_an_answer_from_before_the_endpoint_is_not_saved_to_the_key(
    stripe_server: LoopbackServer, stripe_fake: FakeStripe, status: int, delay_seconds: float, error: type[Exception]
):
    """https://docs.stripe.com/api/idempotent_requests saves results "only after the execution of an endpoint
    begins": a request that never reached it can be retried with the same key."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    stripe_fake.inject_fault("POST", "/v1/billing/meter_events", status, delay_seconds=delay_seconds)
    http = stripe.RequestsClient(timeout=0.3)
    stripe_client = stripe.StripeClient(
        "sk_test_sandbox", base_addresses={"api": stripe_server.url}, max_network_retries=0, http_client=http
    )
    try:
        with pytest.raises(error):
            _meter_event(stripe_client, "cus_1", "1", identifier="e7", idempotency_key="k7")
        retry = _meter_event(stripe_client, "cus_1", "1", identifier="e7", idempotency_key="k7")
    finally:
        http.close()
    assert retry.last_response.headers.get("Idempotent-Replayed") is None
    assert len(stripe_fake.meter_events) == 1


# -- Stripe: meter events (https://docs.stripe.com/api/billing/meter-event/create) ---------------------------------


def test_duplicate_identifier_is_refused_as_stripe_refuses_it(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/billing/meter-event/create: "We will enforce uniqueness within a rolling period of
    at least 24 hours." The docs do not give the refusal; this is Stripe's as seen in the wild
    (shared/api-notes.md): a 400 invalid_request_error naming the identifier, without a `code`."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    original = _meter_event(stripe_client, "cus_1", "3", identifier="dup")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(stripe_client, "cus_1", "9", identifier="dup")
    assert exc.value.http_status == 400
    assert exc.value.error is not None and exc.value.error.type == "invalid_request_error"
    assert exc.value.code is None
    assert exc.value.user_message == "An event already exists with identifier dup."
    assert [e.value for e in stripe_fake.meter_events] == [Decimal(3)]  # the event Stripe holds keeps its own quantity
    stripe_fake.duplicate_identifier_response = "ignore"
    ignored = _meter_event(stripe_client, "cus_1", "9", identifier="dup")
    assert ignored.payload["value"] == "3" and ignored.created == original.created
    assert [e.value for e in stripe_fake.meter_events] == [Decimal(3)]


def test_duplicate_identifier_window_is_24h(stripe_server: LoopbackServer, stripe_fake: FakeStripe, stripe_client):
    """https://docs.stripe.com/api/billing/meter-event/create: "We will enforce
    uniqueness within a rolling period of at least 24 hours." "At least": the sandbox forgets an identifier after
    exactly 24 hours, the shortest window the docs allow, so a client cannot count on a longer one."""
    now = [NOW]
    stripe_fake.clock = lambda: now[0]
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    _meter_event(stripe_client, "cus_1", "1", identifier="same")
    now[0] += 24 * 3600 + 1
    _meter_event(stripe_client, "cus_1", "1", identifier="same")
    assert len(stripe_fake.meter_events) == 2


def test_meter_event_timestamp_limits(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/billing/meter-event/create: the timestamp "must be
    within the past 35 calendar days or up to 5 minutes in the future". The codes (timestamp_too_far_in_past,
    timestamp_in_future) are Stripe's error codes (https://docs.stripe.com/error-codes); the docs do not say whether
    the bound itself is in or out, the sandbox takes 35 days less a second and 5 minutes less a second as the last
    accepted instants tested here."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(stripe_client, "cus_1", "1", timestamp=NOW - 36 * 86400)
    assert exc.value.code == "timestamp_too_far_in_past"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(stripe_client, "cus_1", "1", timestamp=NOW + 301)
    assert exc.value.code == "timestamp_in_future"
    _meter_event(stripe_client, "cus_1", "1", timestamp=NOW - 34 * 86400)
    _meter_event(stripe_client, "cus_1", "1", timestamp=NOW + 299)
    assert len(stripe_fake.meter_events) == 2


def test_meter_event_validation(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/billing/meter-event/create: the payload must hold the
    meter's customer_mapping.event_payload_key (stripe_customer_id) and value_settings.event_payload_key (value);
    identifier "Max length: 100". The docs do not say a non-numeric value is refused at once rather than reported
    later; the sandbox refuses it with a 400 (nothing stored), the answer a client must handle either way."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meter_events.create(params={"event_name": "api_calls", "payload": {"value": "1"}})
    assert exc.value.param == "payload[stripe_customer_id]"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meter_events.create(
            params={"event_name": "api_calls", "payload": {"stripe_customer_id": "cus_1"}}
        )
    assert exc.value.param == "payload[value]"
    with pytest.raises(stripe.InvalidRequestError):
        _meter_event(stripe_client, "cus_1", "ten")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(stripe_client, "cus_1", "1", identifier="x" * 101)
    assert exc.value.param == "identifier"
    assert stripe_fake.meter_events == []


def test_meter_event_payload_values_are_strings_and_event_name_is_at_most_100(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/billing/meter-event/create: event_name "Max length: 100"; the payload is a map of
    strings (the SDKs type it `{[key: string]: string}`). The docs do not give the refusal of a nested object; the
    sandbox refuses it with a 400 naming the key, before anything is stored."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meter_events.create(
            params={"event_name": "api_calls", "payload": {"stripe_customer_id": "cus_1", "value": {"n": "1"}}}  # type: ignore[dict-item]
        )
    assert exc.value.http_status == 400 and exc.value.param == "payload[value]"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meter_events.create(
            params={"event_name": "x" * 101, "payload": {"stripe_customer_id": "cus_1", "value": "1"}}
        )
    assert exc.value.param == "event_name"
    assert stripe_fake.meter_events == [] and stripe_fake.rejected_meter_events == []
    event = stripe_client.v1.billing.meter_events.create(
        params={
            "event_name": "api_calls",
            "identifier": "i" * 100,
            "payload": {"stripe_customer_id": "cus_1", "value": "1"},
        }
    )
    assert event.identifier == "i" * 100 and len(stripe_fake.meter_events) == 1


# -- Stripe: meter errors, reported asynchronously as thin events ----------------------------------------------------


def test_unknown_meter_or_customer_is_accepted_but_rejected(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api:
    meter events are validated asynchronously - an event naming no active meter or an unknown customer is accepted
    (200) and later reported as a meter error (no_meter / meter_event_customer_not_found), never billed."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    stripe_client.v1.billing.meter_events.create(
        params={"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_1", "value": "1"}}
    )
    _meter_event(stripe_client, "cus_ghost", "1")
    assert stripe_fake.meter_events == []
    assert [e.reason for e in stripe_fake.rejected_meter_events] == ["no_meter", "meter_event_customer_not_found"]


@pytest.fixture
def thin_receiver() -> Iterator[tuple[str, list[tuple[bytes, str]]]]:
    """A local webhook endpoint recording each (body, Stripe-Signature) it is sent."""
    received: list[tuple[bytes, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.rfile.read(int(self.headers["Content-Length"])), self.headers["Stripe-Signature"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/webhooks/stripe/thin", received
    httpd.shutdown()
    httpd.server_close()


def test_async_rejections_become_thin_meter_error_events(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, thin_receiver
):
    """https://docs.stripe.com/api/v2/core/events/event-types: both meter error events are thin events; the pushed
    body has no `data` (https://docs.stripe.com/event-destinations#thin-events), GET /v2/core/events/{id} returns
    it with `data` (https://docs.stripe.com/api/v2/core/events/object), signed per destination."""
    url, received = thin_receiver
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    stripe_fake.add_event_destination(url, "whsec_thin")
    _meter_event(stripe_client, "cus_ghost", "1", identifier="idem-ghost")
    stripe_client.v1.billing.meter_events.create(
        params={"event_name": "no_such_meter", "identifier": "idem-nometer", "payload": {"stripe_customer_id": "cus_1"}}
    )
    assert (
        stripe_fake.flush_meter_error_reports() != [] and stripe_fake.flush_meter_error_reports() == []
    )  # each reported once

    pushed = {json.loads(body)["type"]: (body, signature) for body, signature in received}
    assert set(pushed) == {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}
    body, signature = pushed["v1.billing.meter.error_report_triggered"]
    thin = json.loads(body)
    assert "data" not in thin
    assert thin["object"] == "v2.core.event" and thin["livemode"] is False and thin["created"].endswith("Z")
    assert thin["related_object"] == {
        "id": meter["id"],
        "type": "billing.meter",
        "url": f"/v1/billing/meters/{meter['id']}",
    }
    # The SDK accepts the signature (signed at the fake's clock, NOW: the age check is the receiver's, off here).
    assert signature.startswith(f"t={NOW},v1=")
    notification = stripe_client.parse_event_notification(body, signature, "whsec_thin", tolerance=0)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe_client.parse_event_notification(body, signature, "whsec_other", tolerance=0)

    report = notification.fetch_event()  # GET /v2/core/events/{id}
    assert report.type == "v1.billing.meter.error_report_triggered"
    error_type = report.data.reason.error_types[0]
    assert report.data.reason.error_count == 1 and error_type.code == "meter_event_customer_not_found"
    assert error_type.sample_errors[0].request.identifier == "idem-ghost"
    assert report.data.validation_start <= report.data.validation_end

    no_meter = json.loads(pushed["v1.billing.meter.no_meter_found"][0])
    assert "data" not in no_meter and "related_object" not in no_meter
    fetched = stripe_client.v2.core.events.retrieve(no_meter["id"]).to_dict()
    assert fetched["data"]["reason"]["error_types"][0]["code"] == "no_meter"
    assert fetched["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"] == "idem-nometer"

    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v2.core.events.retrieve("evt_test_unknown")
    assert missing.value.http_status == 404


# -- Stripe: where events go (what `reconciler doctor` reads) ------------------------------------------------------


def test_webhook_endpoints_are_listed_without_their_secret(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/webhook_endpoints/list and /object: a v1 list, newest first, of objects with
    `url`, `enabled_events` (`['*']` for all), `status` enabled | disabled and `api_version` (null: the account's
    default); the `secret` is "only returned at creation", so a list never carries it."""
    stripe_fake.add_webhook_endpoint("https://a.example.com/webhooks/stripe", ["invoice.created"])
    stripe_fake.add_webhook_endpoint("https://b.example.com/webhooks/stripe", ["*"], status="disabled")
    listed = stripe_client.v1.webhook_endpoints.list(params={"limit": 1})
    assert listed.has_more is True
    first = listed.data[0].to_dict()
    assert first["url"] == "https://b.example.com/webhooks/stripe"  # newest first
    assert first["object"] == "webhook_endpoint" and first["status"] == "disabled" and first["enabled_events"] == ["*"]
    assert "secret" not in first and first["api_version"] is None and first["livemode"] is False
    rest = stripe_client.v1.webhook_endpoints.list(params={"starting_after": first["id"]})
    assert [e.url for e in rest.data] == ["https://a.example.com/webhooks/stripe"]


def test_event_destinations_show_their_url_only_when_included(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, thin_receiver
):
    """https://docs.stripe.com/api/v2/core/event-destinations/list: a v2 list (`data`, `next_page_url`) whose
    `include` parameter "Currently supports webhook_endpoint.url": without it the URL is not served (the object
    is https://docs.stripe.com/api/v2/core/event-destinations/object; `signing_secret` null). The docs give no page
    order or default size: the fake pages oldest first. A disabled destination is sent nothing (status)."""
    url, received = thin_receiver
    enabled = stripe_fake.add_event_destination(url, "whsec_on")
    stripe_fake.add_event_destination(url, "whsec_off", enabled=False)

    bare = stripe_client.v2.core.event_destinations.list().to_dict()
    assert bare["data"][0]["webhook_endpoint"] == {"signing_secret": None, "url": None}
    page = stripe_client.v2.core.event_destinations.list(params={"include": ["webhook_endpoint.url"], "limit": 1})
    first = page.to_dict()["data"][0]
    assert first["id"] == enabled.id and first["object"] == "v2.core.event_destination"
    assert first["type"] == "webhook_endpoint" and first["event_payload"] == "thin" and first["status"] == "enabled"
    assert first["webhook_endpoint"]["url"] == url
    assert set(first["enabled_events"]) == {
        "v1.billing.meter.error_report_triggered",
        "v1.billing.meter.no_meter_found",
    }
    following = stripe_client.raw_request("get", page.to_dict()["next_page_url"]).data
    assert following["data"][0]["status"] == "disabled" and following["data"][0]["webhook_endpoint"]["url"] == url
    assert following["next_page_url"] is None

    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    _meter_event(stripe_client, "cus_ghost", "1", identifier="idem-ghost")
    stripe_fake.flush_meter_error_reports()
    assert len(received) == 1 and [status for _, status in enabled.deliveries] == [200]


# -- Stripe: meter event summaries (https://docs.stripe.com/api/billing/meter-event-summary/list) ------------------


def test_an_accepted_event_can_be_rejected_later_and_named_only_by_sample(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/v2/core/events/event-types: v1.billing.meter.error_report_triggered "occurs when a
    Meter has invalid async usage events"; https://docs.stripe.com/api/v2/core/events/object: the report names
    rejected events by `sample_errors`, not all of them. Stripe does not document which accepted events can fail
    later: the sandbox lets any fail (`reject_asynchronously`), named in a report or not, the worse case for a client.
    A rejected event is in no summary and no invoice; resent under a new identifier it counts."""
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    stripe_fake.reject_asynchronously(1)
    stripe_fake.reject_asynchronously(1, reported=False)
    accepted = [_meter_event(stripe_client, "cus_1", "5", identifier=i) for i in ("named", "unnamed", "resent")]
    assert [event.identifier for event in accepted] == ["named", "unnamed", "resent"]  # each answered 200
    assert stripe_fake.meter_total("cus_1", "api_calls", NOW - 3600, NOW + 60) == 5  # only the third counts
    [report] = stripe_fake.flush_meter_error_reports()
    data = stripe_fake.v2_events[report["id"]]["data"]
    samples = [s["request"]["identifier"] for t in data["reason"]["error_types"] for s in t["sample_errors"]]
    assert samples == ["named"] and report["related_object"]["id"] == meter["id"]


def test_stripe_limits_requests_globally_per_endpoint_and_live_meter_events_apart(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/rate-limits: a global limit (live 100 operations/s, a sandbox 25), a default of 25/s
    per endpoint (each named operation, whatever the ids in its path), and live meter events limited apart at
    1,000/s without counting against the global limit (in a sandbox they share it); 429 over any."""
    for n in range(30):
        stripe_fake.add_customer(id=f"cus_{n}")
    stripe_fake.add_meter("api_calls")

    def status(call) -> int:
        try:
            call()
        except stripe.RateLimitError:
            return 429
        return 200

    def retrieve(n: int) -> int:
        return status(lambda: stripe_client.v1.customers.retrieve(f"cus_{n}"))

    stripe_fake.limit_like_stripe(live=False, window=60)  # a minute-long "second": no burst spreads over two
    assert [retrieve(n) for n in range(26)] == [200] * 25 + [429]  # one endpoint, whatever the ids
    assert status(lambda: stripe_client.v1.prices.list()) == 429  # the sandbox's global 25 is spent too

    stripe_fake.reset_counters()
    stripe_fake.limit_like_stripe(live=True, window=60)
    assert [retrieve(n) for n in range(26)][-1] == 429  # 25 per endpoint, live as well
    # The docs do not say whether a refused request counts against the limits; the fake counts it (the worse case
    # for a client that retries at once): the 26 retrieves leave 74 of the global 100.
    for listing, allowed in (
        (stripe_client.v1.prices.list, 25),
        (stripe_client.v1.subscriptions.list, 25),
        (stripe_client.v1.refunds.list, 24),
    ):
        assert [status(listing) for _ in range(allowed)] == [200] * allowed  # other endpoints, up to the global 100
    assert status(lambda: stripe_client.v1.billing.meters.list()) == 429
    events = [status(lambda n=n: _meter_event(stripe_client, "cus_1", "1", identifier=f"e{n}")) for n in range(150)]
    assert events == [200] * 150  # live meter events: their own 1,000/s, outside the global limit


# -- Stripe: the v2 meter event stream ------------------------------------------------------------------------------
# https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create,
# https://docs.stripe.com/api/v2/billing/meter-event-stream/create,
# https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api (high-throughput ingestion)


@pytest.fixture
def meter_events_url(stripe_fake: FakeStripe) -> Iterator[str]:
    """The stream's own host (Stripe's: https://meter-events.stripe.com), served on a port of its own."""
    with LoopbackServer(stripe_fake.meter_events_host()) as srv:
        yield srv.url


@pytest.fixture
def stream_client(stripe_server: LoopbackServer, meter_events_url: str) -> Iterator[stripe.StripeClient]:
    http = stripe.RequestsClient()
    try:
        yield stripe.StripeClient(
            "sk_test_sandbox",
            base_addresses={"api": stripe_server.url, "meter_events": meter_events_url},
            max_network_retries=0,
            http_client=http,
        )
    finally:
        http.close()


def _stream_event(customer: str, value: str, identifier: str, *, at: int = NOW, name: str = "api_calls") -> dict:
    return {
        "event_name": name,
        "identifier": identifier,
        "timestamp": datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z"),
        "payload": {"stripe_customer_id": customer, "value": value},
    }


def _stream(client: stripe.StripeClient, token: str, events: list[dict]) -> None:
    client.v2.billing.meter_event_stream.create({"events": events}, options={"api_key": token})  # type: ignore[typeddict-item]


def test_a_meter_event_session_token_is_valid_for_15_minutes(
    stream_client: stripe.StripeClient, stripe_fake: FakeStripe, clock: Clock
):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create: a v2.billing.meter_event_session with
    `authentication_token`, `created` and `expires_at` (RFC 3339), "Authentication tokens are only valid for 15
    minutes". https://docs.stripe.com/api/v2/billing/meter-event-stream/create: an expired one gets 401
    `billing_meter_event_session_expired` ("The temporary session token has expired."; stripe-python raises
    TemporarySessionExpiredError for its type). The stream takes the session token, never the secret key (which the
    docs do not mention: refused, the worse case)."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    session = stream_client.v2.billing.meter_event_session.create().to_dict()
    assert session["object"] == "v2.billing.meter_event_session" and session["livemode"] is False
    created = datetime.fromisoformat(session["created"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(session["expires_at"].replace("Z", "+00:00"))
    assert expires - created == timedelta(minutes=15)
    token = session["authentication_token"]
    _stream(stream_client, token, [_stream_event("cus_1", "2", "s1")])
    clock.now += 15 * 60 - 1
    _stream(stream_client, token, [_stream_event("cus_1", "3", "s2", at=int(clock.now))])
    clock.now += 1
    with pytest.raises(stripe.TemporarySessionExpiredError) as expired:
        _stream(stream_client, token, [_stream_event("cus_1", "5", "s3", at=int(clock.now))])
    assert expired.value.http_status == 401 and expired.value.code == "billing_meter_event_session_expired"
    with pytest.raises(stripe.AuthenticationError):
        _stream(stream_client, "sk_test_sandbox", [_stream_event("cus_1", "7", "s4", at=int(clock.now))])
    assert [e.identifier for e in stripe_fake.meter_events] == ["s1", "s2"]


def test_the_stream_is_served_from_its_own_host(stripe_server: LoopbackServer, stripe_fake, stream_client):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/create is served by https://meter-events.stripe.com,
    the session by the API host (stripe-python's `base_address="meter_events"`). The fake refuses the stream on the
    API host (what Stripe answers there is not documented): 401 to a session token, 404 to the secret key."""
    token = stream_client.v2.billing.meter_event_session.create().authentication_token
    for key, status in ((token, 401), ("sk_test_sandbox", 404)):
        response = httpx.post(
            f"{stripe_server.url}/v2/billing/meter_event_stream",
            json={"events": [_stream_event("cus_1", "1", "x")]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == status
    assert stripe_fake.meter_events == []


def test_the_stream_takes_up_to_100_events_and_validates_them_asynchronously(
    stream_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/create: "Supports up to 100 events per request" (what
    a longer list gets is not documented: the fake refuses it whole, 400), "Events are processed asynchronously,
    including validation": the answer is `{}` whatever the events hold; a repeated identifier ("uniqueness within a
    rolling 24 hour period") is dropped without a word."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    token = stream_client.v2.billing.meter_event_session.create().authentication_token
    _stream(stream_client, token, [_stream_event("cus_1", "1", f"b{n}") for n in range(100)])
    assert len(stripe_fake.meter_events) == 100
    with pytest.raises(stripe.InvalidRequestError):
        _stream(stream_client, token, [_stream_event("cus_1", "1", f"c{n}") for n in range(101)])
    assert len(stripe_fake.meter_events) == 100  # nothing of the refused request applied
    _stream(stream_client, token, [_stream_event("cus_1", "9", "b0"), _stream_event("cus_1", "4", "new")])
    assert stripe_fake.meter_total("cus_1", "api_calls", NOW - 60, NOW + 60) == 104  # b0 again: not counted


def test_an_invalid_stream_event_is_accepted_and_reported_by_a_thin_meter_error_event(
    stream_client: stripe.StripeClient, stripe_fake: FakeStripe, thin_receiver
):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/create ("validation" is asynchronous) and
    https://docs.stripe.com/api/v2/core/events/event-types: an event for an unknown customer or naming no active meter
    is answered like any other (200) and reported later as v1.billing.meter.error_report_triggered /
    v1.billing.meter.no_meter_found, the same thin events as v1 meter events."""
    url, received = thin_receiver
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    stripe_fake.add_event_destination(url, "whsec_thin")
    token = stream_client.v2.billing.meter_event_session.create().authentication_token
    _stream(
        stream_client,
        token,
        [
            _stream_event("cus_ghost", "1", "ghost"),
            _stream_event("cus_1", "1", "nometer", name="no_such_meter"),
            _stream_event("cus_1", "1", "fine"),
        ],
    )
    assert [e.identifier for e in stripe_fake.meter_events] == ["fine"]
    pushed = stripe_fake.flush_meter_error_reports()
    assert {p["type"] for p in pushed} == {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}
    assert len(received) == 2
    report = next(p for p in pushed if p["type"] == "v1.billing.meter.error_report_triggered")
    assert report["related_object"]["id"] == meter["id"]
    data = stream_client.v2.core.events.retrieve(report["id"]).to_dict()["data"]
    assert data["reason"]["error_types"][0]["code"] == "meter_event_customer_not_found"
    assert data["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"] == "ghost"


def test_the_stream_has_its_own_live_limit_and_shares_the_sandbox_limits(
    stream_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/create: "up to 10,000 requests per second in
    livemode", apart from https://docs.stripe.com/rate-limits's global limit. Neither page gives a sandbox figure: the
    fake counts the stream there like any endpoint (25/s, and against the global 25/s), the worse case; 429 over."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    token = stream_client.v2.billing.meter_event_session.create().authentication_token

    def status(n: int) -> int:
        try:
            _stream(stream_client, token, [_stream_event("cus_1", "1", f"r{n}")])
        except stripe.RateLimitError:
            return 429
        return 200

    stripe_fake.limit_like_stripe(live=False, window=60)
    assert [status(n) for n in range(26)] == [200] * 25 + [429]
    stripe_fake.reset_counters()
    stripe_fake.limit_like_stripe(live=True, window=60)
    # Live, past the endpoint default and the global 100 alike: the stream's limit is its own.
    assert [status(100 + n) for n in range(150)] == [200] * 150
    stream_client.v1.billing.meters.list()  # and the global limit still has room


def test_a_lost_stream_answer_is_resent_with_the_same_identifiers_and_counted_once(
    stream_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/v2/billing/meter-event-stream/create: identifiers are unique within 24 hours, so a
    batch whose answer was lost (applied, then a 5xx or a dropped connection) can be sent again as it was."""
    stripe_fake.add_customer(id="cus_1")
    stripe_fake.add_meter("api_calls")
    token = stream_client.v2.billing.meter_event_session.create().authentication_token
    batch = [_stream_event("cus_1", "3", "l1"), _stream_event("cus_1", "4", "l2")]
    stripe_fake.inject_fault("POST", "/v2/billing/meter_event_stream", 500, after_apply=True)
    with pytest.raises(stripe.APIError):
        _stream(stream_client, token, batch)
    _stream(stream_client, token, batch)
    assert stripe_fake.meter_total("cus_1", "api_calls", NOW - 60, NOW + 60) == 7


def test_event_summaries_grouping_and_alignment(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/billing/meter-event-summary/list:
    start_time and end_time "must be aligned with minute boundaries" (with value_grouping_window=hour, with hour
    boundaries); summaries come newest first. The sandbox refuses an unaligned bound with a 400 naming the parameter."""
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    hour0 = NOW - 3 * 3600
    for i, ts in enumerate([hour0 + 10, hour0 + 20, hour0 + 2 * 3600 + 5]):
        _meter_event(stripe_client, "cus_1", "2", identifier=f"g{i}", timestamp=ts)
    res = stripe_client.v1.billing.meters.event_summaries.list(
        meter["id"],
        params={"customer": "cus_1", "start_time": hour0, "end_time": NOW, "value_grouping_window": "hour"},
    )
    assert [(s.start_time, s.aggregated_value) for s in res.data] == [(hour0 + 7200, 2), (hour0, 4)]
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meters.event_summaries.list(
            meter["id"], params={"customer": "cus_1", "start_time": hour0 + 1, "end_time": NOW}
        )
    assert exc.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.billing.meters.event_summaries.list(
            meter["id"],
            params={
                "customer": "cus_1",
                "start_time": hour0 + 60,
                "end_time": NOW,
                "value_grouping_window": "hour",
            },
        )
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.raw_request("get", f"/v1/billing/meters/{meter['id']}/event_summaries", customer="cus_1")
    assert exc.value.param == "start_time"


def test_an_event_summary_end_time_in_the_future_is_refused(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/billing/meter-event-summary/list requires minute-aligned bounds and says nothing
    of an end_time in the future: the sandbox refuses one, the answer worse for a client that sends it."""
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    aligned = NOW - NOW % 60
    params = {"customer": "cus_1", "start_time": aligned - 3600, "end_time": aligned + 60}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        stripe_client.v1.billing.meters.event_summaries.list(meter["id"], params=params)
    assert exc.value.param == "end_time"
    params["end_time"] = aligned
    assert (
        stripe_client.v1.billing.meters.event_summaries.list(meter["id"], params=params).data[0].aggregated_value == 0
    )


def test_an_event_shows_in_event_summaries_only_once_the_summary_lag_has_passed(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, clock
):
    """https://docs.stripe.com/api/billing/meter-event-summary:
    "Meters events are aggregated asynchronously so the meter event summaries provide an eventually consistent view
    of the reported usage." The docs give no delay; the sandbox's `summary_lag_seconds` (off unless a test sets it)
    hides an event from the summaries until it has passed, while the invoice bills every accepted event."""
    stripe_fake.clock = clock
    stripe_fake.summary_lag_seconds = 600
    stripe_fake.add_customer(id="cus_1")
    meter = stripe_fake.add_meter("api_calls")
    hour = NOW - 3600
    _meter_event(stripe_client, "cus_1", "5", identifier="early", timestamp=hour + 10)
    clock.now += 300
    _meter_event(stripe_client, "cus_1", "7", identifier="late", timestamp=hour + 20)

    def summarized(**grouping) -> list[float]:
        params = {"customer": "cus_1", "start_time": hour, "end_time": NOW, **grouping}
        return [
            s.aggregated_value for s in stripe_client.v1.billing.meters.event_summaries.list(meter["id"], params=params)
        ]

    assert summarized() == [0] and summarized(value_grouping_window="hour") == []
    assert (
        stripe_fake.meter_total("cus_1", "api_calls", hour, NOW) == 12
    )  # what the invoice bills: every accepted event
    clock.now += 299
    assert summarized() == [0]  # the first event is 599 s old
    clock.now += 1
    assert summarized() == [5] and summarized(value_grouping_window="hour") == [5]
    clock.now += 300
    assert summarized() == [12]
    stripe_fake.reset()  # a fake shared between tests starts each one without a lag
    assert stripe_fake.summary_lag_seconds == 0


def test_a_usage_record_shows_in_usage_record_summaries_only_once_the_summary_lag_has_passed(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, clock
):
    """https://docs.stripe.com/billing/subscriptions/usage-based-legacy/recording-usage
    (legacy usage records, API versions before 2025-03-31): usage record summaries are aggregated asynchronously too.
    The docs give no delay; the sandbox applies the same `summary_lag_seconds`, a `set` replacing an earlier one only
    once the lag has passed."""
    stripe_fake.clock = clock
    stripe_fake.summary_lag_seconds = 600
    item = _legacy_item(stripe_fake)

    def total_usage() -> int:
        summaries = stripe_client.raw_request(
            "get", f"/v1/subscription_items/{item}/usage_record_summaries", stripe_version=LEGACY
        )
        return stripe_client.deserialize(summaries, api_mode="V1").data[0].total_usage

    _usage(stripe_client, item, quantity=3, action="set", timestamp=NOW)
    clock.now += 300
    _usage(stripe_client, item, quantity=5, action="set", timestamp=NOW)  # replaces the 3 at the same timestamp
    assert (total_usage(), stripe_fake.usage_record_total(item)) == (0, 5)
    clock.now += 300
    assert total_usage() == 3  # the set the summary shows, not yet the one that replaced it
    clock.now += 300
    assert total_usage() == 5


# -- Stripe: invoice payments of subscription invoices ---------------------------------------------------------------


def test_a_paid_subscription_invoice_has_its_payment_intent_and_an_invoice_payment_mapping_them(
    stripe_fake: FakeStripe, stripe_client: stripe.StripeClient
):
    """https://docs.stripe.com/billing/billing-apis: a subscription's invoice is paid by a PaymentIntent it creates;
    https://docs.stripe.com/changelog/basil/2025-03-31/invoice-pricing-configurations: since 2025-03-31 that
    PaymentIntent names no invoice and a line's price is at pricing.price_details.price;
    https://docs.stripe.com/api/invoice-payment/object and /list: the InvoicePayment maps one to the other."""
    stripe_fake.add_customer("cus_A")
    top_up = stripe_fake.add_payment_intent("cus_A", 2500, created=NOW - DAY)
    invoice = stripe_fake.pay_invoice("cus_A", [("price_base", 4900)], subscription="sub_A", created=NOW - 2 * DAY)

    payment_intent = stripe_client.v1.payment_intents.retrieve(invoice["payment_intent"]).to_dict()
    assert (payment_intent["status"], payment_intent["amount_received"], payment_intent["customer"]) == (
        "succeeded",
        4900,
        "cus_A",
    )
    assert "invoice" not in payment_intent  # nothing on the PaymentIntent says it paid a bill

    listed = stripe_client.v1.invoice_payments.list(
        params={"payment": {"type": "payment_intent"}, "created": {"gte": NOW - 3 * DAY}}
    ).to_dict()["data"]
    assert [(p["object"], p["invoice"], p["payment"]) for p in listed] == [
        ("invoice_payment", invoice["id"], {"type": "payment_intent", "payment_intent": payment_intent["id"]})
    ]
    assert (listed[0]["status"], listed[0]["amount_paid"], listed[0]["is_default"]) == ("paid", 4900, True)

    by_intent = stripe_client.v1.invoice_payments.list(
        params={"payment": {"type": "payment_intent", "payment_intent": top_up["id"]}}
    )
    assert by_intent.data == []  # a top-up paid no invoice
    expanded = stripe_client.v1.invoice_payments.list(
        params={
            "payment": {"type": "payment_intent", "payment_intent": payment_intent["id"]},
            "expand": ["data.invoice"],
        }
    ).data[0]
    line = expanded.invoice.lines.data[0]
    assert (line.pricing.type, line.pricing.price_details.price, line.amount) == ("price_details", "price_base", 4900)
    assert stripe_client.v1.invoices.retrieve(invoice["id"]).status == "paid"

    assert stripe_client.v1.invoice_payments.list(params={"created": {"gte": NOW - DAY}}).data == []  # created filters


def test_invoice_payments_by_payment_intent_need_the_payment_type(stripe_client: stripe.StripeClient):
    """https://docs.stripe.com/api/invoice-payment/list lists payment.type as required within `payment`; the
    stricter reading is the sandbox's."""
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stripe_client.v1.invoice_payments.list(params={"payment": {"payment_intent": "pi_1"}})  # type: ignore[typeddict-item]
    assert refused.value.param == "payment[type]"


def test_a_payment_intent_that_already_succeeded_can_be_attached_to_an_invoice_later(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe, clock: Clock
):
    """https://docs.stripe.com/api/invoices/attach_payment: "If the PaymentIntent's status is already succeeded when
    it's attached, it's credited to the invoice immediately". Its InvoicePayment exists only from then on: a
    PaymentIntent that looked like a top-up can turn out, later, to have paid an invoice."""
    stripe_fake.add_customer("cus_A")
    intent = stripe_fake.add_payment_intent("cus_A", 4900, created=NOW - DAY)
    invoice = stripe_fake.open_invoice("cus_A", [("price_base", 4900)], created=NOW - DAY)
    by_intent = {"payment": {"type": "payment_intent", "payment_intent": intent["id"]}}
    assert stripe_client.v1.invoice_payments.list(params=by_intent).data == []  # nothing says it paid a bill yet

    clock.now = NOW + 60
    stripe_fake.attach_payment(invoice["id"], intent["id"])
    [payment] = stripe_client.v1.invoice_payments.list(params=by_intent).to_dict()["data"]
    assert (payment["invoice"], payment["status"], payment["amount_paid"], payment["created"]) == (
        invoice["id"],
        "paid",
        4900,
        NOW + 60,
    )
    assert stripe_client.v1.invoices.retrieve(invoice["id"]).status == "paid"


# -- Stripe: lists and API versions ----------------------------------------------------------------------------------


def test_subscription_pagination(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/pagination: lists are cursor-paged by `limit` (default
    10) and `starting_after`, newest first, with `has_more` and `url`; stripe-python's auto_paging_iter follows
    them."""
    created = _seed_subscriptions(stripe_fake, 25)
    seen = [s.id for s in stripe_client.v1.subscriptions.list(params={"limit": 10}).auto_paging_iter()]
    assert seen == list(reversed(created))
    gets = [r for r in stripe_fake.requests if r.path == "/v1/subscriptions"]
    assert len(gets) == 3
    assert gets[1].params["starting_after"] == created[15]
    page = stripe_client.v1.subscriptions.list(params={"limit": 100})
    assert len(page.data) == 25 and page.has_more is False and page.url == "/v1/subscriptions"


def test_subscription_pagination_backwards_filtered_and_across_a_new_subscription(
    stripe_client: stripe.StripeClient, stripe_fake: FakeStripe
):
    """https://docs.stripe.com/api/pagination: `ending_before` "returns objects listed before the named object" (the
    previous page), `starting_after` those after it, newest first. The fake keeps its newest-first order between
    pages for speed: a page asked for after a subscription was created, or of a filtered list, must still be
    exactly the objects before or after the cursor."""
    created = _seed_subscriptions(stripe_fake, 25)
    newest_first = list(reversed(created))

    def page(**params: object) -> tuple[list[str], bool]:
        listed = stripe_client.v1.subscriptions.list(params={"limit": 10, **params})  # type: ignore[arg-type]
        return [s.id for s in listed.data], listed.has_more

    first, _ = page()
    second, more = page(starting_after=first[-1])
    assert (first, second, more) == (newest_first[:10], newest_first[10:20], True)
    assert page(ending_before=second[0]) == (newest_first[:10], False)
    assert page(ending_before=second[-1]) == (newest_first[9:19], True)

    price = next(iter(stripe_fake.subscription_items.values()))["price"]
    newer = stripe_fake.add_subscription(
        "cus_1",
        [price],
        current_period_start=PERIOD_START,
        current_period_end=PERIOD_END,
        created=stripe_fake.subscriptions[created[-1]]["created"] + 1,
    )["id"]
    assert page(starting_after=second[-1]) == (newest_first[20:], False)
    assert page()[0] == [newer, *newest_first[:9]]
    assert page(status="active", starting_after=second[-1]) == (newest_first[20:], False)  # a filtered list
    assert page(status="active", ending_before=newest_first[0]) == ([newer], False)


def test_limit_bounds(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/api/pagination: `limit` ranges "between 1 and 100"; the sandbox refuses
    101 with a 400 rather than clamping it, the answer worse for a client that sends it."""
    _seed_subscriptions(stripe_fake, 1)
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.subscriptions.list(params={"limit": 101})


def test_legacy_usage_version_gate(stripe_client: stripe.StripeClient, stripe_fake: FakeStripe):
    """https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-legacy-usage-based-billing:
    the legacy usage records endpoints are gone from API 2025-03-31.basil on; the sandbox serves them only to a
    request pinned to an older version (and refuses the default version and basil)."""
    item = _legacy_item(stripe_fake)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _usage(stripe_client, item, version=None, quantity=1, timestamp=NOW)
    assert "2025-03-31" in str(exc.value.user_message)
    with pytest.raises(stripe.InvalidRequestError):
        _usage(stripe_client, item, version="2025-03-31.basil", quantity=1, timestamp=NOW)
    assert stripe_fake.usage_record_total(item) == 0
    record = _usage(stripe_client, item, quantity=1, timestamp=NOW)
    assert record.object == "usage_record" and record.subscription_item == item


# -- OpenMeter (https://openmeter.io/docs/api; shared/contracts/openmeter-openapi.yaml) ------------------------------


def _rows(result) -> list[tuple]:
    return [(r.subject, dict(r.group_by), r.window_start, r.window_end, r.value) for r in result.data]


def test_meters_are_listed_in_pages(
    openmeter_client: openmeter.Client, openmeter_fake: FakeOpenMeter, openmeter_server
):
    """https://openmeter.io/docs/api (listMeters), as the contract has it:
    listMeters pages by `page` (from 1) and `pageSize` (1..1000, default 100): shared/contracts/
    openmeter-openapi.yaml, components/parameters/Pagination.page and Pagination.pageSize."""
    for i in range(150):
        openmeter_fake.add_meter(f"meter_{i:03d}")
    assert [len(openmeter_client.meters.list(page=p)) for p in (1, 2, 3)] == [100, 50, 0]
    assert openmeter_client.meters.list(page=2, page_size=100)[0].slug == "meter_100"
    assert len(openmeter_client.meters.list(page_size=1000)) == 150
    assert _raw(openmeter_server, "/api/v1/meters", [("pageSize", "1001")])[0] == 400
    assert _raw(openmeter_server, "/api/v1/meters", [("page", "0")])[0] == 400


def test_query_subjects_bounds_and_shape(
    openmeter_client: openmeter.Client, openmeter_fake: FakeOpenMeter, openmeter_server
):
    """https://openmeter.io/docs/api (queryMeter; shared/contracts/openmeter-openapi.yaml,
    MeterQuery.from / MeterQuery.to): `from` is inclusive. The reference calls `to` "Inclusive" too, but each row's
    windowEnd is `to` and windows are half-open [windowStart, windowEnd); the sandbox leaves out an event at exactly
    `to` so that consecutive ranges never count an event twice - the reading a reconciler must survive. Without a
    subject filter all subjects are aggregated into one row with subject null."""
    openmeter_fake.add_meter("tokens_total")
    openmeter_fake.ingest("tokens_total", "cus_a", T0, 5)  # at `from`: included
    openmeter_fake.ingest("tokens_total", "cus_a", T0 + timedelta(minutes=30), 7)
    openmeter_fake.ingest("tokens_total", "cus_b", T0 + timedelta(minutes=10), 1)
    openmeter_fake.ingest("tokens_total", "cus_a", T0 + timedelta(hours=1), 100)  # at `to`: excluded
    openmeter_fake.ingest("tokens_total", "cus_c", T0 - timedelta(seconds=1), 100)  # before `from`
    to = T0 + timedelta(hours=1)
    res = openmeter_client.meters.query_json("tokens_total", from_parameter=T0, to=to, subject=["cus_a", "cus_b"])
    assert _rows(res) == [("cus_a", {}, T0, to, 12.0), ("cus_b", {}, T0, to, 1.0)]
    # Without a subject filter all subjects are aggregated together, subject null.
    res = openmeter_client.meters.query_json("tokens_total", from_parameter=T0, to=to)
    assert _rows(res) == [(None, {}, T0, to, 13.0)]
    query = openmeter_fake.requests[-2].query
    assert query["subject"] == ["cus_a", "cus_b"]
    status, ctype, body = _raw(
        openmeter_server,
        "/api/v1/meters/tokens_total/query",
        [("from", "2026-01-01T00:00:00Z"), ("to", "2026-01-01T01:00:00Z")],
    )
    assert status == 200 and ctype == "application/json"
    assert body == {
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-01T01:00:00Z",
        "data": [
            {
                "value": 13.0,
                "windowStart": "2026-01-01T00:00:00Z",
                "windowEnd": "2026-01-01T01:00:00Z",
                "subject": None,
                "groupBy": {},
            }
        ],
    }


def test_query_windows_and_time_zone(openmeter_client: openmeter.Client, openmeter_fake: FakeOpenMeter):
    """https://openmeter.io/docs/api (queryMeter, windowSize and windowTimeZone): windows
    are aligned to the window size in the given time zone (UTC by default); empty windows are left out."""
    openmeter_fake.add_meter("tokens_total")
    openmeter_fake.ingest("tokens_total", "s", T0 + timedelta(hours=1, minutes=5), 1)
    openmeter_fake.ingest("tokens_total", "s", T0 + timedelta(hours=1, minutes=55), 2)
    openmeter_fake.ingest("tokens_total", "s", T0 + timedelta(hours=7), 4)
    to = T0 + timedelta(days=1)
    res = openmeter_client.meters.query_json("tokens_total", from_parameter=T0, to=to, window_size="HOUR")
    assert res.window_size == "HOUR"
    assert [(r.window_start, r.window_end, r.value) for r in res.data] == [
        (T0 + timedelta(hours=1), T0 + timedelta(hours=2), 3.0),
        (T0 + timedelta(hours=7), T0 + timedelta(hours=8), 4.0),
    ]
    # New York is UTC-5 in January: the local day boundary is 05:00Z.
    res = openmeter_client.meters.query_json(
        "tokens_total", from_parameter=T0, to=to, window_size="DAY", window_time_zone="America/New_York"
    )
    ny_midnight = datetime(2026, 1, 1, 5, tzinfo=UTC)
    assert [(r.window_start, r.window_end, r.value) for r in res.data] == [
        (ny_midnight - timedelta(days=1), ny_midnight, 3.0),
        (ny_midnight, ny_midnight + timedelta(days=1), 4.0),
    ]
    res = openmeter_client.meters.query_json(
        "tokens_total", from_parameter=T0, to=to, window_size="HOUR", window_time_zone="Asia/Kolkata"
    )
    assert res.data[0].window_start == T0 + timedelta(minutes=30)  # +05:30 aligns hours at :30 UTC
    res = openmeter_client.meters.query_json("tokens_total", from_parameter=T0, to=to, window_size="MONTH")
    assert [(r.window_start, r.window_end, r.value) for r in res.data] == [(T0, datetime(2026, 2, 1, tzinfo=UTC), 7.0)]


def test_bad_ranges_are_400_problems(
    openmeter_client: openmeter.Client, openmeter_fake: FakeOpenMeter, openmeter_server
):
    """https://openmeter.io/docs/api: errors are RFC 7807 problem details
    (`application/problem+json` with type, title, status, detail, instance). The docs do not say an empty or reversed
    range is refused; the sandbox answers it 400 rather than an empty result."""
    openmeter_fake.add_meter("tokens_total")
    for start, end in ((T0, T0), (T0 + timedelta(hours=1), T0)):
        with pytest.raises(HttpResponseError) as exc:
            openmeter_client.meters.query_json("tokens_total", from_parameter=start, to=end)
        assert exc.value.status_code == 400
    status, ctype, body = _raw(
        openmeter_server,
        "/api/v1/meters/tokens_total/query",
        [("from", "2026-01-01T00:00:00Z"), ("to", "2026-01-01T00:00:00Z")],
    )
    assert status == 400 and ctype == "application/problem+json"
    assert body["status"] == 400 and body["title"] == "Bad Request"
    assert {"type", "title", "detail", "instance"} <= set(body)
    status, _, _ = _raw(openmeter_server, "/api/v1/meters/tokens_total/query", [("from", "yesterday")])
    assert status == 400
    status, _, _ = _raw(openmeter_server, "/api/v1/meters/tokens_total/query", [("windowTimeZone", "Mars/Olympus")])
    assert status == 400


# -- Moesif (https://www.moesif.com/docs/credit-tracking/creating-credits/) ------------------------------------------


def test_credit_answers_204_without_body_and_raises_balance(moesif_fake: FakeMoesif, moesif_client: httpx.Client):
    """https://www.moesif.com/docs/credit-tracking/creating-credits/
    (Management API POST /~/billing/reports/balance_transactions, "204: success, no content and BillingReports were
    created or updated" in shared/contracts/moesif-management-openapi.json): a credit answers 204
    with no body and raises the subscription's balance
    (https://www.moesif.com/docs/credit-tracking/managing-credits/: current, pending and available balance)."""
    resp = moesif_client.post(TXN_PATH, json=_txn(amount=25.0, description="top-up pi_1"))
    assert resp.status_code == 204
    assert resp.content == b""
    assert "content-type" not in resp.headers

    sub = moesif_client.get("/v1/search/~/subscriptions/sub_1").json()
    assert (sub["subscription_id"], sub["company_id"], sub["status"], sub["currency"]) == (
        "sub_1",
        "cus_1",
        "active",
        "usd",
    )
    assert sub["balance"]["current_balance"] == 35.0
    assert sub["balance"]["available_balance"] == 35.0
    assert sub["balance"]["pending_activity"] == 0.0
    assert sub["balance"]["last_modified"] == "2026-01-01T00:00:00.000Z"
    assert moesif_fake.balance("sub_1") == 35.0
    [txn] = moesif_fake.transactions
    assert (txn["transaction_id"], txn["amount"], txn["received_at"], txn["applied"]) == ("t1", 25.0, NOW, True)
    assert moesif_fake.requests[0].params["description"] == "top-up pi_1"


def test_repeated_transaction_id_is_ignored_when_deduplicating(moesif_fake: FakeMoesif, moesif_client: httpx.Client):
    """https://www.moesif.com/docs/credit-tracking/creating-credits/:
    the transaction id is "a unique ID that Moesif will use to" deduplicate the record: a repeat answers 204 and
    changes nothing."""
    assert moesif_client.post(TXN_PATH, json=_txn("same", 5.0)).status_code == 204
    assert moesif_client.post(TXN_PATH, json=_txn("same", 5.0)).status_code == 204
    assert _balance(moesif_client)["current_balance"] == 15.0
    assert [t["applied"] for t in moesif_fake.transactions] == [True, False]


def test_repeated_transaction_id_applies_twice_without_dedupe(moesif_fake: FakeMoesif, moesif_client: httpx.Client):
    """https://www.moesif.com/docs/credit-tracking/creating-credits/
    promises deduplication by transaction id but not its window or whether it holds for the balance at once; the
    sandbox's `dedupe_transaction_ids = False` is the pessimistic reading, a repeat applied twice, so the product
    must never resend a transaction it may already have sent."""
    moesif_fake.dedupe_transaction_ids = False
    assert moesif_client.post(TXN_PATH, json=_txn("same", 5.0)).status_code == 204
    assert moesif_client.post(TXN_PATH, json=_txn("same", 5.0)).status_code == 204
    assert _balance(moesif_client)["current_balance"] == 20.0
    assert [t["applied"] for t in moesif_fake.transactions] == [True, True]


def test_visibility_delay(moesif_fake: FakeMoesif, moesif_client: httpx.Client, clock: Clock):
    """https://www.moesif.com/docs/credit-tracking/managing-credits/: transactions not yet posted
    show as pending and reach the current balance later. The docs give no delay; the sandbox's
    `visibility_delay_seconds` hides an accepted credit from the balance until it has passed."""
    moesif_fake.visibility_delay_seconds = 30
    assert moesif_client.post(TXN_PATH, json=_txn(amount=25.0)).status_code == 204
    assert _balance(moesif_client)["current_balance"] == 10.0
    assert moesif_fake.transactions[0]["visible"] is False
    clock.now = NOW + 29.9
    assert moesif_fake.balance("sub_1") == 10.0
    clock.now = NOW + 30
    balance = _balance(moesif_client)
    assert balance["current_balance"] == 35.0
    assert balance["last_modified"] == "2026-01-01T00:00:30.000Z"
    assert moesif_fake.transactions[0]["visible"] is True
