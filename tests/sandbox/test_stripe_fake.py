"""FakeStripe driven through the real stripe-python SDK over HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal

import pytest
import stripe
from freezegun import freeze_time

from reconciler_sandbox.httpserver import LoopbackServer
from reconciler_sandbox.stripe_fake import FakeStripe, parse_stripe_params
from tests.sandbox.conftest import stripe_sdk

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
    with stripe_sdk(server.url) as client:
        yield client


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
            bad.v1.customers.retrieve("cus_1")
    finally:
        http.close()


def test_unknown_url_is_404(client: stripe.StripeClient):
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.raw_request("get", "/v1/nonsense")
    assert exc.value.http_status == 404
    assert "Unrecognized request URL (GET: /v1/nonsense)." in str(exc.value.user_message)


def test_customers_retrieve(client: stripe.StripeClient, fake: FakeStripe):
    fake.add_customer(id="cus_a", metadata={"tier": "gold"}, balance=-500)
    cust = client.v1.customers.retrieve("cus_a")
    assert cust["balance"] == -500 and cust["metadata"]["tier"] == "gold"
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
    (item,) = client.v1.subscription_items.list(params={"subscription": sid}).data
    assert (item.id, item.current_period_start) == (item_id, PERIOD_END)
    fake.update_subscription(sid, current_period_start=1, current_period_end=2)
    assert client.v1.subscription_items.list(params={"subscription": sid}).data[0].current_period_end == 2


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
    got = {m.id: m for m in meters}
    assert got[inactive["id"]].value_settings.event_payload_key == "n"
    assert got[inactive["id"]].customer_mapping.event_payload_key == "cust"
    assert got[inactive["id"]].status_transitions.deactivated_at == NOW
    assert got[active["id"]].event_time_window == "hour"


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


# -- summaries lag events (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api) ------------
