"""Customers, prices, subscriptions and subscription items as served (API 2025-03-31.basil and later: the
billing period lives on each item), and their read endpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler_sandbox import wire
from reconciler_sandbox.stripe_fake.params import StripeError, _missing, _no_such
from reconciler_sandbox.stripe_fake.state import StripeState

_SUBSCRIPTION_STATUSES = (
    "active",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "trialing",
    "paused",
)
_EMBEDDED_ITEMS_LIMIT = 10


class CatalogMixin(StripeState):
    """Rendering and the GET endpoints of customers, prices, subscriptions and subscription items."""

    def _subscriptions_newest_first(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Every subscription, newest first, and each one's place in that order (not to be changed by the caller).
        Kept between requests while no object is created (a subscription is only ever added, and changed in place),
        so that paging through 100,000 of them (`reconciler bench`) does not sort them, or pass over them all, per
        page: that made the fake's listing quadratic, and the benchmark measured the fake."""
        version = (self._seq, len(self.subscriptions))
        if self._subscription_order[0] != version:
            ordered = self._newest_first(self.subscriptions.values())
            self._subscription_order = (version, ordered, {s["id"]: i for i, s in enumerate(ordered)})
        return self._subscription_order[1], self._subscription_order[2]

    # -- rendering --------------------------------------------------------------------------------

    def _render_price(self, price_id: str) -> dict[str, Any]:
        return wire.copy(self.prices[price_id])

    def _render_plan(self, price: dict[str, Any]) -> dict[str, Any]:
        rec = price["recurring"]
        return {
            "id": price["id"],
            "object": "plan",
            "active": price["active"],
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"],
            "created": price["created"],
            "currency": price["currency"],
            "interval": rec["interval"],
            "interval_count": rec["interval_count"],
            "livemode": False,
            "metadata": dict(price["metadata"]),
            "meter": rec["meter"],
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": rec["usage_type"],
        }

    def _render_item(self, item: dict[str, Any]) -> dict[str, Any]:
        out = wire.copy(item)
        price = self._render_price(item["price"])
        out["price"] = price
        out["plan"] = self._render_plan(price)
        if price["recurring"]["usage_type"] != "metered":
            out["quantity"] = item.get("quantity", 1)
        return dict(sorted(out.items()))

    def _render_subscription(self, sub: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = wire.copy(sub)
        item_ids = self._sub_items[sub["id"]]
        items = self._newest_first_items(item_ids)
        out["items"] = {
            "object": "list",
            "data": [self._render_item(self.subscription_items[i]) for i in items[:_EMBEDDED_ITEMS_LIMIT]],
            "has_more": len(items) > _EMBEDDED_ITEMS_LIMIT,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub['id']}",
        }
        if "customer" in expand:
            out["customer"] = wire.copy(self.customers[sub["customer"]])
        return dict(sorted(out.items()))

    def _newest_first_items(self, item_ids: list[str]) -> list[str]:
        # Stripe lists a subscription's items in creation order.
        return sorted(
            item_ids,
            key=lambda i: (self.subscription_items[i]["created"], self._order.get(i, 0)),
        )

    # -- customers & prices -----------------------------------------------------------------------

    def _h_get_customer(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.customers:
            raise _no_such("customer", id)
        return wire.copy(self.customers[id])

    def _h_list_prices(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = self._newest_first(self.prices.values())
        return self._paginate(objs, params, "/v1/prices", "price")

    def _h_get_price(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        self._expand(params, set())
        if id not in self.prices:
            raise _no_such("price", id)
        return self._render_price(id)

    # -- subscriptions ----------------------------------------------------------------------------

    def _h_list_subscriptions(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(
            params,
            {"data.customer", "data.items", "data.items.data", "data.items.data.price"},
        )
        status = params.get("status")
        if status is not None and status not in (*_SUBSCRIPTION_STATUSES, "all", "ended"):
            raise StripeError(
                400,
                f"Invalid status: must be one of {', '.join((*_SUBSCRIPTION_STATUSES, 'ended', 'all'))}",
                param="status",
            )
        subs, positions = self._subscriptions_newest_first()
        every = subs
        if status is None:
            subs = [s for s in subs if s["status"] not in ("canceled", "incomplete_expired")]
        elif status == "ended":
            subs = [s for s in subs if s["status"] in ("canceled", "incomplete_expired")]
        elif status != "all":
            subs = [s for s in subs if s["status"] == status]
        customer = params.get("customer")
        if customer:
            subs = [s for s in subs if s["customer"] == customer]
        price = params.get("price")
        if price:
            subs = [
                s for s in subs if any(self.subscription_items[i]["price"] == price for i in self._sub_items[s["id"]])
            ]
        cust_expand = {"customer"} if "data.customer" in expand else set()
        return self._paginate(
            subs,
            params,
            "/v1/subscriptions",
            "subscription",
            lambda s: self._render_subscription(s, cust_expand),
            positions=positions if subs is every else None,
        )

    def _h_list_subscription_items(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, {"data.price"})
        sid = params.get("subscription")
        if not sid:
            raise _missing("subscription")
        if sid not in self.subscriptions:
            raise _no_such("subscription", sid, param="subscription", status=400)
        items = [self.subscription_items[i] for i in self._newest_first_items(self._sub_items[sid])]
        return self._paginate(
            items,
            params,
            f"/v1/subscription_items?subscription={sid}",
            "subscription item",
            self._render_item,
        )
