"""FakeStripe driven through the real stripe-python SDK over HTTP."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal

import pytest
import stripe
from freezegun import freeze_time

from reconciler.sandbox.httpserver import DROP_CONNECTION, LoopbackServer
from reconciler.sandbox.stripe_fake import FakeStripe, parse_stripe_params

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
FROZEN = "2026-01-01 00:00:00"
PERIOD_START = NOW - 10 * 86400
PERIOD_END = NOW + 20 * 86400
LEGACY = "2025-02-24.acacia"


@pytest.fixture
def fake() -> FakeStripe:
    return FakeStripe(clock=lambda: NOW)


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[stripe.StripeClient]:
    http = stripe.RequestsClient()
    yield stripe.StripeClient(
        "sk_test_sandbox",
        base_addresses={"api": server.url},
        max_network_retries=0,
        http_client=http,
    )
    http.close()


def _raw(server: LoopbackServer, method: str, path: str, *, key: str = "sk_test_sandbox", data: bytes | None = None):
    req = urllib.request.Request(server.url + path, method=method, data=data)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


def _meter_event(client: stripe.StripeClient, customer: str, value: str, **extra):
    params = {"event_name": "api_calls", "payload": {"stripe_customer_id": customer, "value": value}}
    params.update(extra)
    options = {}
    if "idempotency_key" in params:
        options["idempotency_key"] = params.pop("idempotency_key")
    return client.v1.billing.meter_events.create(params=params, options=options)


# -- plumbing ------------------------------------------------------------------------------------


def test_parse_stripe_params_brackets():
    parsed = parse_stripe_params(
        [
            ("payload[stripe_customer_id]", "cus_1"),
            ("payload[value]", "5"),
            ("expand[0]", "a"),
            ("expand[1]", "b"),
            ("other[]", "x"),
            ("other[]", "y"),
            ("metadata[k][deep]", "v"),
            ("plain", "p"),
        ]
    )
    assert parsed == {
        "payload": {"stripe_customer_id": "cus_1", "value": "5"},
        "expand": ["a", "b"],
        "other": ["x", "y"],
        "metadata": {"k": {"deep": "v"}},
        "plain": "p",
    }


def test_auth_required_and_request_id(server: LoopbackServer, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    status, headers, body = _raw(server, "GET", "/v1/customers/cus_1", key="sk_test_wrong")
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["Request-Id"].startswith("req_")
    status, headers, body = _raw(server, "GET", "/v1/customers/cus_1")
    assert status == 200 and body["id"] == "cus_1" and body["object"] == "customer"
    assert headers["Request-Id"].startswith("req_")
    assert fake.requests[-1].headers["authorization"] == "Bearer sk_test_sandbox"


def test_wrong_key_raises_authentication_error(server: LoopbackServer):
    http = stripe.RequestsClient()
    bad = stripe.StripeClient("sk_test_other", base_addresses={"api": server.url}, http_client=http)
    try:
        with pytest.raises(stripe.AuthenticationError):
            bad.v1.customers.list()
    finally:
        http.close()


def test_unknown_url_is_404(client: stripe.StripeClient):
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.raw_request("get", "/v1/nonsense")
    assert exc.value.http_status == 404
    assert "Unrecognized request URL (GET: /v1/nonsense)." in str(exc.value.user_message)


def test_customers_retrieve_and_list(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_a", metadata={"tier": "gold"}, balance=-500)
    fake.add_customer(id="cus_b")
    cust = client.v1.customers.retrieve("cus_a")
    assert cust["balance"] == -500 and cust["metadata"]["tier"] == "gold"
    ids = [c.id for c in client.v1.customers.list(params={"limit": 1}).auto_paging_iter()]
    assert ids == ["cus_b", "cus_a"]  # newest first
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.customers.retrieve("cus_missing")
    assert exc.value.code == "resource_missing"


# -- subscriptions -------------------------------------------------------------------------------


def _seed_subscriptions(fake: FakeStripe, n: int) -> list[str]:
    fake.add_customer(id="cus_1")
    meter = fake.add_meter("api_calls")
    price = fake.add_price(meter=meter["id"])
    return [
        fake.add_subscription(
            "cus_1",
            [price["id"]],
            current_period_start=PERIOD_START,
            current_period_end=PERIOD_END,
            created=PERIOD_START + i,
        )["id"]
        for i in range(n)
    ]


def test_subscription_pagination(client: stripe.StripeClient, fake: FakeStripe):
    created = _seed_subscriptions(fake, 25)
    seen = [s.id for s in client.v1.subscriptions.list(params={"limit": 10}).auto_paging_iter()]
    assert seen == list(reversed(created))
    gets = [r for r in fake.requests if r.path == "/v1/subscriptions"]
    assert len(gets) == 3
    assert gets[1].params["starting_after"] == created[15]
    page = client.v1.subscriptions.list(params={"limit": 100})
    assert len(page.data) == 25 and page.has_more is False and page.url == "/v1/subscriptions"


def test_limit_bounds(client: stripe.StripeClient, fake: FakeStripe):
    _seed_subscriptions(fake, 1)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.list(params={"limit": 101})


def test_subscription_shape_is_basil(client: stripe.StripeClient, fake: FakeStripe):
    (sid,) = _seed_subscriptions(fake, 1)
    sub = client.v1.subscriptions.list().data[0].to_dict()
    assert sub["id"] == sid and sub["object"] == "subscription"
    assert "current_period_start" not in sub and "current_period_end" not in sub
    assert sub["customer"] == "cus_1"
    items = sub["items"]
    assert items["object"] == "list" and items["has_more"] is False
    assert items["url"] == f"/v1/subscription_items?subscription={sid}"
    item = items["data"][0]
    assert item["object"] == "subscription_item" and item["id"].startswith("si_")
    assert item["subscription"] == sid
    assert (item["current_period_start"], item["current_period_end"]) == (PERIOD_START, PERIOD_END)
    assert "quantity" not in item  # metered
    price = item["price"]
    assert price["object"] == "price" and price["type"] == "recurring"
    assert price["recurring"]["usage_type"] == "metered"
    assert price["recurring"]["meter"].startswith("mtr_")
    assert price["recurring"]["trial_period_days"] is None


def test_subscription_expand_customer(client: stripe.StripeClient, fake: FakeStripe):
    _seed_subscriptions(fake, 2)
    subs = client.v1.subscriptions.list(params={"expand": ["data.customer", "data.items.data.price"]}).data
    assert all(s.customer.id == "cus_1" and s.customer.object == "customer" for s in subs)
    assert fake.requests[-1].params["expand"] == ["data.customer", "data.items.data.price"]
    plain = client.v1.subscriptions.list().data
    assert all(s.customer == "cus_1" for s in plain)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.list(params={"expand": ["data.items.data.price.product.x"]})


def test_subscription_status_filter(client: stripe.StripeClient, fake: FakeStripe):
    ids = _seed_subscriptions(fake, 4)
    fake.update_subscription(ids[0], status="canceled", canceled_at=NOW, ended_at=NOW)
    fake.update_subscription(ids[1], status="incomplete_expired")
    fake.update_subscription(ids[2], status="past_due")

    def listed(**params) -> set[str]:
        return {s.id for s in client.v1.subscriptions.list(params=params).auto_paging_iter()}

    assert listed() == {ids[2], ids[3]}
    assert listed(status="all") == set(ids)
    assert listed(status="canceled") == {ids[0]}
    assert listed(status="past_due") == {ids[2]}
    assert listed(status="all", customer="cus_other") == set()


def test_many_items_are_truncated_and_pageable(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    prices = [fake.add_price(usage_type="licensed", unit_amount=100 + i)["id"] for i in range(12)]
    sub = fake.add_subscription("cus_1", prices, current_period_start=PERIOD_START, current_period_end=PERIOD_END)
    listed = client.v1.subscriptions.list().data[0]
    assert len(listed["items"].data) == 10 and listed["items"].has_more is True
    assert listed["items"].data[0]["quantity"] == 1  # licensed items carry a quantity
    all_items = list(
        client.v1.subscription_items.list(params={"subscription": sub["id"], "limit": 5}).auto_paging_iter()
    )
    assert [i.price.id for i in all_items] == prices
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.raw_request("get", "/v1/subscription_items")
    assert exc.value.param == "subscription"


def test_update_helpers_move_periods(client: stripe.StripeClient, fake: FakeStripe):
    (sid,) = _seed_subscriptions(fake, 1)
    item_id = client.v1.subscriptions.list().data[0]["items"].data[0].id
    fake.set_item_period(item_id, PERIOD_END, PERIOD_END + 30 * 86400)
    item = client.v1.subscription_items.retrieve(item_id)
    assert item.current_period_start == PERIOD_END
    fake.update_subscription(sid, current_period_start=1, current_period_end=2)
    assert client.v1.subscription_items.retrieve(item_id).current_period_end == 2


# -- meters --------------------------------------------------------------------------------------

METER_REQUIRED = {
    "created",
    "customer_mapping",
    "default_aggregation",
    "display_name",
    "event_name",
    "id",
    "livemode",
    "object",
    "status",
    "status_transitions",
    "updated",
    "value_settings",
}


def test_meters_list_and_status_filter(client: stripe.StripeClient, fake: FakeStripe):
    active = fake.add_meter("api_calls", formula="sum", event_time_window="hour")
    inactive = fake.add_meter("old_calls", status="inactive", customer_key="cust", value_key="n")
    meters = client.v1.billing.meters.list().data
    assert {m.id for m in meters} == {active["id"], inactive["id"]}
    for m in meters:
        d = m.to_dict()
        assert set(d) >= METER_REQUIRED
        assert d["object"] == "billing.meter"
        assert d["customer_mapping"]["type"] == "by_id"
    only_active = client.v1.billing.meters.list(params={"status": "active"}).data
    assert [m.id for m in only_active] == [active["id"]]
    got = client.v1.billing.meters.retrieve(inactive["id"])
    assert got.value_settings.event_payload_key == "n"
    assert got.customer_mapping.event_payload_key == "cust"
    assert got.status_transitions.deactivated_at == NOW
    assert client.v1.billing.meters.retrieve(active["id"]).event_time_window == "hour"


def test_meter_event_created_and_stored(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    event = _meter_event(client, "cus_1", "-2.5", identifier="evt-1", timestamp=NOW - 60)
    assert event.object == "billing.meter_event"
    assert event.identifier == "evt-1" and event.timestamp == NOW - 60 and event.created == NOW
    assert event.payload.to_dict() == {"stripe_customer_id": "cus_1", "value": "-2.5"}
    (stored,) = fake.meter_events
    assert stored.value == Decimal("-2.5") and stored.customer == "cus_1"
    assert fake.requests[-1].params["payload"]["value"] == "-2.5"


def test_meter_event_validation(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.billing.meter_events.create(params={"event_name": "api_calls", "payload": {"value": "1"}})
    assert exc.value.param == "payload[stripe_customer_id]"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.billing.meter_events.create(
            params={"event_name": "api_calls", "payload": {"stripe_customer_id": "cus_1"}}
        )
    assert exc.value.param == "payload[value]"
    with pytest.raises(stripe.InvalidRequestError):
        _meter_event(client, "cus_1", "ten")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(client, "cus_1", "1", identifier="x" * 101)
    assert exc.value.param == "identifier"
    assert fake.meter_events == []


def test_meter_event_timestamp_limits(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(client, "cus_1", "1", timestamp=NOW - 36 * 86400)
    assert exc.value.code == "timestamp_too_far_in_past"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(client, "cus_1", "1", timestamp=NOW + 301)
    assert exc.value.code == "timestamp_in_future"
    _meter_event(client, "cus_1", "1", timestamp=NOW - 34 * 86400)
    _meter_event(client, "cus_1", "1", timestamp=NOW + 299)
    assert len(fake.meter_events) == 2


def test_fake_clock_follows_freezegun(server: LoopbackServer, client: stripe.StripeClient):
    fake = server.app
    assert isinstance(fake, FakeStripe)
    fake.clock = FakeStripe().clock  # default: time.time looked up at call time
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    with freeze_time(FROZEN):
        event = _meter_event(client, "cus_1", "1")
        assert event.timestamp == NOW and event.created == NOW
        with pytest.raises(stripe.InvalidRequestError):
            _meter_event(client, "cus_1", "1", timestamp=NOW - 40 * 86400)


def test_idempotent_replay_and_mismatch(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    first = _meter_event(client, "cus_1", "3", identifier="e1", idempotency_key="k1")
    again = _meter_event(client, "cus_1", "3", identifier="e1", idempotency_key="k1")
    assert again.to_dict() == first.to_dict()
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert len(fake.meter_events) == 1
    with pytest.raises(stripe.IdempotencyError):
        _meter_event(client, "cus_1", "4", identifier="e1", idempotency_key="k1")
    assert len(fake.meter_events) == 1


def test_duplicate_identifier_is_refused_as_stripe_refuses_it(client: stripe.StripeClient, fake: FakeStripe):
    """https://docs.stripe.com/api/billing/meter-event/create: "We will enforce uniqueness within a rolling period of
    at least 24 hours." The docs do not give the refusal; this is Stripe's as seen in the wild
    (shared/api-notes.md): a 400 invalid_request_error naming the identifier, without a `code`."""
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    original = _meter_event(client, "cus_1", "3", identifier="dup")
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(client, "cus_1", "9", identifier="dup")
    assert exc.value.http_status == 400
    assert exc.value.error is not None and exc.value.error.type == "invalid_request_error"
    assert exc.value.code is None
    assert exc.value.user_message == "An event already exists with identifier dup."
    assert [e.value for e in fake.meter_events] == [Decimal(3)]  # the event Stripe holds keeps its own quantity
    fake.duplicate_identifier_response = "ignore"
    ignored = _meter_event(client, "cus_1", "9", identifier="dup")
    assert ignored.payload["value"] == "3" and ignored.created == original.created
    assert [e.value for e in fake.meter_events] == [Decimal(3)]


def test_duplicate_identifier_window_is_24h(server: LoopbackServer, fake: FakeStripe, client):
    now = [NOW]
    fake.clock = lambda: now[0]
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    _meter_event(client, "cus_1", "1", identifier="same")
    now[0] += 24 * 3600 + 1
    _meter_event(client, "cus_1", "1", identifier="same")
    assert len(fake.meter_events) == 2


def test_unknown_meter_or_customer_is_accepted_but_rejected(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    client.v1.billing.meter_events.create(
        params={"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_1", "value": "1"}}
    )
    _meter_event(client, "cus_ghost", "1")
    assert fake.meter_events == []
    assert [e.reason for e in fake.rejected_meter_events] == ["no_meter", "meter_event_customer_not_found"]


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


def test_async_rejections_become_thin_meter_error_events(client: stripe.StripeClient, fake: FakeStripe, thin_receiver):
    # https://docs.stripe.com/api/v2/core/events/event-types: both meter error events are thin events; the pushed
    # body has no `data` (https://docs.stripe.com/event-destinations#thin-events), GET /v2/core/events/{id} returns
    # it with `data` (https://docs.stripe.com/api/v2/core/events/object), signed per destination.
    url, received = thin_receiver
    fake.add_customer(id="cus_1")
    meter = fake.add_meter("api_calls")
    fake.add_event_destination(url, "whsec_thin")
    _meter_event(client, "cus_ghost", "1", identifier="idem-ghost")
    client.v1.billing.meter_events.create(
        params={"event_name": "no_such_meter", "identifier": "idem-nometer", "payload": {"stripe_customer_id": "cus_1"}}
    )
    assert fake.flush_meter_error_reports() != [] and fake.flush_meter_error_reports() == []  # each reported once

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
    notification = client.parse_event_notification(body, signature, "whsec_thin", tolerance=0)
    with pytest.raises(stripe.SignatureVerificationError):
        client.parse_event_notification(body, signature, "whsec_other", tolerance=0)

    report = notification.fetch_event()  # GET /v2/core/events/{id}
    assert report.type == "v1.billing.meter.error_report_triggered"
    error_type = report.data.reason.error_types[0]
    assert report.data.reason.error_count == 1 and error_type.code == "meter_event_customer_not_found"
    assert error_type.sample_errors[0].request.identifier == "idem-ghost"
    assert report.data.validation_start <= report.data.validation_end

    no_meter = json.loads(pushed["v1.billing.meter.no_meter_found"][0])
    assert "data" not in no_meter and "related_object" not in no_meter
    fetched = client.v2.core.events.retrieve(no_meter["id"]).to_dict()
    assert fetched["data"]["reason"]["error_types"][0]["code"] == "no_meter"
    assert fetched["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"] == "idem-nometer"

    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v2.core.events.retrieve("evt_test_unknown")
    assert missing.value.http_status == 404


def test_event_summaries_sum_last_count(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_customer(id="cus_2")
    meters = {f: fake.add_meter(f"ev_{f}", formula=f) for f in ("sum", "last", "count")}
    start, end = NOW - 3600, NOW
    rows = [("5", start), ("7", start + 120), ("2", start + 60), ("100", end)]  # the last one is outside
    for formula in meters:
        for i, (value, ts) in enumerate(rows):
            client.v1.billing.meter_events.create(
                params={
                    "event_name": f"ev_{formula}",
                    "identifier": f"{formula}-{i}",
                    "timestamp": min(ts, NOW),
                    "payload": {"stripe_customer_id": "cus_1", "value": value},
                }
            )
    client.v1.billing.meter_events.create(
        params={
            "event_name": "ev_sum",
            "timestamp": start,
            "payload": {"stripe_customer_id": "cus_2", "value": "50"},
        }
    )

    def summary(formula: str) -> float:
        res = client.v1.billing.meters.event_summaries.list(
            meters[formula]["id"], params={"customer": "cus_1", "start_time": start, "end_time": end}
        )
        (only,) = res.data
        assert only.object == "billing.meter_event_summary"
        assert (only.start_time, only.end_time, only.meter) == (start, end, meters[formula]["id"])
        return only.aggregated_value

    assert summary("sum") == 14
    assert summary("last") == 7
    assert summary("count") == 3
    assert fake.meter_total("cus_1", "ev_sum", start, end + 60) == Decimal(114)
    assert fake.meter_total("cus_2", "ev_sum", start, end) == Decimal(50)


def test_event_summaries_grouping_and_alignment(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    meter = fake.add_meter("api_calls")
    hour0 = NOW - 3 * 3600
    for i, ts in enumerate([hour0 + 10, hour0 + 20, hour0 + 2 * 3600 + 5]):
        _meter_event(client, "cus_1", "2", identifier=f"g{i}", timestamp=ts)
    res = client.v1.billing.meters.event_summaries.list(
        meter["id"],
        params={"customer": "cus_1", "start_time": hour0, "end_time": NOW, "value_grouping_window": "hour"},
    )
    assert [(s.start_time, s.aggregated_value) for s in res.data] == [(hour0 + 7200, 2), (hour0, 4)]
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.billing.meters.event_summaries.list(
            meter["id"], params={"customer": "cus_1", "start_time": hour0 + 1, "end_time": NOW}
        )
    assert exc.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.event_summaries.list(
            meter["id"],
            params={
                "customer": "cus_1",
                "start_time": hour0 + 60,
                "end_time": NOW,
                "value_grouping_window": "hour",
            },
        )
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.raw_request("get", f"/v1/billing/meters/{meter['id']}/event_summaries", customer="cus_1")
    assert exc.value.param == "start_time"


def test_event_time_window_keeps_newest_event_per_window(client: stripe.StripeClient, fake: FakeStripe):
    now = [NOW]
    fake.clock = lambda: now[0]
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls", formula="sum", event_time_window="hour")
    hour = NOW - 7200
    _meter_event(client, "cus_1", "10", identifier="a", timestamp=hour + 30)
    now[0] += 1
    _meter_event(client, "cus_1", "4", identifier="b", timestamp=hour + 10)  # newer, earlier timestamp
    _meter_event(client, "cus_1", "1", identifier="c", timestamp=hour + 3600)
    assert fake.meter_total("cus_1", "api_calls", hour, NOW) == Decimal(5)


# -- legacy usage records ------------------------------------------------------------------------


def _legacy_item(fake: FakeStripe, *, meter: str | None = None) -> str:
    fake.add_customer(id="cus_1")
    price = fake.add_price(meter=meter)
    sub = fake.add_subscription(
        "cus_1", [price["id"]], current_period_start=PERIOD_START, current_period_end=PERIOD_END
    )
    return sub["items"]["data"][0]["id"]


def _usage(client: stripe.StripeClient, item: str, version: str | None = LEGACY, **params):
    if version is not None:
        params["stripe_version"] = version
    resp = client.raw_request("post", f"/v1/subscription_items/{item}/usage_records", **params)
    return client.deserialize(resp, api_mode="V1")


def test_legacy_usage_version_gate(client: stripe.StripeClient, fake: FakeStripe):
    item = _legacy_item(fake)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _usage(client, item, version=None, quantity=1, timestamp=NOW)
    assert "2025-03-31" in str(exc.value.user_message)
    with pytest.raises(stripe.InvalidRequestError):
        _usage(client, item, version="2025-03-31.basil", quantity=1, timestamp=NOW)
    assert fake.usage_record_total(item) == 0
    record = _usage(client, item, quantity=1, timestamp=NOW)
    assert record.object == "usage_record" and record.subscription_item == item


def test_legacy_usage_set_and_increment(client: stripe.StripeClient, fake: FakeStripe):
    item = _legacy_item(fake)
    ts = PERIOD_START + 1
    rec = _usage(client, item, quantity=3, action="set", timestamp=ts)
    assert (rec.quantity, rec.timestamp, rec.livemode) == (3, ts, False)
    assert rec.id.startswith("mbur_")
    _usage(client, item, quantity=5, action="set", timestamp=ts)
    assert fake.usage_record_total(item) == 5
    _usage(client, item, quantity=2, timestamp=ts)  # default action: increment
    _usage(client, item, quantity=1, action="increment", timestamp="now")
    assert fake.usage_record_total(item) == 8
    summaries = client.deserialize(
        client.raw_request("get", f"/v1/subscription_items/{item}/usage_record_summaries", stripe_version=LEGACY),
        api_mode="V1",
    )
    (summary,) = summaries.data
    assert summary.object == "usage_record_summary" and summary.total_usage == 8
    assert summary.period.start == PERIOD_START and summary.period.end == PERIOD_END
    assert summary.invoice is None


def test_legacy_usage_timestamp_and_price_rules(client: stripe.StripeClient, fake: FakeStripe):
    item = _legacy_item(fake)
    for bad_ts in (PERIOD_START, PERIOD_START - 1, NOW + 60):
        with pytest.raises(stripe.InvalidRequestError) as exc:
            _usage(client, item, quantity=1, action="set", timestamp=bad_ts)
        assert "timestamps must be after the subscription's last invoice period" in str(exc.value.user_message)
    with pytest.raises(stripe.InvalidRequestError):
        _usage(client, item, quantity=-1, timestamp=NOW)
    with pytest.raises(stripe.InvalidRequestError):
        _usage(client, item, quantity=1, action="replace", timestamp=NOW)
    assert fake.usage_record_total(item) == 0


def test_legacy_usage_refused_for_meter_backed_price(client: stripe.StripeClient, fake: FakeStripe):
    meter = fake.add_meter("api_calls")
    item = _legacy_item(fake, meter=meter["id"])
    with pytest.raises(stripe.InvalidRequestError):
        _usage(client, item, quantity=1, timestamp=NOW)


# -- fault injection -----------------------------------------------------------------------------


def test_fault_before_apply_stores_nothing(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    fake.inject_fault("POST", "/v1/billing/meter_events", 500)
    with pytest.raises(stripe.APIError) as exc:
        _meter_event(client, "cus_1", "1", identifier="f1", idempotency_key="fk")
    assert exc.value.http_status == 500
    assert fake.meter_events == []
    event = _meter_event(client, "cus_1", "1", identifier="f1", idempotency_key="fk-2")  # fault used up
    assert event.identifier == "f1" and len(fake.meter_events) == 1


def test_lost_response_then_idempotent_retry(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    fake.inject_fault("POST", "/v1/billing/meter_events", DROP_CONNECTION, after_apply=True)
    with pytest.raises(stripe.APIConnectionError):
        _meter_event(client, "cus_1", "1", identifier="lost", idempotency_key="k-lost")
    assert len(fake.meter_events) == 1  # applied although the client got no answer
    retry = _meter_event(client, "cus_1", "1", identifier="lost", idempotency_key="k-lost")
    assert retry.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(fake.meter_events) == 1
    # A retry without the key hits the identifier check instead.
    with pytest.raises(stripe.InvalidRequestError) as exc:
        _meter_event(client, "cus_1", "1", identifier="lost")
    assert exc.value.user_message == "An event already exists with identifier lost."


@pytest.mark.parametrize("applied", [False, True], ids=["before-apply", "after-apply"])
def test_a_5xx_is_saved_to_its_idempotency_key_and_replayed(
    client: stripe.StripeClient, fake: FakeStripe, applied: bool
):
    """https://docs.stripe.com/api/idempotent_requests: "Stripe saves the status code and body of the first request
    made with a given idempotency key after endpoint execution begins. Retries with the same key return the saved
    response, including 500 errors." Only a fresh key gets past it."""
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    fake.inject_fault("POST", "/v1/billing/meter_events", 500, after_apply=applied)
    with pytest.raises(stripe.APIError) as first:
        _meter_event(client, "cus_1", "1", identifier="e5", idempotency_key="k5")
    with pytest.raises(stripe.APIError) as retry:
        _meter_event(client, "cus_1", "1", identifier="e5", idempotency_key="k5")
    assert retry.value.http_status == 500
    assert retry.value.headers["Idempotent-Replayed"] == "true"
    assert retry.value.headers["Original-Request"] == first.value.request_id
    assert len(fake.meter_events) == int(applied)  # the replay applied nothing
    if applied:
        with pytest.raises(stripe.InvalidRequestError) as duplicate:
            _meter_event(client, "cus_1", "1", identifier="e5", idempotency_key="k5-1")
        # the identifier still deduplicates the event
        assert duplicate.value.user_message == "An event already exists with identifier e5."
    else:
        assert _meter_event(client, "cus_1", "1", identifier="e5", idempotency_key="k5-1").identifier == "e5"
    assert len(fake.meter_events) == 1


def test_a_5xx_does_not_replace_the_answer_a_key_already_holds(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    first = _meter_event(client, "cus_1", "1", identifier="e6", idempotency_key="k6")
    fake.inject_fault("POST", "/v1/billing/meter_events", 503)
    with pytest.raises(stripe.APIError):
        _meter_event(client, "cus_1", "1", identifier="e6", idempotency_key="k6")
    again = _meter_event(client, "cus_1", "1", identifier="e6", idempotency_key="k6")
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
    server: LoopbackServer, fake: FakeStripe, status: int, delay_seconds: float, error: type[Exception]
):
    """https://docs.stripe.com/api/idempotent_requests saves results "only after the execution of an endpoint
    begins": a request that never reached it can be retried with the same key."""
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    fake.inject_fault("POST", "/v1/billing/meter_events", status, delay_seconds=delay_seconds)
    http = stripe.RequestsClient(timeout=0.3)
    client = stripe.StripeClient(
        "sk_test_sandbox", base_addresses={"api": server.url}, max_network_retries=0, http_client=http
    )
    try:
        with pytest.raises(error):
            _meter_event(client, "cus_1", "1", identifier="e7", idempotency_key="k7")
        retry = _meter_event(client, "cus_1", "1", identifier="e7", idempotency_key="k7")
    finally:
        http.close()
    assert retry.last_response.headers.get("Idempotent-Replayed") is None
    assert len(fake.meter_events) == 1


def test_fault_times_headers_and_body(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.inject_fault(
        "GET",
        "/v1/customers",
        429,
        headers={"Retry-After": "7"},
        body={"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "slow down"}},
        times=2,
    )
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError) as exc:
            client.v1.customers.retrieve("cus_1")
        assert exc.value.headers["Retry-After"] == "7"
        assert exc.value.user_message == "slow down"
    assert client.v1.customers.retrieve("cus_1").id == "cus_1"


def test_reset_clears_everything(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    _meter_event(client, "cus_1", "1")
    fake.inject_fault("GET", "/", 500)
    fake.reset()
    assert fake.requests == [] and fake.meter_events == [] and fake.meters == {}
    assert client.v1.billing.meters.list().data == []  # no pending fault either


def test_concurrent_meter_events(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_1")
    fake.add_meter("api_calls")
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            _meter_event(client, "cus_1", "1", identifier=f"c{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fake.meter_total("cus_1", "api_calls", NOW - 60, NOW + 60) == Decimal(16)


def test_an_event_summary_end_time_in_the_future_is_refused(client: stripe.StripeClient, fake: FakeStripe):
    """https://docs.stripe.com/api/billing/meter-event-summary/list requires minute-aligned bounds and says nothing
    of an end_time in the future: the sandbox refuses one, the answer worse for a client that sends it."""
    fake.add_customer(id="cus_1")
    meter = fake.add_meter("api_calls")
    aligned = NOW - NOW % 60
    params = {"customer": "cus_1", "start_time": aligned - 3600, "end_time": aligned + 60}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.billing.meters.event_summaries.list(meter["id"], params=params)
    assert exc.value.param == "end_time"
    params["end_time"] = aligned
    assert client.v1.billing.meters.event_summaries.list(meter["id"], params=params).data[0].aggregated_value == 0


# -- summaries lag events (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api) ------------


def test_an_event_shows_in_event_summaries_only_once_the_summary_lag_has_passed(
    client: stripe.StripeClient, fake: FakeStripe, clock
):
    fake.clock = clock
    fake.summary_lag_seconds = 600
    fake.add_customer(id="cus_1")
    meter = fake.add_meter("api_calls")
    hour = NOW - 3600
    _meter_event(client, "cus_1", "5", identifier="early", timestamp=hour + 10)
    clock.now += 300
    _meter_event(client, "cus_1", "7", identifier="late", timestamp=hour + 20)

    def summarized(**grouping) -> list[float]:
        params = {"customer": "cus_1", "start_time": hour, "end_time": NOW, **grouping}
        return [s.aggregated_value for s in client.v1.billing.meters.event_summaries.list(meter["id"], params=params)]

    assert summarized() == [0] and summarized(value_grouping_window="hour") == []
    assert fake.meter_total("cus_1", "api_calls", hour, NOW) == 12  # what the invoice bills: every accepted event
    clock.now += 299
    assert summarized() == [0]  # the first event is 599 s old
    clock.now += 1
    assert summarized() == [5] and summarized(value_grouping_window="hour") == [5]
    clock.now += 300
    assert summarized() == [12]
    fake.reset()  # a fake shared between tests starts each one without a lag
    assert fake.summary_lag_seconds == 0


def test_a_usage_record_shows_in_usage_record_summaries_only_once_the_summary_lag_has_passed(
    client: stripe.StripeClient, fake: FakeStripe, clock
):
    fake.clock = clock
    fake.summary_lag_seconds = 600
    item = _legacy_item(fake)

    def total_usage() -> int:
        summaries = client.raw_request(
            "get", f"/v1/subscription_items/{item}/usage_record_summaries", stripe_version=LEGACY
        )
        return client.deserialize(summaries, api_mode="V1").data[0].total_usage

    _usage(client, item, quantity=3, action="set", timestamp=NOW)
    clock.now += 300
    _usage(client, item, quantity=5, action="set", timestamp=NOW)  # replaces the 3 at the same timestamp
    assert (total_usage(), fake.usage_record_total(item)) == (0, 5)
    clock.now += 300
    assert total_usage() == 3  # the set the summary shows, not yet the one that replaced it
    clock.now += 300
    assert total_usage() == 5
