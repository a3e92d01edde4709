"""Seeding helpers for customers, meters, prices and subscriptions: tests, the simulation, the demo and the
benchmark create these objects directly (the fake serves no endpoint that creates them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from reconciler_sandbox.stripe_fake.catalog import _SUBSCRIPTION_STATUSES, CatalogMixin
from reconciler_sandbox.stripe_fake.params import _new_id


class SeedingMixin(CatalogMixin):
    """``add_*`` and ``update_*`` helpers; each returns the object as the API serves it."""

    def add_customer(
        self,
        id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        balance: int = 0,
        currency: str | None = "usd",
        *,
        email: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            cid = id or _new_id("cus_", 14)
            customer = {
                "id": cid,
                "object": "customer",
                "address": None,
                "balance": balance,
                "created": self._now(),
                "currency": currency,
                "default_source": None,
                "delinquent": False,
                "description": None,
                "discount": None,
                "email": email,
                "invoice_prefix": hashlib.sha1(cid.encode(), usedforsecurity=False).hexdigest()[:8].upper(),
                "invoice_settings": {
                    "custom_fields": None,
                    "default_payment_method": None,
                    "footer": None,
                    "rendering_options": None,
                },
                "livemode": False,
                "metadata": dict(metadata or {}),
                "name": name,
                "next_invoice_sequence": 1,
                "phone": None,
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": None,
            }
            self.customers[cid] = customer
            self._register(cid)
            return json.loads(json.dumps(customer))

    def add_meter(
        self,
        event_name: str,
        formula: str = "sum",
        status: str = "active",
        event_time_window: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        id: str | None = None,
        *,
        display_name: str | None = None,
    ) -> dict[str, Any]:
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"unknown formula {formula!r}")
        if status not in ("active", "inactive"):
            raise ValueError(f"unknown status {status!r}")
        if event_time_window not in (None, "hour", "day"):
            raise ValueError(f"unknown event_time_window {event_time_window!r}")
        with self.lock:
            mid = id or _new_id("mtr_test_", 24)
            now = self._now()
            meter = {
                "id": mid,
                "object": "billing.meter",
                "created": now,
                "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
                "default_aggregation": {"formula": formula},
                "display_name": display_name or event_name,
                "event_name": event_name,
                "event_time_window": event_time_window,
                "livemode": False,
                "status": status,
                "status_transitions": {"deactivated_at": now if status == "inactive" else None},
                "updated": now,
                "value_settings": {"event_payload_key": value_key},
            }
            self.meters[mid] = meter
            self._register(mid)
            return json.loads(json.dumps(meter))

    def add_price(
        self,
        *,
        meter: str | None = None,
        usage_type: str = "metered",
        interval: str = "month",
        interval_count: int = 1,
        unit_amount: int | None = 10,
        currency: str = "usd",
        id: str | None = None,
        product: str | None = None,
        active: bool = True,
        metadata: Mapping[str, str] | None = None,
        lookup_key: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            pid = id or _new_id("price_", 24)
            price = {
                "id": pid,
                "object": "price",
                "active": active,
                "billing_scheme": "per_unit",
                "created": self._now(),
                "currency": currency,
                "custom_unit_amount": None,
                "livemode": False,
                "lookup_key": lookup_key,
                "metadata": dict(metadata or {}),
                "nickname": None,
                "product": product or _new_id("prod_", 14),
                "recurring": {
                    "interval": interval,
                    "interval_count": interval_count,
                    "meter": meter,
                    "trial_period_days": None,
                    "usage_type": usage_type,
                },
                "tax_behavior": "unspecified",
                "tiers_mode": None,
                "transform_quantity": None,
                "type": "recurring",
                "unit_amount": unit_amount,
                "unit_amount_decimal": None if unit_amount is None else str(unit_amount),
            }
            self.prices[pid] = price
            self._register(pid)
            return json.loads(json.dumps(price))

    def add_subscription(
        self,
        customer: str,
        prices: list[str],
        *,
        current_period_start: int,
        current_period_end: int,
        status: str = "active",
        canceled_at: int | None = None,
        ended_at: int | None = None,
        id: str | None = None,
        created: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if status not in _SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            for p in prices:
                if p not in self.prices:
                    raise KeyError(f"unknown price {p!r}")
            sid = id or _new_id("sub_", 24)
            created = created if created is not None else current_period_start
            currency = self.prices[prices[0]]["currency"] if prices else "usd"
            self.subscriptions[sid] = {
                "id": sid,
                "object": "subscription",
                "application": None,
                "application_fee_percent": None,
                "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
                "billing_cycle_anchor": current_period_start,
                "billing_cycle_anchor_config": None,
                "billing_mode": {"flexible": None, "type": "classic"},
                "billing_thresholds": None,
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": canceled_at,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                "collection_method": "charge_automatically",
                "created": created,
                "currency": currency,
                "customer": customer,
                "days_until_due": None,
                "default_payment_method": None,
                "default_source": None,
                "default_tax_rates": [],
                "description": None,
                "discounts": [],
                "ended_at": ended_at,
                "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
                "latest_invoice": None,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "next_pending_invoice_item_invoice": None,
                "on_behalf_of": None,
                "pause_collection": None,
                "payment_settings": {
                    "payment_method_options": None,
                    "payment_method_types": None,
                    "save_default_payment_method": "off",
                },
                "pending_invoice_item_interval": None,
                "pending_setup_intent": None,
                "pending_update": None,
                "schedule": None,
                "start_date": created,
                "status": status,
                "test_clock": None,
                "transfer_data": None,
                "trial_end": None,
                "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
                "trial_start": None,
            }
            self._register(sid)
            self._sub_items[sid] = []
            for p in prices:
                self._add_item(sid, p, current_period_start, current_period_end, created)
            return self._render_subscription(self.subscriptions[sid], set())

    def _add_item(self, sid: str, price_id: str, start: int, end: int, created: int) -> str:
        iid = _new_id("si_", 14)
        self.subscription_items[iid] = {
            "id": iid,
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": created,
            "current_period_end": end,
            "current_period_start": start,
            "discounts": [],
            "metadata": {},
            "price": price_id,
            "subscription": sid,
            "tax_rates": [],
        }
        self._register(iid)
        self._sub_items[sid].append(iid)
        return iid

    def update_subscription(self, id: str, **fields: Any) -> dict[str, Any]:
        """Overwrite fields of a subscription (status, canceled_at, ended_at, metadata, ...).

        ``current_period_start`` / ``current_period_end`` are applied to every item of the subscription.
        """
        with self.lock:
            sub = self.subscriptions[id]
            start = fields.pop("current_period_start", None)
            end = fields.pop("current_period_end", None)
            if "status" in fields and fields["status"] not in _SUBSCRIPTION_STATUSES:
                raise ValueError(f"unknown subscription status {fields['status']!r}")
            sub.update(fields)
            if "created" in fields:
                self._subscription_order = ((-1, -1), [])  # the listing order changed
            for iid in self._sub_items[id]:
                item = self.subscription_items[iid]
                self._remember_period(item, start, end)
                if start is not None:
                    item["current_period_start"] = start
                if end is not None:
                    item["current_period_end"] = end
            return self._render_subscription(sub, set())

    def _remember_period(self, item: dict[str, Any], start: int | None, end: int | None) -> None:
        """A rollover: the period the item leaves is still summarised (newest first) for legacy usage."""
        if start is not None and start >= item["current_period_end"]:
            self._past_periods.setdefault(item["id"], []).append(
                (item["current_period_start"], item["current_period_end"])
            )

    def set_item_price(self, item_id: str, price: str) -> dict[str, Any]:
        """Move an item to another price (an upgrade or a downgrade)."""
        with self.lock:
            if price not in self.prices:
                raise KeyError(f"unknown price {price!r}")
            item = self.subscription_items[item_id]
            item["price"] = price
            return self._render_item(item)

    def set_item_period(self, item_id: str, start: int, end: int) -> dict[str, Any]:
        with self.lock:
            item = self.subscription_items[item_id]
            self._remember_period(item, start, end)
            item["current_period_start"] = start
            item["current_period_end"] = end
            return self._render_item(item)
