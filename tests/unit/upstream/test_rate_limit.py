"""The client-side request budget, on a fake clock."""

from reconciler.upstream.rate_limit import RateLimiter


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_requests_are_spaced_by_the_budget():
    t = FakeTime()
    limiter = RateLimiter(4, 1.0, headroom=0, clock=t.clock, sleep=t.sleep)
    for _ in range(4):
        limiter.acquire()
    assert t.slept == [0.25, 0.25, 0.25]
    assert limiter.requests_per_second == 4


def test_requests_leave_headroom_for_network_jitter():
    t = FakeTime()
    limiter = RateLimiter(100, 1.0, headroom=0.05, clock=t.clock, sleep=t.sleep)
    for _ in range(101):
        limiter.acquire()
    assert t.now - 100.0 > 1.0  # the 101st request leaves after a full second: no window holds 101
    assert round(limiter.requests_per_second, 2) == 95.24


def test_replicas_split_the_budget_and_a_429_holds_everyone_off():
    t = FakeTime()
    limiter = RateLimiter(6, 1.0, headroom=0, clock=t.clock, sleep=t.sleep)
    limiter.share(3)
    assert limiter.requests_per_second == 2
    limiter.acquire()
    limiter.hold_off(5.0)
    limiter.acquire()
    assert t.slept == [5.0]
    limiter.share(1)
    assert limiter.requests_per_second == 6
