"""What the plan sync needs from the outside world: exactly the calls it makes, as structural ports.

The concrete adapters (reconciler.upstream.stripe_api.StripeGateway, reconciler.upstream.app_api.EntitlementsGateway,
reconciler.ledger.plan_ledger.PlanLedger, reconciler.ledger.runs.RunLog) satisfy them without inheriting from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from reconciler.plans.desired import Entitlement, SubscriptionSnapshot


class StripeSubscriptions(Protocol):
    """Every customer's (or only `customers`') subscriptions, the only source of a user's entitlement."""

    def subscription_snapshots(self, customers: frozenset[str] = ...) -> Iterable[SubscriptionSnapshot]: ...


class EntitlementsApp(Protocol):
    """The app's sync endpoint: a full state per user, acknowledged with a 2xx (or raises UpstreamError)."""

    def send(self, entitlement: Entitlement) -> None: ...
    def close(self) -> None: ...


class PlanBook(Protocol):
    """The state each user last acknowledged, so a cycle sends only what changed."""

    def acknowledged(self) -> dict[str, tuple[str, str, str]]: ...
    def acknowledge(self, entitlement: Entitlement) -> None: ...
    def failed(self, entitlement: Entitlement, error: str) -> None: ...


class Runs(Protocol):
    """One row per cycle (reconciler.ledger.runs.RunLog)."""

    def start(self, job: str) -> str: ...
    def finish(self, run_id: str, status: str, summary: dict[str, object]) -> None: ...
