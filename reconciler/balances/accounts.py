"""Which Moesif subscription stands for which Stripe customer, and what their open usage costs: pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from reconciler.balances.model import BalanceAccount, OpenUsage
from reconciler.usage.model import CustomerCredit, MeteredItem
from reconciler.usage.streams import LIVE_STATUSES

_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass
class CustomerAccount:
    account: BalanceAccount
    # meter id (meter prices) or price id (legacy prices) -> minor units per unit; None if not per-unit
    unit_prices: dict[str, Decimal | None] = field(default_factory=dict)
    stripe_credit: CustomerCredit | None = None  # the customer balance, when the listing expanded the customer


def map_accounts(
    items: Iterable[MeteredItem], metadata_key: str | None, ended_since: datetime
) -> dict[str, CustomerAccount]:
    """Moesif `company_id` = Stripe customer; `subscription_id` = the customer's oldest live subscription with
    metered items, unless the customer's metadata names one under `metadata_key`. A customer whose subscriptions
    all ended keeps the one that ended last, if after `ended_since`: its last invoice, late top-ups and refunds
    still move money that Moesif must hear about."""
    live_items: dict[str, list[MeteredItem]] = {}
    ended_items: dict[str, list[MeteredItem]] = {}
    for item in items:
        if item.subscription_status in LIVE_STATUSES:
            live_items.setdefault(item.customer_id, []).append(item)
        elif item.ended_at is not None and item.ended_at >= ended_since:
            ended_items.setdefault(item.customer_id, []).append(item)
    accounts = {}
    for customer in live_items.keys() | ended_items.keys():
        if customer in live_items:
            chosen = min(live_items[customer], key=lambda i: (i.subscription_created or _EPOCH, i.subscription_id))
            priced = live_items[customer]
        else:
            chosen = max(ended_items[customer], key=lambda i: (i.ended_at or _EPOCH, i.subscription_id))
            priced = [i for i in ended_items[customer] if i.subscription_id == chosen.subscription_id]
        override = (chosen.customer_metadata or {}).get(metadata_key or "") if metadata_key else None
        account = BalanceAccount(customer, override or chosen.subscription_id, chosen.currency)
        prices = {(i.meter_id or i.price_id): i.unit_amount for i in priced}
        accounts[customer] = CustomerAccount(account, prices, chosen.customer_credit)
    return accounts


class UnpricedUsageError(Exception):
    """Open usage on a price whose cost we cannot compute (tiered, transformed, or unknown)."""


def open_usage_cost_minor(open_usage: list[OpenUsage], unit_prices: dict[str, Decimal | None]) -> int:
    """What the reported-but-not-invoiced usage costs, in minor units (Moesif has burned it already)."""
    total = Decimal(0)
    for usage in open_usage:
        key = usage.meter_id or usage.stripe_target
        price = unit_prices.get(key)
        if price is None:
            raise UnpricedUsageError(
                f"cannot price the open usage of {usage.stripe_target!r} (item {usage.subscription_item_id}): "
                "only plain per-unit prices can be priced"
            )
        total += price * usage.reported_total
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))
