"""An in-memory fake of the two Moesif Management API calls the balance job uses.

* ``POST /v1/~/billing/reports/balance_transactions`` (schema ``BillingReportBalanceTransCreate``): a credit
  or debit in **currency units**; answers **204 with no body**.
* ``GET /v1/search/~/subscriptions/{id}`` (schema ``SubscriptionDTO``) with
  ``balance.{sequence_id, current_balance, pending_activity, available_balance, last_modified}``, where
  ``available_balance = current_balance + pending_activity``.

Paths and field names follow ``/work/shared/contracts/moesif-management-openapi.json``. Two behaviours of
the real service are undocumented, so they are switches: ``visibility_delay_seconds`` (a posted transaction
counts in the balance only that long after it was received, by ``clock()``) and ``dedupe_transaction_ids``
(whether a repeated ``transaction_id`` is ignored or applied again). ``active_at`` in the future delays a
transaction further; ``expire_at`` is validated and stored but not enforced. Amounts are kept as Decimals
and served as JSON numbers. Serve with :class:`reconciler_sandbox.httpserver.LoopbackServer`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from reconciler_sandbox.httpserver import FakeService, Response

__all__ = ["FakeMoesif", "MoesifError"]

_BALANCE_TRANSACTIONS_PATH = "/v1/~/billing/reports/balance_transactions"
_SUBSCRIPTION_RE = re.compile(r"/v1/search/~/subscriptions/(?P<id>[^/]+)")
_REQUIRED_FIELDS = ("company_id", "subscription_id", "amount", "type", "transaction_id")
_TRANSACTION_TYPES = ("credit", "debit")


class MoesifError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def format_time(epoch: float) -> str:
    """Moesif's date-time format: ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(raw: Any, name: str) -> float:
    if not isinstance(raw, str):
        raise MoesifError(400, f"{name} must be an ISO 8601 date-time string")
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise MoesifError(400, f"{name} is not a valid ISO 8601 date-time: {raw!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class _Subscription:
    subscription_id: str
    company_id: str
    currency: str
    status: str
    opening_balance: Decimal
    created: float
    consumed: Decimal = Decimal(0)
    pending_activity: Decimal = Decimal(0)
    # times of seeded changes (creation, consume, pending); posted transactions count once visible
    changes: list[float] = field(default_factory=list)


@dataclass
class _Transaction:
    transaction_id: str
    company_id: str
    subscription_id: str
    amount: Decimal
    type: str
    description: str | None
    expire_at: str | None
    active_at: str | None
    received_at: float
    visible_at: float
    applied: bool  # False for a repeat ignored by deduplication

    @property
    def signed_amount(self) -> Decimal:
        return self.amount if self.type == "credit" else -self.amount


class FakeMoesif(FakeService):
    """Stateful Moesif Management API fake; see the module docstring."""

    def __init__(
        self,
        token: str = "moesif_sandbox_token",
        clock: Callable[[], float] | None = None,  # nosec B107
    ) -> None:
        super().__init__(clock)
        self.token = token
        self.visibility_delay_seconds: float = 0.0
        self.dedupe_transaction_ids: bool = True
        self.org_id = "sandbox_org"
        self.app_id = "sandbox_app"
        self._init_state()

    # -- state ------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        self._subscriptions: dict[str, _Subscription] = {}
        self._transactions: list[_Transaction] = []

    def reset(self) -> None:
        """Forget subscriptions, transactions, recorded requests and pending faults (switches stay)."""
        with self.lock:
            self._reset_base()
            self._init_state()

    # -- seeding and inspection -------------------------------------------------------------------

    def add_subscription(
        self,
        subscription_id: str,
        company_id: str,
        *,
        currency: str = "usd",
        current_balance: float = 0.0,
        status: str = "active",
    ) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            self._subscriptions[subscription_id] = _Subscription(
                subscription_id=subscription_id,
                company_id=company_id,
                currency=currency,
                status=status,
                opening_balance=Decimal(str(current_balance)),
                created=now,
                changes=[now],
            )
            return self._render_subscription(self._subscriptions[subscription_id])

    def remove_subscription(self, subscription_id: str) -> None:
        """As if Moesif had never heard of the subscription (e.g. not synced yet)."""
        with self.lock:
            del self._subscriptions[subscription_id]

    def consume(self, subscription_id: str, amount: float) -> float:
        """Burn ``amount`` of credit as usage arrives; returns the new current balance."""
        with self.lock:
            sub = self._subscriptions[subscription_id]
            sub.consumed += Decimal(str(amount))
            sub.changes.append(self.clock())
            return float(self._current_balance(sub, self.clock()))

    def set_pending_activity(self, subscription_id: str, amount: float) -> None:
        with self.lock:
            sub = self._subscriptions[subscription_id]
            sub.pending_activity = Decimal(str(amount))
            sub.changes.append(self.clock())

    def balance(self, subscription_id: str) -> float:
        """The subscription's ``current_balance`` as the API would serve it now."""
        with self.lock:
            return float(self._current_balance(self._subscriptions[subscription_id], self.clock()))

    @property
    def transactions(self) -> list[dict[str, Any]]:
        """Every accepted POST, oldest first; ``applied`` is False for ignored repeats, ``visible`` is live."""
        with self.lock:
            now = self.clock()
            return [
                {
                    "transaction_id": t.transaction_id,
                    "company_id": t.company_id,
                    "subscription_id": t.subscription_id,
                    "amount": float(t.amount),
                    "type": t.type,
                    "description": t.description,
                    "expire_at": t.expire_at,
                    "active_at": t.active_at,
                    "received_at": t.received_at,
                    "visible_at": t.visible_at,
                    "applied": t.applied,
                    "visible": t.applied and now >= t.visible_at,
                }
                for t in self._transactions
            ]

    # -- balance ----------------------------------------------------------------------------------

    def _visible(self, sub: _Subscription, now: float) -> list[_Transaction]:
        return [
            t
            for t in self._transactions
            if t.subscription_id == sub.subscription_id and t.applied and now >= t.visible_at
        ]

    def _current_balance(self, sub: _Subscription, now: float) -> Decimal:
        posted = sum((t.signed_amount for t in self._visible(sub, now)), Decimal(0))
        return sub.opening_balance + posted - sub.consumed

    def _render_subscription(self, sub: _Subscription) -> dict[str, Any]:
        now = self.clock()
        visible = self._visible(sub, now)
        current = self._current_balance(sub, now)
        last_modified = max([*sub.changes, *(t.visible_at for t in visible)])
        created = format_time(sub.created)
        return {
            "org_id": self.org_id,
            "app_id": self.app_id,
            "type": "subscription",
            "subscription_id": sub.subscription_id,
            "company_id": sub.company_id,
            "external_id": sub.subscription_id,
            "status": sub.status,
            "currency": sub.currency,
            "provider": "stripe",
            "collection_method": "charge_automatically",
            "items": [],
            "metadata": {},
            "created": created,
            "start_date": created,
            "modified_time": format_time(last_modified),
            "balance": {
                "sequence_id": len(sub.changes) + len(visible),
                "current_balance": float(current),
                "pending_activity": float(sub.pending_activity),
                "available_balance": float(current + sub.pending_activity),
                "last_modified": format_time(last_modified),
            },
        }

    # -- HTTP entry point -------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        method = method.upper()
        hdrs = {k.lower(): v for k, v in headers.items()}
        params: Any = {k: (v if len(v) > 1 else v[0]) for k, v in query.items() if v}
        parsed: Any = None
        parse_error = False
        if body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                parse_error = True
            else:
                params = parsed

        def apply() -> Response:
            try:
                self._authenticate(hdrs)
                if parse_error:
                    raise MoesifError(400, "request body is not valid JSON")
                return self._route(method, path, parsed)
            except MoesifError as e:
                return self._error(e.status, e.message)

        recorded = params if isinstance(params, dict) else {"_body": params}
        return self._serve(method, path, query, hdrs, recorded, body, apply)

    def _default_fault_body(self, status: int) -> bytes:
        return json.dumps({"message": f"sandbox injected fault ({status})"}).encode()

    @staticmethod
    def _error(status: int, message: str) -> Response:
        return status, {"Content-Type": "application/json"}, json.dumps({"message": message}).encode()

    def _authenticate(self, hdrs: Mapping[str, str]) -> None:
        # Exactly one scheme and the token: "Bearer Bearer <token>" is a different token and fails.
        if hdrs.get("authorization", "") != f"Bearer {self.token}":
            raise MoesifError(401, "Unauthorized: missing or invalid management API token")

    def _route(self, method: str, path: str, body: Any) -> Response:
        if path == _BALANCE_TRANSACTIONS_PATH:
            if method != "POST":
                raise MoesifError(405, f"method {method} is not allowed on {path}")
            self._create_balance_transaction(body)
            return 204, {}, b""
        m = _SUBSCRIPTION_RE.fullmatch(path)
        if m:
            if method != "GET":
                raise MoesifError(405, f"method {method} is not allowed on {path}")
            sub = self._subscriptions.get(unquote(m.group("id")))
            if sub is None:
                raise MoesifError(404, f"subscription not found: {unquote(m.group('id'))}")
            payload = self._render_subscription(sub)
            return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()
        raise MoesifError(404, f"no route for {method} {path}")

    def _create_balance_transaction(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise MoesifError(400, "request body must be a JSON object (BillingReportBalanceTransCreate)")
        for name in _REQUIRED_FIELDS:
            if body.get(name) is None:
                raise MoesifError(400, f"missing required field: {name}")
        for name in ("company_id", "subscription_id", "transaction_id", "type"):
            if not isinstance(body[name], str) or not body[name]:
                raise MoesifError(400, f"{name} must be a non-empty string")
        amount = body["amount"]
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
            raise MoesifError(400, "amount must be a number")
        if amount <= 0:
            raise MoesifError(400, "amount must be a positive number; use type to credit or debit")
        if body["type"] not in _TRANSACTION_TYPES:
            raise MoesifError(400, "type must be one of: credit, debit")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise MoesifError(400, "description must be a string")
        now = self.clock()
        visible_at = now + self.visibility_delay_seconds
        for name in ("expire_at", "active_at"):
            if body.get(name) is not None:
                at = _parse_time(body[name], name)
                if name == "active_at":
                    visible_at = max(visible_at, at)
        sub = self._subscriptions.get(body["subscription_id"])
        if sub is None:
            raise MoesifError(404, f"subscription not found: {body['subscription_id']}")
        if sub.company_id != body["company_id"]:
            raise MoesifError(
                400, f"subscription {sub.subscription_id} belongs to company {sub.company_id}, not {body['company_id']}"
            )
        repeat = any(t.transaction_id == body["transaction_id"] for t in self._transactions)
        self._transactions.append(
            _Transaction(
                transaction_id=body["transaction_id"],
                company_id=body["company_id"],
                subscription_id=body["subscription_id"],
                amount=Decimal(str(amount)),
                type=body["type"],
                description=description,
                expire_at=body.get("expire_at"),
                active_at=body.get("active_at"),
                received_at=now,
                visible_at=visible_at,
                applied=not (repeat and self.dedupe_transaction_ids),
            )
        )
