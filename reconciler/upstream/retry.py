"""One retry policy for every upstream call: a fixed budget of attempts, exponential backoff with jitter,
and a 429's `Retry-After` honoured when the upstream sends one.

The SDKs' own retry loops are switched off (Stripe) or limited to connection setup (OpenMeter) so that this
budget is the only one: a call is tried at most `1 + max_retries` times, never `(1 + a) * (1 + b)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from reconciler.upstream.errors import RateLimitedError, TransientError

T = TypeVar("T")
log = structlog.get_logger(__name__)

MAX_BACKOFF_SECONDS = 30.0


def _wait(backoff: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            return min(error.retry_after, MAX_BACKOFF_SECONDS)
        return backoff(state)

    return wait


def call_with_retries(
    operation: Callable[[], T],
    *,
    max_retries: int,
    what: str,
    base_delay: float = 0.5,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Run `operation`, retrying TransientError up to `max_retries` times; re-raise the last error."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "upstream call failed, retrying",
            call=what,
            attempt=state.attempt_number,
            error=str(error),
            wait_seconds=round(state.upcoming_sleep, 2),
        )

    retrying = Retrying(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(max_retries + 1),
        wait=_wait(wait_random_exponential(multiplier=base_delay, max=MAX_BACKOFF_SECONDS)),
        before_sleep=before_sleep,
        reraise=True,
        sleep=sleep or time.sleep,
    )
    return retrying(operation)
