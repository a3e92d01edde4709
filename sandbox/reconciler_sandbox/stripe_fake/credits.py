"""Billing credit grants (seeded, consumed and voided through helpers) and
``/v1/billing/credit_balance_summary``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reconciler_sandbox.stripe_fake.params import StripeError, _missing, _new_id, _no_such
from reconciler_sandbox.stripe_fake.state import StripeState

_CREDIT_GRANT_DEFAULT_PRIORITY = 50


class CreditMixin(StripeState):
    """Credit grants and the credit balance summary."""

    def add_credit_grant(
        self,
        customer: str,
        value: int,
        currency: str = "usd",
        *,
        category: str = "paid",
        scope_price_type: str = "metered",
        effective_at: int | None = None,
        expires_at: int | None = None,
        id: str | None = None,
        name: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A billing credit grant of ``value`` minor units (``effective_at`` defaults to now)."""
        if category not in ("paid", "promotional"):
            raise ValueError(f"unknown credit grant category {category!r}")
        if scope_price_type != "metered":
            raise ValueError("credit grants only apply to price_type 'metered'")
        if value < 1:
            raise ValueError("value must be a positive integer in minor units")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            gid = id or _new_id("credgr_test_", 24)
            now = self._now()
            grant = {
                "id": gid,
                "object": "billing.credit_grant",
                "amount": {"monetary": {"currency": currency, "value": value}, "type": "monetary"},
                "applicability_config": {"scope": {"price_type": scope_price_type}},
                "category": category,
                "created": now,
                "customer": customer,
                "customer_account": None,
                "effective_at": effective_at if effective_at is not None else now,
                "expires_at": expires_at,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "name": name,
                "priority": priority if priority is not None else _CREDIT_GRANT_DEFAULT_PRIORITY,
                "test_clock": None,
                "updated": now,
                "voided_at": None,
            }
            self.credit_grants[gid] = grant
            self._grant_used[gid] = 0
            self._grant_held[gid] = 0
            self._register(gid)
            return json.loads(json.dumps(grant))

    def void_credit_grant(self, grant_id: str) -> dict[str, Any]:
        with self.lock:
            grant = self.credit_grants[grant_id]
            now = self._now()
            grant["voided_at"] = now
            grant["updated"] = now
            return json.loads(json.dumps(grant))

    def consume_credit(self, customer: str, value: int, currency: str = "usd", *, draft: bool = False) -> int:
        """Apply up to ``value`` minor units of credit as an invoice would; returns the amount applied.

        Grants are drawn in Stripe's order (priority, soonest expiry, promotional before paid, earliest
        effective). ``draft=True`` holds the credit on a draft invoice: the available balance drops, the
        ledger balance does not.
        """
        if value < 0:
            raise ValueError("value must not be negative")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            now = self._now()
            grants = [
                g
                for g in self.credit_grants.values()
                if g["customer"] == customer
                and g["amount"]["monetary"]["currency"] == currency
                and self._grant_live(g, now)
            ]
            grants.sort(
                key=lambda g: (
                    g["priority"],
                    g["expires_at"] if g["expires_at"] is not None else float("inf"),
                    0 if g["category"] == "promotional" else 1,
                    g["effective_at"],
                    self._order[g["id"]],
                )
            )
            left = value
            for grant in grants:
                take = min(left, self._grant_available(grant))
                if take <= 0:
                    continue
                (self._grant_held if draft else self._grant_used)[grant["id"]] += take
                left -= take
                if left == 0:
                    break
            return value - left

    @staticmethod
    def _grant_live(grant: Mapping[str, Any], now: int) -> bool:
        return (
            grant["voided_at"] is None
            and grant["effective_at"] <= now
            and (grant["expires_at"] is None or now < grant["expires_at"])
        )

    def _grant_available(self, grant: Mapping[str, Any]) -> int:
        gid = grant["id"]
        return grant["amount"]["monetary"]["value"] - self._grant_used[gid] - self._grant_held[gid]

    def _grant_ledger(self, grant: Mapping[str, Any]) -> int:
        return grant["amount"]["monetary"]["value"] - self._grant_used[grant["id"]]

    # -- billing credits --------------------------------------------------------------------------

    def _h_credit_balance_summary(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(params, {"customer"})
        customer = params.get("customer")
        if not customer:
            raise _missing("customer")
        flt = params.get("filter")
        if flt is None or flt == "":
            raise _missing("filter")
        if not isinstance(flt, dict):
            raise StripeError(400, "Invalid object", param="filter", code="parameter_invalid_object")
        ftype = flt.get("type")
        if not ftype:
            raise _missing("filter[type]")
        if ftype not in ("applicability_scope", "credit_grant"):
            raise StripeError(
                400, "Invalid filter[type]: must be one of applicability_scope or credit_grant", param="filter[type]"
            )
        if customer not in self.customers:
            raise _no_such("customer", customer, param="customer", status=400)
        grants = [g for g in self.credit_grants.values() if g["customer"] == customer]
        if ftype == "applicability_scope":
            scope = flt.get("applicability_scope")
            if not isinstance(scope, dict) or not scope:
                raise _missing("filter[applicability_scope]")
            if "prices" in scope:
                raise StripeError(
                    400,
                    "The sandbox supports only filter[applicability_scope][price_type]=metered.",
                    param="filter[applicability_scope][prices]",
                )
            if scope.get("price_type") != "metered":
                raise StripeError(
                    400,
                    "Invalid filter[applicability_scope][price_type]: must be one of metered",
                    param="filter[applicability_scope][price_type]",
                )
            grants = [g for g in grants if g["applicability_config"]["scope"].get("price_type") == "metered"]
        else:
            grant_id = flt.get("credit_grant")
            if not grant_id:
                raise _missing("filter[credit_grant]")
            grant = self.credit_grants.get(grant_id)
            if grant is None or grant["customer"] != customer:
                raise _no_such("billing.credit_grant", grant_id, param="filter[credit_grant]", status=400)
            grants = [grant]
        now = self._now()
        available: dict[str, int] = {}
        ledger: dict[str, int] = {}
        for g in grants:
            cur = g["amount"]["monetary"]["currency"]
            available.setdefault(cur, 0)
            ledger.setdefault(cur, 0)
            if self._grant_live(g, now):
                available[cur] += self._grant_available(g)
                ledger[cur] += self._grant_ledger(g)

        def money(currency: str, value: int) -> dict[str, Any]:
            return {"monetary": {"currency": currency, "value": value}, "type": "monetary"}

        return {
            "object": "billing.credit_balance_summary",
            "balances": [
                {"available_balance": money(cur, available[cur]), "ledger_balance": money(cur, ledger[cur])}
                for cur in sorted(available)
            ],
            "customer": (json.loads(json.dumps(self.customers[customer])) if "customer" in expand else customer),
            "customer_account": None,
            "livemode": False,
        }

    def credit_available(self, customer: str, currency: str = "usd") -> int:
        """The customer's available credit for metered prices, in minor units, as the balance summary serves it."""
        with self.lock:
            now = self._now()
            return sum(
                self._grant_available(g)
                for g in self.credit_grants.values()
                if g["customer"] == customer
                and g["amount"]["monetary"]["currency"] == currency
                and g["applicability_config"]["scope"].get("price_type") == "metered"
                and self._grant_live(g, now)
            )
