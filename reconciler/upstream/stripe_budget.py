"""Client-side request budgets shaped like Stripe's limiters (https://docs.stripe.com/rate-limits).

Stripe counts every request against a global limit (live mode 100 operations/s, a sandbox 25) and against the
limit of its endpoint (each named operation: `GET /v1/customers/{id}` is one endpoint whatever the id; 25/s unless
noted). Calls to the meter events endpoint in live mode have a limit of their own, 1,000/s, and do not count
against the global one; in a sandbox they share it. Over any limit Stripe answers 429.

The v2 meter event stream (its own host) is limited apart as well in live mode: "up to 10,000 requests per second in
livemode" (https://docs.stripe.com/api/v2/billing/meter-event-stream/create). Neither that page nor the rate limits
page gives it a sandbox figure: there it is budgeted like any endpoint, within the global budget (the stricter
reading).

So a request waits for a slot in every budget it counts against at once: its endpoint's, and the global one (or,
live, the meter events or meter event stream budget alone). Slots are spaced evenly (`RateLimiter`'s rule), each
budget's at its own interval, and a request's slot is the first instant free in all of them, so no budget is ever
exceeded, whatever mix of endpoints the threads send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.upstream.rate_limit import JITTER_HEADROOM

METER_EVENTS = "POST /v1/billing/meter_events"
METER_EVENT_STREAM = "POST /v2/billing/meter_event_stream"


@dataclass(frozen=True)
class StripeBudgets:
    """Requests per second for the whole deployment (all replicas together)."""

    global_per_second: float
    endpoint_per_second: float  # each endpoint's, unless `endpoints` names it
    meter_events_per_second: float | None  # live: a budget of its own, outside the global one; None: shares it
    endpoints: dict[str, float] = field(default_factory=dict)  # "GET /v1/billing/meters/{id}/event_summaries": 10
    meter_event_stream_per_second: float | None = None  # live: the v2 stream's own budget; None: like any endpoint


class _Pace:
    def __init__(self, per_second: float, stretch: float):
        self.per_second = per_second
        self._stretch = stretch
        self.interval = 0.0
        self.next_slot = 0.0
        self.share(1)

    def share(self, replicas: int) -> None:
        self.interval = max(1, replicas) / self.per_second * self._stretch


class StripeBudget:
    def __init__(
        self,
        budgets: StripeBudgets,
        *,
        headroom: float = JITTER_HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.budgets = budgets
        self._stretch = 1 + headroom
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._replicas = 1
        self._global = _Pace(budgets.global_per_second, self._stretch)
        self._meter_events = (
            _Pace(budgets.meter_events_per_second, self._stretch) if budgets.meter_events_per_second else None
        )
        stream = budgets.meter_event_stream_per_second
        self._meter_event_stream = _Pace(stream, self._stretch) if stream else None
        self._endpoints: dict[str, _Pace] = {}

    def _paces(self, endpoint: str) -> list[_Pace]:
        """The budgets a request to `endpoint` counts against (under the lock)."""
        if endpoint == METER_EVENTS and self._meter_events is not None:
            return [self._meter_events]
        if endpoint == METER_EVENT_STREAM and self._meter_event_stream is not None:
            return [self._meter_event_stream]
        pace = self._endpoints.get(endpoint)
        if pace is None:
            pace = _Pace(self.budgets.endpoints.get(endpoint, self.budgets.endpoint_per_second), self._stretch)
            pace.share(self._replicas)
            self._endpoints[endpoint] = pace
        return [pace, self._global]

    def acquire(self, endpoint: str) -> float:
        """Waits for the request's slot and returns it (on the budget's clock): the first instant every budget it
        counts against has room for it."""
        with self._lock:
            now = self._clock()
            paces = self._paces(endpoint)
            slot = max(now, *(pace.next_slot for pace in paces))
            for pace in paces:
                pace.next_slot = slot + pace.interval
        if slot > now:
            self._sleep(slot - now)
        return slot

    def hold_off(self, seconds: float) -> None:
        """After a 429, which does not say which limiter refused: no request from any thread before `seconds`."""
        with self._lock:
            until = self._clock() + seconds
            for pace in self._all():
                pace.next_slot = max(pace.next_slot, until)

    def share(self, replicas: int) -> None:
        """Use 1/`replicas` of every budget: live replicas split Stripe's limits, which are per account."""
        with self._lock:
            self._replicas = max(1, replicas)
            for pace in self._all():
                pace.share(self._replicas)

    def _all(self) -> list[_Pace]:
        apart = [pace for pace in (self._meter_events, self._meter_event_stream) if pace is not None]
        return [self._global, *self._endpoints.values(), *apart]

    @property
    def global_per_second(self) -> float:
        return 1 / self._global.interval
