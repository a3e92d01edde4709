"""What plan and status the app should give each user, from their Stripe subscriptions: a pure function.

Subscriptions whose mapped status is `canceled` grant nothing; among the others the highest-ranked plan wins
(`plans.rank`). A subscription canceled at period end is still `active` in Stripe until that end, so the user
keeps the plan until then; a trial is `trialing` and maps to active. A customer whose live subscriptions all
ended gets `plans.default_plan` with the status of their latest subscription (e.g. canceled).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from reconciler.config import PlansConfig


@dataclass(frozen=True)
class SubscriptionSnapshot:
    id: str
    customer_id: str
    status: str
    created: int
    price_ids: tuple[str, ...]
    metadata: dict[str, str]
    customer_metadata: dict[str, str]


@dataclass(frozen=True)
class Entitlement:
    customer_id: str
    user_id: str
    plan: str
    status: str

    def payload(self) -> dict[str, str]:
        return {"userId": self.user_id, "plan": self.plan, "status": self.status}


@dataclass(frozen=True)
class PlanProblem:
    customer_id: str
    reason: str


def _user_id(config: PlansConfig, subscriptions: list[SubscriptionSnapshot]) -> str | None:
    source, _, key = config.user_id_from.partition(":")
    if source == "customer_id":
        return subscriptions[0].customer_id
    if source == "customer_metadata":
        return subscriptions[0].customer_metadata.get(key) or None
    # subscription metadata: the newest subscription that carries it
    for subscription in sorted(subscriptions, key=lambda s: s.created, reverse=True):
        if subscription.metadata.get(key):
            return subscription.metadata[key]
    return None


def desired_entitlements(
    subscriptions: Iterable[SubscriptionSnapshot], config: PlansConfig
) -> tuple[list[Entitlement], list[PlanProblem]]:
    by_customer: dict[str, list[SubscriptionSnapshot]] = defaultdict(list)
    for subscription in subscriptions:
        by_customer[subscription.customer_id].append(subscription)
    rank = {plan: position for position, plan in enumerate(config.rank)}
    entitlements, problems = [], []
    for customer, subs in sorted(by_customer.items()):
        user_id = _user_id(config, subs)
        if user_id is None:
            continue  # not an app user (plans.user_id_from names none): nothing to entitle
        granting: list[tuple[str, str]] = []  # (plan, status)
        unmapped: list[str] = []
        for subscription in subs:
            status = config.status_map.get(subscription.status)
            if status is None or status == "canceled":
                continue
            plans = [config.price_to_plan[p] for p in subscription.price_ids if p in config.price_to_plan]
            if not plans:
                unmapped += [p for p in subscription.price_ids if p not in config.price_to_plan]
                continue
            granting += [(plan, status) for plan in plans]
        if unmapped and not granting:
            problems.append(
                PlanProblem(
                    customer,
                    f"price(s) {', '.join(sorted(set(unmapped)))} map to no plan (plans.price_to_plan); not guessed",
                )
            )
            continue
        if granting:
            plan, status = max(granting, key=lambda g: rank.get(g[0], -1))
        elif config.default_plan is not None:
            latest = max(subs, key=lambda s: s.created)
            plan, status = config.default_plan, config.status_map.get(latest.status, "canceled")
        else:
            problems.append(PlanProblem(customer, "no live subscription and no plans.default_plan"))
            continue
        entitlements.append(Entitlement(customer, user_id, plan, status))
    return entitlements, problems
