"""The benchmark's floor and limiter checks (reconciler_sandbox/bench/floor.py), and how the benchmark sets Stripe's
fake to its limiters and names the endpoint of each request it served."""

from __future__ import annotations

import pytest

from reconciler_sandbox.bench.arrivals import ArrivalLog
from reconciler_sandbox.bench.floor import (
    GLOBAL,
    METER_EVENT_STREAM,
    METER_EVENT_STREAM_ENDPOINT,
    METER_EVENTS,
    METER_EVENTS_ENDPOINT,
    Floor,
    OneLimit,
    Shape,
    StripeLimits,
    busiest,
    endpoint_limiter,
    floor,
    limiter_use,
)
from reconciler_sandbox.bench.measure import Conditions, apply_stripe_conditions
from reconciler_sandbox.stripe_fake import FakeStripe

SUBSCRIPTIONS = "GET /v1/subscriptions"
METERS = "GET /v1/billing/meters"
SUMMARIES = "GET /v1/billing/meters/{id}/event_summaries"
LIVE = StripeLimits(global_per_second=100, endpoint_per_second=25, meter_events_per_second=1000)
SANDBOX = StripeLimits(global_per_second=25, endpoint_per_second=25, meter_events_per_second=None)
OPENMETER = OneLimit("openmeter", 50)


def cold(items: int) -> dict[str, dict[str, int]]:
    """A cold usage cycle's requests: a meter event per item, the subscription pages, the meters; OpenMeter once
    per 100 subjects."""
    pages = -(-items // 100)
    return {
        "stripe": {METER_EVENTS_ENDPOINT: items, SUBSCRIPTIONS: pages, METERS: 1},
        "openmeter": {"POST *": pages},
    }


@pytest.mark.parametrize(
    ("requests", "limits", "latency", "shape", "seconds", "binding"),
    [
        # Live: meter events are limited apart (1,000/s) and bind over everything else.
        pytest.param(
            cold(10_000),
            {"stripe": LIVE, "openmeter": OPENMETER},
            {},
            Shape(),
            10.0,
            METER_EVENTS,
            id="live-meter-events-bind",
        ),
        # A Stripe sandbox: meter events count against the global 25/s (and their endpoint's 25/s): global first.
        pytest.param(
            cold(1000),
            {"stripe": SANDBOX, "openmeter": OPENMETER},
            {},
            Shape(),
            1011 / 25,
            GLOBAL,
            id="sandbox-global-binds",
        ),
        # Live, the v2 stream (https://docs.stripe.com/api/v2/billing/meter-event-stream/create): 100 meter events a
        # request, on a limiter of their own (10,000/s): the subscription pages' endpoint binds instead.
        pytest.param(
            {"stripe": {METER_EVENT_STREAM_ENDPOINT: 100, SUBSCRIPTIONS: 100, METERS: 1}},
            {"stripe": LIVE},
            {},
            Shape(),
            100 / 25,
            endpoint_limiter(SUBSCRIPTIONS),
            id="live-stream-apart",
        ),
        # A sandbox: the stream's requests count against the global limit and their endpoint's, like any call.
        pytest.param(
            {"stripe": {METER_EVENT_STREAM_ENDPOINT: 100, SUBSCRIPTIONS: 10}},
            {"stripe": SANDBOX},
            {},
            Shape(),
            110 / 25,
            GLOBAL,
            id="sandbox-stream-global",
        ),
        # Live, many calls over many endpoints each under 25/s, together over the global 100/s.
        pytest.param(
            {"stripe": {f"GET /v1/thing_{n}": 20 for n in range(10)}},
            {"stripe": LIVE},
            {},
            Shape(),
            200 / 100,
            GLOBAL,
            id="live-global-binds",
        ),
        # The read-back: one summary listing per period on one endpoint, 25/s.
        pytest.param(
            {"stripe": {SUMMARIES: 1000}},
            {"stripe": LIVE},
            {},
            Shape(),
            40.0,
            endpoint_limiter(SUMMARIES),
            id="endpoint-binds",
        ),
        # OpenMeter's one limiter: 1,000 queries at 50/s, Stripe nearly idle.
        pytest.param(
            {"stripe": {SUBSCRIPTIONS: 1}, "openmeter": {"POST *": 1000}},
            {"stripe": LIVE, "openmeter": OPENMETER},
            {},
            Shape(),
            20.0,
            "openmeter",
            id="openmeter-binds",
        ),
        # Live, 8 requests in flight at 40 ms: 200 a second at most, below meter events' 1,000.
        pytest.param(
            cold(1000),
            {"stripe": LIVE, "openmeter": OPENMETER},
            {"stripe": 0.040, "openmeter": 0.060},
            Shape(in_flight={"stripe": 8, "openmeter": 4}),
            1011 * 0.040 / 8,
            "stripe latency, 8 in flight",
            id="in-flight-binds",
        ),
        # A listing of 1,000 pages, each asked for once the one before is answered: 40 s at 40 ms, over 25/s's 40 s?
        # Equal: the limiter comes first among equals.
        pytest.param(
            {"stripe": {SUBSCRIPTIONS: 1000}},
            {"stripe": LIVE},
            {"stripe": 0.040},
            Shape(paged=[("stripe", SUBSCRIPTIONS)]),
            40.0,
            endpoint_limiter(SUBSCRIPTIONS),
            id="tie-limiter-first",
        ),
        pytest.param(
            {"stripe": {SUBSCRIPTIONS: 100}},
            {"stripe": LIVE},
            {"stripe": 0.060},
            Shape(paged=[("stripe", SUBSCRIPTIONS)]),
            6.0,
            f"pages of {SUBSCRIPTIONS}, one after another",
            id="paging-binds",
        ),
        # The naive loop: one request at a time, every latency added up.
        pytest.param(
            cold(1000),
            {"stripe": LIVE, "openmeter": OPENMETER},
            {"stripe": 0.040, "openmeter": 0.060},
            Shape(one_at_a_time=True),
            1011 * 0.040 + 10 * 0.060,
            "one request at a time",
            id="one-at-a-time-binds",
        ),
        # Moesif's limit is per minute: 10,000 reads at 500 a minute.
        pytest.param(
            {"moesif": {"GET *": 10_000}},
            {"moesif": OneLimit("moesif", 500, 60.0)},
            {},
            Shape(),
            1200.0,
            "moesif",
            id="per-minute",
        ),
        pytest.param({}, {"stripe": LIVE}, {}, Shape(), 0.0, "-", id="nothing"),
    ],
)
def test_floor_is_the_slowest_term_and_names_it(requests, limits, latency, shape, seconds, binding):
    result = floor(requests, limits, latency, shape)
    assert result.seconds == pytest.approx(seconds)
    assert result.binding == binding
    assert result.terms.get(binding, 0.0) == pytest.approx(seconds)


def test_floor_counts_each_request_against_every_limiter_of_its_endpoint():
    result = floor(cold(1000), {"stripe": LIVE, "openmeter": OPENMETER})
    assert result.terms == pytest.approx(
        {
            METER_EVENTS: 1.0,  # live meter events: their own limiter only, neither the global nor an endpoint's
            GLOBAL: 11 / 100,  # the 10 pages and the meter listing
            endpoint_limiter(SUBSCRIPTIONS): 10 / 25,
            endpoint_limiter(METERS): 1 / 25,
            "openmeter": 10 / 50,
        }
    )
    sandbox = floor(cold(1000), {"stripe": SANDBOX}).terms
    assert sandbox[GLOBAL] == pytest.approx(1011 / 25) and sandbox[endpoint_limiter(METER_EVENTS_ENDPOINT)] == 40.0
    assert METER_EVENTS not in sandbox


def test_an_endpoint_with_its_own_limit():
    limits = StripeLimits(endpoints={SUMMARIES: 10})
    assert floor({"stripe": {SUMMARIES: 100}}, {"stripe": limits}) == Floor(
        10.0, endpoint_limiter(SUMMARIES), {GLOBAL: 1.0, endpoint_limiter(SUMMARIES): 10.0}
    )


@pytest.mark.parametrize(
    ("arrivals", "window", "most"),
    [
        ([], 1.0, 0),
        ([0.0, 0.5, 0.999], 1.0, 3),
        ([0.0, 0.5, 1.0], 1.0, 2),  # [t, t + 1): the fakes forget a request exactly one window later
        ([0.0, 0.1, 0.2, 5.0, 5.1], 1.0, 3),
        ([float(s) for s in range(100)], 60.0, 60),
    ],
)
def test_busiest_window(arrivals, window, most):
    assert busiest(arrivals, window) == most


def test_limiter_use_flags_a_limiter_over_its_limit():
    limits = {"stripe": StripeLimits(global_per_second=3, endpoint_per_second=2, meter_events_per_second=5)}
    arrivals = {
        "stripe": [
            (0.0, SUBSCRIPTIONS),
            (0.1, METERS),
            (0.2, SUBSCRIPTIONS),
            (0.3, METER_EVENTS_ENDPOINT),
            (1.5, SUBSCRIPTIONS),
            (1.6, SUBSCRIPTIONS),
            (1.7, SUBSCRIPTIONS),  # three in one second: over the endpoint's 2
        ]
    }
    uses = limiter_use(arrivals, limits)
    assert {name: (use.requests, use.busiest, use.exceeded) for name, use in uses.items()} == {
        GLOBAL: (6, 3, False),
        endpoint_limiter(SUBSCRIPTIONS): (5, 3, True),
        endpoint_limiter(METERS): (1, 1, False),
        METER_EVENTS: (1, 1, False),
    }


def test_the_fake_enforces_the_conditions_structure_and_the_log_names_its_endpoints():
    stripe = FakeStripe(api_key="sk_test_bench")
    conditions = Conditions(
        stripe_latency=0.0, stripe_global_per_second=5, stripe_endpoint_per_second=2, stripe_meter_events_per_second=4
    )
    apply_stripe_conditions(stripe, conditions)
    log = ArrivalLog(stripe)
    auth = {"Authorization": "Bearer sk_test_bench"}

    def status(method: str, path: str) -> int:
        return stripe.handle(method, path, {}, auth, b"")[0]

    assert [status("GET", "/v1/subscriptions") for _ in range(3)] == [200, 200, 429]  # the endpoint's 2
    # The global 5 (the refused request counted too, as the fake counts it).
    assert [status("GET", "/v1/billing/meters"), status("GET", "/v1/prices"), status("GET", "/v1/prices")] == [
        200,
        200,
        429,
    ]
    # Meter events are apart: four a second whatever the global limit holds (each a 400 here: no parameters).
    assert [status("POST", "/v1/billing/meter_events") for _ in range(5)] == [400, 400, 400, 400, 429]
    assert stripe.rate_limited == 3
    served = [SUBSCRIPTIONS] * 2 + [METERS, "GET /v1/prices"] + [METER_EVENTS_ENDPOINT] * 4
    assert [endpoint for _, endpoint in log.snapshot()] == served  # the 429s are not served
    assert log.per_endpoint() == {METERS: 1, "GET /v1/prices": 1, METER_EVENTS_ENDPOINT: 4, SUBSCRIPTIONS: 2}
    assert [at for at, _ in log.snapshot()] == stripe.arrivals  # the fake's own arrival times


def test_the_fake_named_paths_as_the_routes_templates():
    stripe = FakeStripe(api_key="sk_test_bench")
    log = ArrivalLog(stripe)
    stripe.handle("GET", "/v1/billing/meters/mtr_1/event_summaries", {}, {"Authorization": "Bearer sk_test_bench"}, b"")
    assert log.per_endpoint() == {SUMMARIES: 1}
    assert ArrivalLog.of(stripe) is log  # one log a fake: a second run over the same fake shares it


def test_the_meter_event_stream_has_its_own_limiter_live_and_shares_the_global_one_in_a_sandbox():
    # https://docs.stripe.com/api/v2/billing/meter-event-stream/create: 10,000 requests/s in live mode; the docs
    # give no sandbox figure, so there the stream counts like any endpoint (the fake does the same).
    assert [(lim.name, lim.allowed) for lim in LIVE.limiters_of(METER_EVENT_STREAM_ENDPOINT)] == [
        (METER_EVENT_STREAM, 10_000)
    ]
    assert [lim.name for lim in SANDBOX.limiters_of(METER_EVENT_STREAM_ENDPOINT)] == [
        GLOBAL,
        endpoint_limiter(METER_EVENT_STREAM_ENDPOINT),
    ]
