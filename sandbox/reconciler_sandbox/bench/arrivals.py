"""Which endpoint every request a fake served went to, and when it arrived: what the floor and the limiter checks
(`floor.py`) are computed from. The fakes themselves keep only arrival times in a benchmark (`record_requests` off,
as a request log of 100,000s would weigh on the process serving them)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from reconciler_sandbox.httpserver import FakeService, RecordedRequest

_TEMPLATE_ID = re.compile(r"\\\{id\\\}")


class ArrivalLog:
    """Attached to a fake, records (arrival time, endpoint) of every request it serves (not of those it refused
    with a 429). The time is the fake's own, the one its limiters counted the request at; the endpoint is the
    fake's route template (`GET /v1/billing/meters/{id}/event_summaries`) for a fake that names its routes
    (Stripe's), else the method and `*`: such an API has one limiter."""

    def __init__(self, fake: FakeService) -> None:
        self._fake = fake
        self._endpoint = _endpoint_namer(fake)
        self.entries: list[tuple[float, str]] = []
        # The fake's recording hook, called under its lock just after the request's arrival time was appended
        # (FakeService._serve): record two fields instead of the whole request.
        fake._record = self._record  # type: ignore[method-assign]
        fake.record_requests = True

    @classmethod
    def of(cls, fake: FakeService) -> ArrivalLog:
        """The fake's log: the one attached to it already (a fake has one recording hook), else a new one."""
        attached = getattr(fake._record, "__self__", None)
        return attached if isinstance(attached, ArrivalLog) else cls(fake)

    def _record(self, request: RecordedRequest) -> None:
        arrivals = self._fake.arrivals
        self.entries.append((arrivals[-1], self._endpoint(request.method, request.path)))

    def clear(self) -> None:
        with self._fake.lock:
            self.entries.clear()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._fake.lock:
            return list(self.entries)

    def per_endpoint(self) -> dict[str, int]:
        return dict(sorted(Counter(endpoint for _, endpoint in self.snapshot()).items()))


def _endpoint_namer(fake: FakeService) -> Callable[[str, str], str]:
    routes = getattr(fake, "routes", None)
    if routes is None:
        return lambda method, _path: f"{method} *"
    patterns = []
    for route in routes():
        method, template = route.split(" ", 1)
        patterns.append((method, re.compile(_TEMPLATE_ID.sub("[^/]+", re.escape(template))), route))

    def name(method: str, path: str) -> str:
        for route_method, pattern, route in patterns:
            if route_method == method and pattern.fullmatch(path):
                return route
        return f"{method} {path}"

    return name
