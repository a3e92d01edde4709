"""A client-side request budget: at most N requests per period, spaced evenly, shared by threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Requests leave evenly spaced but arrive with network jitter: spacing them 5% wider than the budget keeps every
# one-second window at the server within it (measured by `reconciler bench` and tests/integration/test_scale.py).
JITTER_HEADROOM = 0.05


class RateLimiter:
    """Spaces requests at least `period / max_requests` (plus `headroom`) apart; `acquire` sleeps until the next
    slot. With many threads in flight it is the budget, not the thread count, that sets the pace."""

    def __init__(
        self,
        max_requests: int,
        per_seconds: float,
        *,
        headroom: float = JITTER_HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._budget = (max_requests, per_seconds)
        self._stretch = 1 + headroom
        self._interval = per_seconds / max_requests * self._stretch
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Waits for the next slot and returns it (on the limiter's clock): the moment the budget let this request
        go, which a busy machine may delay the waking thread past but never brings forward."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if slot > now:
            self._sleep(slot - now)
        return slot

    def share(self, replicas: int) -> None:
        """Use 1/`replicas` of the budget: live replicas split each upstream API's request budget."""
        max_requests, per_seconds = self._budget
        with self._lock:
            self._interval = per_seconds * max(1, replicas) / max_requests * self._stretch

    @property
    def requests_per_second(self) -> float:
        return 1 / self._interval

    def hold_off(self, seconds: float) -> None:
        """After a 429: no request from any thread before `seconds` from now."""
        with self._lock:
            self._next_slot = max(self._next_slot, self._clock() + seconds)
