"""Moesif's Management API over httpx (Moesif has no Python SDK for it), returning our own types.

Moesif answers a balance transaction with 204 and no body, and does not document what it does with a repeated
`transaction_id`. Unless `moesif.deduplicates_transaction_ids` says it ignores repeats, a POST whose outcome is
unknown is not retried: resending could credit twice. A request that never reached Moesif (connection refused,
429) is always safe to retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from reconciler.balances.model import MoesifBalance
from reconciler.balances.money import moesif_number
from reconciler.config import MoesifConfig
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.upstream.errors import (
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UpstreamError,
)
from reconciler.upstream.rate_limit import RateLimiter
from reconciler.upstream.retry import call_with_retries

API = "moesif"


@dataclass(frozen=True)
class BalanceTransaction:
    company_id: str
    subscription_id: str
    amount: Decimal  # currency units, positive
    currency: str
    type: str  # credit | debit
    transaction_id: str
    description: str


@dataclass(frozen=True)
class PostOutcome:
    """How a POST went: `had_unknown_outcome` when an attempt failed in a way that may have applied it."""

    had_unknown_outcome: bool


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _amount(balance: dict[str, Any], name: str, *, missing_is_zero: bool = False) -> Decimal:
    """A balance field as a finite Decimal; a missing or null balance is an error, never a silent zero."""
    value = balance.get(name)
    if value is None and missing_is_zero:
        return Decimal(0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"balance.{name} is {value!r}")
    amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"balance.{name} is {value!r}")
    return amount


class _DoNotResend(Exception):
    """Ends the retry loop: the POST may have been applied and Moesif may not ignore a repeat."""

    def __init__(self, error: OutcomeUnknownError):
        super().__init__(str(error))
        self.error = error


class MoesifGateway:
    def __init__(self, config: MoesifConfig, *, limiter: RateLimiter | None = None, metrics: Metrics = NO_METRICS):
        self._config = config
        self._metrics = metrics
        self.limiter = limiter or RateLimiter(config.max_requests_per_minute, 60.0)
        self._client = httpx.Client(
            base_url=f"{config.url}/v1",
            headers={"Authorization": config.authorization, "Accept": "application/json"},
            timeout=config.timeout_seconds,
        )

    def close(self) -> None:
        self._client.close()

    def _secrets(self) -> tuple[str, ...]:
        return (self._config.management_token.get_secret_value(), self._config.authorization)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        unknown_if_lost: bool,
        before_send: Callable[[], None] | None = None,
    ) -> httpx.Response:
        self.limiter.acquire()
        if before_send is not None:
            before_send()  # after the wait for the budget, which may be long: the request leaves right after
        with self._metrics.upstream_call(API):
            return self._attempt(method, path, json=json, unknown_if_lost=unknown_if_lost)

    def _attempt(self, method: str, path: str, *, json: Any, unknown_if_lost: bool) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=json)
        except httpx.ConnectError as exc:  # never reached Moesif: nothing was applied
            raise TransientError(API, f"{method} {path} could not connect: {type(exc).__name__}") from None
        except httpx.TimeoutException as exc:
            error_class = OutcomeUnknownError if unknown_if_lost else TransientError
            raise error_class(API, f"{method} {path} timed out: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            error_class = OutcomeUnknownError if unknown_if_lost else TransientError
            raise error_class(API, f"{method} {path} failed: {type(exc).__name__}") from None
        if response.status_code < 300:
            return response
        detail = redact(response.text[:300], self._secrets())
        status = response.status_code
        if status == 429:
            wait = _retry_after(response)
            if wait:
                self.limiter.hold_off(wait)
            raise RateLimitedError(API, f"{method} {path} rate limited", status=status, retry_after=wait)
        if status >= 500 or status == 408:
            error_class = OutcomeUnknownError if unknown_if_lost else TransientError
            raise error_class(API, f"{method} {path}: {detail}", status=status)
        if status in (401, 403):
            raise PermanentError(API, f"{method} {path}: management token refused: {detail}", status=status)
        raise PermanentError(API, f"{method} {path}: {detail}", status=status)

    def balance(self, subscription_id: str) -> MoesifBalance:
        path = f"/search/~/subscriptions/{subscription_id}"
        response = call_with_retries(
            lambda: self._request("GET", path, unknown_if_lost=False),
            max_retries=self._config.max_retries,
            what="moesif get subscription",
        )
        try:
            balance = response.json()["balance"]
            return MoesifBalance(
                _amount(balance, "current_balance"),
                _amount(balance, "available_balance"),
                _amount(balance, "pending_activity", missing_is_zero=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            detail = redact(response.text[:200], self._secrets())
            raise PermanentError(API, f"GET {path}: no readable balance in the answer ({exc!r}): {detail}") from None

    def post_transaction(
        self, transaction: BalanceTransaction, before_send: Callable[[], None] | None = None
    ) -> PostOutcome:
        """POST one balance transaction; `before_send` runs before every attempt leaves (once the budget allows)."""
        body = {
            "company_id": transaction.company_id,
            "subscription_id": transaction.subscription_id,
            "amount": moesif_number(transaction.amount, transaction.currency),
            "type": transaction.type,
            "transaction_id": transaction.transaction_id,
            "description": transaction.description,
        }
        unknown = False

        def attempt() -> httpx.Response:
            nonlocal unknown
            try:
                return self._request(
                    "POST",
                    "/~/billing/reports/balance_transactions",
                    json=body,
                    unknown_if_lost=True,
                    before_send=before_send,
                )
            except OutcomeUnknownError as exc:
                unknown = True
                if not self._config.deduplicates_transaction_ids:
                    raise _DoNotResend(exc) from None
                raise

        try:
            call_with_retries(attempt, max_retries=self._config.max_retries, what="moesif balance transaction")
        except _DoNotResend as stop:
            raise stop.error from None
        except UpstreamError as exc:
            if unknown and not isinstance(exc, OutcomeUnknownError):
                # A later attempt was refused, but an earlier one may have been applied.
                raise OutcomeUnknownError(API, f"{exc} (an earlier attempt's outcome is unknown)") from None
            raise
        return PostOutcome(had_unknown_outcome=unknown)
