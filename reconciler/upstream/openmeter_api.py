"""OpenMeter, through the official `openmeter` SDK, returning our own types.

The SDK's defaults are traps for a daemon: 300 s timeouts and its own retry loop. Both are set explicitly;
retries go through reconciler.upstream.retry so one budget covers every attempt.
"""

from __future__ import annotations

import json
from decimal import Decimal

import openmeter
from corehttp.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from reconciler.config import OpenMeterConfig
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.upstream.errors import PermanentError, RateLimitedError, TransientError, UpstreamError
from reconciler.upstream.rate_limit import RateLimiter
from reconciler.upstream.retry import call_with_retries
from reconciler.usage.model import UsageWindow

API = "openmeter"


def _problem_detail(exc: HttpResponseError) -> str:
    """The `detail` (or `title`) of an application/problem+json body, else the exception's message."""
    try:
        body = json.loads(exc.response.text()) if exc.response is not None else {}
        return str(body.get("detail") or body.get("title") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason or exc.message)


def translate_error(exc: Exception, meter: str, secrets: tuple[str, ...] = ()) -> UpstreamError:
    """Map an SDK/corehttp exception onto our taxonomy (reconciler.upstream.errors), secrets removed."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        detail = redact(_problem_detail(exc), secrets)
        if status == 429:
            retry_after = exc.response.headers.get("Retry-After") if exc.response is not None else None
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            return RateLimitedError(API, detail, status=status, retry_after=wait)
        if status >= 500 or status == 408:
            return TransientError(API, detail, status=status)
        if status == 404:
            return PermanentError(API, f"meter {meter!r} not found: {detail}", status=status)
        if status in (401, 403):
            return PermanentError(API, f"token refused: {detail}", status=status)
        return PermanentError(API, f"query on meter {meter!r} refused: {detail}", status=status)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return TransientError(API, f"connection failed: {type(exc).__name__}")
    return TransientError(API, redact(f"{type(exc).__name__}: {exc}", secrets))


# Far above any real total, and far below what the ledger's 64-bit integers hold.
MAX_BILLABLE_TOTAL = Decimal(10) ** 15


def billable(value: object, meter: str, subject: str) -> Decimal:
    """A usage value as a Decimal, or a PermanentError naming what OpenMeter answered: null, NaN, infinite,
    negative and absurdly large values are never billed."""
    number = None
    if isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    if number is None or not number.is_finite() or number < 0 or number > MAX_BILLABLE_TOTAL:
        raise PermanentError(
            API, f"meter {meter!r}, subject {subject!r}: OpenMeter answered a usage value of {value!r}, not billable"
        )
    return number


class OpenMeterGateway:
    def __init__(self, config: OpenMeterConfig, metrics: Metrics = NO_METRICS):
        self._config = config
        self._metrics = metrics
        self.limiter = RateLimiter(max(1, round(config.max_requests_per_second * 100)), 100.0)
        self._client = openmeter.Client(
            endpoint=config.url,
            token=config.token.get_secret_value(),
            retry_total=0,
            connection_timeout=config.timeout_seconds,
            read_timeout=config.timeout_seconds,
        )

    def query_total(self, meter: str, subject: str, window: UsageWindow) -> Decimal:
        """The subject's usage on `meter` over `[window.start, window.end)`, one value for the whole window.

        No `windowSize`: OpenMeter aggregates the whole range itself, which is right for every aggregation
        (summing windows would be wrong for MAX, LATEST, UNIQUE_COUNT, ...). No rows means no usage.
        """

        def attempt() -> Decimal:
            self.limiter.acquire()
            with self._metrics.upstream_call(API):
                try:
                    result = self._client.meters.query_json(
                        meter, from_parameter=window.start, to=window.end, subject=[subject]
                    )
                except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
                    raise translate_error(exc, meter, (self._config.token.get_secret_value(),)) from None
            values = (row.value for row in (result.data or []) if row.subject in (subject, None))
            return sum((billable(value, meter, subject) for value in values), Decimal(0))

        return call_with_retries(attempt, max_retries=self._config.max_retries, what=f"openmeter query {meter}")

    def close(self) -> None:
        self._client.close()
