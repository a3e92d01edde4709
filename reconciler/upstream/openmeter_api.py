"""OpenMeter, through the official `openmeter` SDK, returning our own types.

The SDK's defaults are traps for a daemon: 300 s timeouts and its own retry loop. Both are set explicitly;
retries go through reconciler.upstream.retry so one budget covers every attempt.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

import openmeter
import orjson
from corehttp.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from reconciler.config import OpenMeterConfig
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.upstream.errors import PermanentError, RateLimitedError, TransientError, UpstreamError
from reconciler.upstream.rate_limit import RateLimiter
from reconciler.upstream.retry import call_with_retries
from reconciler.usage.measure import Need, total_of
from reconciler.usage.model import KnownMeter, UsageRow, UsageWindow

API = "openmeter"
METERS_PAGE = 100
T = TypeVar("T")


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


def usage_number(value: object, meter: str, subject: str) -> Decimal:
    """A usage value as a Decimal, or a PermanentError naming what OpenMeter answered: null, NaN and infinite
    values are never billed. (Whether a total is billable is decided on the total: reconciler.usage.measure.)"""
    number = None
    if isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    if number is None or not number.is_finite():
        raise PermanentError(
            API, f"meter {meter!r}, subject {subject!r}: OpenMeter answered a usage value of {value!r}, not billable"
        )
    return number


@lru_cache(maxsize=4096)  # every subject's rows of a query share their windows' bounds: parsed once each
def _timestamp(value: str) -> datetime:
    """An RFC 3339 timestamp of OpenMeter's ("2025-01-01T00:00:00Z"), aware."""
    return datetime.fromisoformat(value)


def _aggregation(meter: Any) -> str:
    return str(getattr(meter.aggregation, "value", meter.aggregation)).upper()


class OpenMeterGateway:
    def __init__(self, config: OpenMeterConfig, metrics: Metrics = NO_METRICS):
        self._config = config
        self._metrics = metrics
        self.limiter = RateLimiter(max(1, round(config.max_requests_per_second * 100)), 100.0)
        self._in_flight = threading.BoundedSemaphore(config.max_concurrency)
        self._client = openmeter.Client(
            endpoint=config.url,
            token=config.token.get_secret_value(),
            retry_total=0,
            connection_timeout=config.timeout_seconds,
            read_timeout=config.timeout_seconds,
        )

    def _call(self, what: str, operation: Callable[[], T], meter: str = "") -> T:
        """One request under the budget and the in-flight bound, retried; a 429 holds every request back."""
        secrets = (self._config.token.get_secret_value(),)

        def attempt() -> T:
            self.limiter.acquire()
            with self._in_flight, self._metrics.upstream_call(API):
                try:
                    return operation()
                except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
                    error = translate_error(exc, meter, secrets)
                    if isinstance(error, RateLimitedError):
                        self.limiter.hold_off(error.retry_after or 1.0)
                    raise error from None

        return call_with_retries(attempt, max_retries=self._config.max_retries, what=f"openmeter {what}")

    def meters(self) -> dict[str, KnownMeter]:
        """Every meter's id and aggregation (SUM, COUNT, MAX, ...), by slug."""
        found: dict[str, KnownMeter] = {}
        for page in itertools.count(1):
            meters = self._call("list meters", lambda p=page: self._client.meters.list(page=p, page_size=METERS_PAGE))
            new = {m.slug: KnownMeter(m.id, _aggregation(m)) for m in meters if m.slug not in found}
            found.update(new)
            # A short page is the last; a page that brings nothing new means the server ignores paging: stop
            # rather than ask for ever.
            if len(meters) < METERS_PAGE or not new:
                return found
        return found  # pragma: no cover - itertools.count never ends

    def query_rows(
        self,
        meter: str,
        subjects: Sequence[str],
        window: UsageWindow,
        window_size: str | None,
        time_zone: str,
        *,
        meter_id: str | None = None,
    ) -> list[UsageRow]:
        """The usage of `subjects` on `meter` (a slug; asked for by `meter_id` when given) over
        `[window.start, window.end)`, one row per subject (and per `window_size` window, if given) with data.
        Without `window_size`, OpenMeter aggregates the whole range, which is right for every aggregation (summing
        windows would be wrong for MAX, LATEST, UNIQUE_COUNT, ...). A value that cannot be billed is kept as the
        error that says so, for its subject alone."""

        # The query as a JSON body (queryMeterPost, shared/contracts/openmeter-openapi.yaml; OpenMeter's server
        # maps the GET query's parameters onto this same body and serves both alike): a hundred subjects in the URL
        # came to ~3 KB, which a proxy may refuse as too long and which urllib3 re-encoded character by character
        # about eight times a request.
        request = {
            "from": window.start,
            "to": window.end,
            "subject": list(subjects),
            "groupBy": ["subject"],
            **({"windowSize": window_size, "windowTimeZone": time_zone} if window_size else {}),
        }

        def query() -> Any:
            # The answer as plain JSON: the SDK's typed MeterQueryResult took half a warm cycle's CPU to build
            # (one model per row, every field through its deserializer), and we read four fields of each row.
            response = self._client.meters.query(
                meter_id or meter,
                request,  # type: ignore[arg-type]
                stream=True,
                cls=lambda pipeline_response, _body, _headers: pipeline_response.http_response,
            )
            try:
                return orjson.loads(response.read())
            except ValueError as exc:  # a proxy's error page, a cut-off body: worth asking again
                raise TransientError(API, f"meter {meter!r}: the query's answer is not JSON ({exc})") from None

        result = self._call("query", query, meter)
        only = subjects[0] if len(subjects) == 1 else None
        rows = []
        for row in result.get("data") or []:
            subject = row.get("subject") or only  # a single-subject answer may leave the subject out
            if subject is None:
                continue
            try:
                value: Decimal | PermanentError = usage_number(row.get("value"), meter, subject)
            except PermanentError as exc:
                value = exc
            rows.append(UsageRow(subject, _timestamp(row["windowStart"]), _timestamp(row["windowEnd"]), value))
        return rows

    def query_total(self, meter: str, subject: str, window: UsageWindow) -> Decimal:
        """One subject's billable usage on `meter` over the whole window. No rows means no usage."""
        return total_of(Need(meter, subject, window), self.query_rows(meter, [subject], window, None, "UTC"))

    def close(self) -> None:
        self._client.close()
