"""A run's floor under the upstream APIs' limiters, and whether the run kept within them. Pure: the benchmark feeds it
what the fakes recorded.

Stripe's limiters (https://docs.stripe.com/rate-limits; the product's `upstream/stripe_budget.py` models the same):
every request counts against a global limit (live 100/s, a sandbox 25/s) and against its endpoint's (an endpoint
is a method and a path template, `GET /v1/subscriptions`, `GET /v1/billing/meters/{id}/event_summaries`; 25/s
unless noted); in live mode meter events (`POST /v1/billing/meter_events`) have a limit of their own (1,000/s) and
do not count against the global one, and so does the v2 meter event stream (`POST /v2/billing/meter_event_stream`,
10,000 requests/s of up to 100 events each: https://docs.stripe.com/api/v2/billing/meter-event-stream/create).
OpenMeter and Moesif have one limiter each, named after the API.

The floor of a run is the least time its requests could have taken: the largest of

- each limiter's requests divided by its rate (what the limiter lets through in a second, at best);
- the latency-bound terms that apply to the run's shape: an API's requests × its latency ÷ the most the run keeps
  in flight at once (Little's law); a paged listing's pages × the latency (a cursor names the next page only once
  the previous one is answered); for a run that makes one request at a time (the naive loop, the read-back), every
  request's latency added up.

The term that sets it names the *binding* limiter. A lower bound, not a prediction: the terms overlap in time, so a
run can approach the floor only when one of them dominates.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

GLOBAL = "global"
METER_EVENTS = "meter events"
METER_EVENTS_ENDPOINT = "POST /v1/billing/meter_events"
METER_EVENT_STREAM = "meter event stream"
METER_EVENT_STREAM_ENDPOINT = "POST /v2/billing/meter_event_stream"


def endpoint_limiter(endpoint: str) -> str:
    """The name of an endpoint's own limiter: `endpoint GET /v1/subscriptions`."""
    return f"endpoint {endpoint}"


@dataclass(frozen=True)
class Limiter:
    """`allowed` requests in any `window` seconds; over that the API answers 429."""

    name: str
    allowed: int
    window: float = 1.0

    @property
    def per_second(self) -> float:
        return self.allowed / self.window


class ApiLimits(Protocol):
    def limiters_of(self, endpoint: str) -> list[Limiter]:
        """The limiters a request to `endpoint` counts against."""
        ...


@dataclass(frozen=True)
class StripeLimits:
    """Stripe's limiter structure. `meter_events_per_second`: live mode's own limit for meter events, outside the
    global one; None for a sandbox, where meter events, and the meter event stream's requests, count against the
    global limit and their endpoint's. `meter_event_stream_per_second`: the stream's own limit, live."""

    global_per_second: float = 100
    endpoint_per_second: float = 25
    meter_events_per_second: float | None = 1000
    meter_event_stream_per_second: float = 10_000
    endpoints: Mapping[str, float] = field(default_factory=dict)  # an endpoint with a limit of its own

    @property
    def live(self) -> bool:
        return self.meter_events_per_second is not None

    def limiters_of(self, endpoint: str) -> list[Limiter]:
        if endpoint == METER_EVENTS_ENDPOINT and self.meter_events_per_second is not None:
            return [Limiter(METER_EVENTS, _allowed(self.meter_events_per_second))]
        if endpoint == METER_EVENT_STREAM_ENDPOINT and self.live:
            return [Limiter(METER_EVENT_STREAM, _allowed(self.meter_event_stream_per_second))]
        rate = self.endpoints.get(endpoint, self.endpoint_per_second)
        return [Limiter(GLOBAL, _allowed(self.global_per_second)), Limiter(endpoint_limiter(endpoint), _allowed(rate))]


@dataclass(frozen=True)
class OneLimit:
    """An API with one limiter over all its requests (OpenMeter's, Moesif's), named after the API."""

    name: str
    allowed: int
    window: float = 1.0

    def limiters_of(self, endpoint: str) -> list[Limiter]:
        return [Limiter(self.name, self.allowed, self.window)]


def _allowed(per_second: float) -> int:
    """What a one-second window of a `per_second` limit lets through (the fakes count whole requests)."""
    return max(1, int(per_second))


@dataclass(frozen=True)
class Shape:
    """How a run can overlap its requests, for the latency-bound terms."""

    # API -> the most requests the run keeps in flight at once (the product's `*.max_concurrency`).
    in_flight: Mapping[str, int] = field(default_factory=dict)
    # (API, endpoint) of cursor-paged listings: each page is asked for once the one before is answered.
    paged: Sequence[tuple[str, str]] = ()
    # Every request waits for the one before, whatever its API (the naive loop; the read-back).
    one_at_a_time: bool = False


@dataclass(frozen=True)
class Floor:
    seconds: float
    binding: str  # the term that sets it: a limiter's name, or a latency term's
    terms: dict[str, float]  # every limiter's and latency term's seconds


def floor(
    requests: Mapping[str, Mapping[str, int]],
    limits: Mapping[str, ApiLimits],
    latency: Mapping[str, float] | None = None,
    shape: Shape | None = None,
) -> Floor:
    """The floor of a run that made `requests` (API -> endpoint -> count) under `limits` (API -> its limiters),
    each API answering after `latency` seconds, overlapping its requests as `shape` says. Limiters come first
    among equal terms; an API without limits adds only latency terms."""
    latency = latency or {}
    shape = shape or Shape()
    counted: dict[str, int] = defaultdict(int)
    rates: dict[str, float] = {}
    for api, endpoints in requests.items():
        api_limits = limits.get(api)
        if api_limits is None:
            continue
        for endpoint, count in endpoints.items():
            for limiter in api_limits.limiters_of(endpoint):
                counted[limiter.name] += count
                rates[limiter.name] = limiter.per_second
    terms = {name: count / rates[name] for name, count in counted.items() if count}
    totals = {api: sum(endpoints.values()) for api, endpoints in requests.items()}
    if shape.one_at_a_time:
        terms["one request at a time"] = sum(count * latency.get(api, 0.0) for api, count in totals.items())
    for api, most in shape.in_flight.items():
        wait = latency.get(api, 0.0)
        if totals.get(api) and wait:
            terms[f"{api} latency, {most} in flight"] = totals[api] * wait / most
    for api, endpoint in shape.paged:
        pages = requests.get(api, {}).get(endpoint, 0)
        if pages and latency.get(api):
            terms[f"pages of {endpoint}, one after another"] = pages * latency[api]
    if not terms:
        return Floor(0.0, "-", {})
    binding = max(terms, key=lambda name: terms[name])  # the first of equals: limiters were added first
    return Floor(terms[binding], binding, terms)


@dataclass(frozen=True)
class LimiterUse:
    """One limiter over a run: the requests counted against it, its limit, and the most that arrived within any
    one of its windows (over the limit: the run exceeded it)."""

    requests: int
    allowed: int
    window_seconds: float
    busiest: int
    exceeded: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exceeded", self.busiest > self.allowed)


def limiter_use(
    arrivals: Mapping[str, Iterable[tuple[float, str]]], limits: Mapping[str, ApiLimits]
) -> dict[str, LimiterUse]:
    """Per limiter, from every request's (arrival time, endpoint) per API: how many counted against it and the most
    within any window of its length (a rolling window, as the fakes count)."""
    times: dict[str, list[float]] = defaultdict(list)
    limiters: dict[str, Limiter] = {}
    for api, requests in arrivals.items():
        api_limits = limits.get(api)
        if api_limits is None:
            continue
        for at, endpoint in requests:
            for limiter in api_limits.limiters_of(endpoint):
                times[limiter.name].append(at)
                limiters[limiter.name] = limiter
    return {
        name: LimiterUse(
            requests=len(stamps),
            allowed=limiters[name].allowed,
            window_seconds=limiters[name].window,
            busiest=busiest(sorted(stamps), limiters[name].window),
        )
        for name, stamps in sorted(times.items())
    }


def busiest(arrivals: Sequence[float], window: float) -> int:
    """The most of the sorted `arrivals` within any `window`-long half-open interval [t, t + window)."""
    return max((bisect.bisect_left(arrivals, at + window, lo=i) - i for i, at in enumerate(arrivals)), default=0)
