"""Bad input from the upstream APIs: each gets a clear error naming what was wrong and whom it concerns, the rest
of the cycle goes on, and nothing already recorded is lost. (Config and webhook bodies: test_config, test_cli,
test_webhooks; Moesif's answers: test_balances.)"""

from __future__ import annotations

import json
import threading

import pytest
from freezegun import freeze_time

from reconciler.upstream.openmeter_api import OpenMeterGateway
from tests.conftest import Harness, utc
from tests.integration.test_usage_sync import MID, seed, stripe_total, use


def query_path(h) -> str:
    """Where the product asks for `api_requests`: by the meter's id (see reconciler.ledger.meter_cache)."""
    return f"/api/v1/meters/{h.openmeter.meters['api_requests']['id']}/query"


def two_customers(h: Harness) -> None:
    """cus_bad on the api_requests meter (where the bad answers go), cus_good on tokens."""
    seed(h, customer="cus_bad", formula="sum")
    seed(h, customer="cus_good", event_name="tokens", formula="sum", om_meter="tokens")
    use(h, utc(2026, 3, 2), 10, customer="cus_bad")
    use(h, utc(2026, 3, 2), 7, customer="cus_good", meter="tokens")


def row(value: object) -> bytes:
    body = {
        "from": "2026-03-01T13:00:00Z",
        "to": "2026-03-10T12:00:00Z",
        "windowSize": None,
        "data": [
            {
                "value": value,
                "windowStart": "2026-03-01T13:00:00Z",
                "windowEnd": "2026-03-10T12:00:00Z",
                "subject": "cus_bad",
                "groupBy": {},
            }
        ],
    }
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize(
    "body",
    [row(None), row(-5), row(float("nan")), row(float("inf")), row(1e300), b'{"data": [{"val'],
    ids=["null", "negative", "nan", "infinite", "huge", "truncated"],
)
def test_an_unbillable_openmeter_answer_fails_that_customer_only(harness, body):
    h = harness
    two_customers(h)
    with freeze_time(MID) as clock:
        h.cycle()  # both synced: 10 and 7
        clock.tick(900)
        use(h, utc(2026, 3, 3), 5, customer="cus_bad")
        h.openmeter.inject_fault("POST", query_path(h), 200, body=body, times=10)
        result = h.cycle()
    assert result.summary.failed == 1
    assert "cus_bad" in result.summary.failures[0] and "api_requests" in result.summary.failures[0]
    assert stripe_total(h, "cus_bad") == 10  # what was already billed stays; nothing wrong was sent
    assert stripe_total(h, "cus_good", "tokens") == 7
    reports = h.rows("select state from usage_reports order by id")
    assert [r.state for r in reports] == ["sent", "sent"]


def test_a_stripe_list_that_never_ends_is_an_error_not_an_endless_loop(harness):
    h = harness
    seed(h)
    page = {
        "object": "list",
        "url": "/v1/subscriptions",
        "has_more": True,
        "data": [
            {
                "id": "sub_loop",
                "object": "subscription",
                "status": "active",
                "customer": "cus_A",
                "items": {"object": "list", "data": [], "has_more": False},
            }
        ],
    }
    h.stripe.inject_fault("GET", "/v1/subscriptions", 200, body=page, times=1000)
    with freeze_time(MID):
        result = h.cycle()
    assert result.summary.failed == 1
    assert "has_more is true but the page after sub_loop does not move on" in result.summary.failures[0]
    assert len([r for r in h.stripe.requests if r.path == "/v1/subscriptions"]) == 2


@pytest.mark.parametrize("ignores_paging", [False, True], ids=["pages", "every-meter-on-every-page"])
def test_openmeter_meters_are_listed_page_by_page_and_a_server_ignoring_pages_ends_the_listing(harness, ignores_paging):
    """A server that answers every page with the same meters must not keep the listing going for ever."""
    h = harness
    h.openmeter.ignores_paging = ignores_paging
    for i in range(150):
        h.openmeter.add_meter(f"meter_{i:03d}", aggregation="MAX" if i == 149 else "SUM")
    gateway = OpenMeterGateway(h.config.openmeter)
    found: list[dict] = []
    # A daemon thread: before the fix, with every meter on every page, the listing never ended.
    listing = threading.Thread(target=lambda: found.append(gateway.meters()), daemon=True)
    listing.start()
    listing.join(timeout=60)
    assert found, "the meter listing did not end"
    [meters] = found
    assert len(meters) == 150 and meters["meter_149"].aggregation == "MAX"
    assert len([r for r in h.openmeter.requests if r.path == "/api/v1/meters"]) == 2


def test_a_stripe_page_without_data_is_named(harness):
    seed(harness)
    harness.stripe.inject_fault("GET", "/v1/subscriptions", 200, body={"object": "list", "has_more": False})
    with freeze_time(MID):
        result = harness.cycle()
    assert result.summary.failed == 1
    assert "no list of data" in result.summary.failures[0]


@pytest.mark.parametrize(
    "status, body, named",
    [
        (200, b"<html>502 Bad Gateway</html>", "Invalid response body from API"),
        (
            401,
            {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_***"}},
            "Invalid API Key",
        ),
        (400, {"error": {"type": "invalid_request_error", "message": "No such price"}}, "No such price"),
    ],
    ids=["200-not-json", "401", "400"],
)
def test_a_stripe_page_that_is_not_json_or_not_a_success_is_named_as_the_sdk_names_it(harness, status, body, named):
    """Pages are decoded by orjson, not by the SDK (reconciler.upstream.stripe_api.StripeGateway._get_json); an
    answer that is not a success, or not JSON, still fails the listing with the SDK's own error and words."""
    seed(harness)
    harness.stripe.inject_fault("GET", "/v1/subscriptions", status, body=body, times=1000)
    with freeze_time(MID):
        result = harness.cycle()
    assert result.aborted and result.summary.failed == 1
    assert named in result.summary.failures[0], result.summary.failures


def test_a_stripe_page_is_read_whole_after_a_server_error(harness):
    seed(harness)
    use(harness, utc(2026, 3, 2), 5)
    harness.stripe.inject_fault("GET", "/v1/subscriptions", 500, times=1)
    with freeze_time(MID):
        result = harness.cycle()
    assert (result.aborted, result.summary.reported) == (False, 1)
    assert stripe_total(harness) == 5


def test_an_openmeter_meter_deleted_mid_cycle_fails_its_customers_and_keeps_their_ledger(harness):
    h = harness
    two_customers(h)
    with freeze_time(MID):
        h.cycle()
        h.openmeter.inject_fault("POST", query_path(h), 404, times=10)
        result = h.cycle()
    assert result.summary.failed == 1
    assert "meter 'api_requests' not found" in result.summary.failures[0]
    periods = h.rows("select customer_id, reported_total from usage_periods order by customer_id")
    assert [tuple(p) for p in periods] == [("cus_bad", 10), ("cus_good", 7)]
