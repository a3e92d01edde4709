"""The app's internal subscription-sync endpoint (seed 004): `POST {userId, plan, status}` with an API key.

The body is a full state, not a change, so sending it again is harmless: retries and re-sends are safe.
"""

from __future__ import annotations

import httpx

from reconciler.config import PlansConfig
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.plans.desired import Entitlement
from reconciler.redact import redact
from reconciler.upstream.errors import PermanentError, RateLimitedError, TransientError
from reconciler.upstream.retry import call_with_retries

API = "app"


class EntitlementsGateway:
    def __init__(self, config: PlansConfig, metrics: Metrics = NO_METRICS):
        self._config = config
        self._metrics = metrics
        headers = {"Content-Type": "application/json"}
        if config.api_key is not None:
            headers[config.api_key_header] = config.api_key.get_secret_value()
        self._client = httpx.Client(headers=headers, timeout=config.timeout_seconds)

    def close(self) -> None:
        self._client.close()

    def send(self, entitlement: Entitlement) -> None:
        def attempt() -> None:
            with self._metrics.upstream_call(API):
                try:
                    response = self._client.post(self._config.sync_url, json=entitlement.payload())
                except httpx.HTTPError as exc:
                    raise TransientError(API, f"POST failed: {type(exc).__name__}") from None
                if response.is_success:
                    return
                detail = redact(response.text[:200], self._secrets())
                if response.status_code == 429:
                    wait = response.headers.get("Retry-After")
                    retry_after = float(wait) if wait and wait.isdigit() else None
                    raise RateLimitedError(API, detail, status=429, retry_after=retry_after)
                if response.status_code >= 500 or response.status_code == 408:
                    raise TransientError(API, detail, status=response.status_code)
                raise PermanentError(API, detail, status=response.status_code)

        call_with_retries(attempt, max_retries=self._config.max_retries, what="app subscription sync")

    def _secrets(self) -> tuple[str, ...]:
        return (self._config.api_key.get_secret_value(),) if self._config.api_key else ()
