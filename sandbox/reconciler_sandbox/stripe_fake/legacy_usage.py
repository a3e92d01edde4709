"""Legacy usage records and their summaries, served only to requests pinned to an API version older than
2025-03-31.basil, and only for items of a legacy metered price (no meter)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from reconciler_sandbox.stripe_fake.params import StripeError, _int_param, _new_id, _no_such
from reconciler_sandbox.stripe_fake.state import StripeState

LEGACY_USAGE_REMOVED_IN = "2025-03-31"


class LegacyUsageMixin(StripeState):
    """``/v1/subscription_items/{id}/usage_records`` and ``.../usage_record_summaries``."""

    def _legacy_item(self, hdrs: Mapping[str, str], item_id: str, what: str) -> dict[str, Any]:
        version = hdrs.get("stripe-version") or self.default_api_version
        if version[:10] >= LEGACY_USAGE_REMOVED_IN:
            raise StripeError(
                400,
                f"The {what} endpoint was removed in API version 2025-03-31.basil (this request uses "
                f"{version}). Usage records of legacy metered prices can only be created with an older "
                "API version; use Billing Meters (/v1/billing/meter_events) instead.",
                code="api_version_unsupported",
            )
        item = self.subscription_items.get(item_id)
        if item is None:
            raise _no_such("subscription item", item_id)
        price = self.prices[item["price"]]
        if price["recurring"]["usage_type"] != "metered" or price["recurring"]["meter"] is not None:
            raise StripeError(
                400,
                f"Usage records can only be created for subscription items with a legacy metered price "
                f"(usage_type=metered and no meter); price '{price['id']}' does not qualify.",
                param="subscription_item",
            )
        return item

    def _h_usage_record(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        item = self._legacy_item(hdrs, id, "usage records")
        quantity = _int_param(params, "quantity", required=True)
        assert quantity is not None
        if quantity < 0:
            raise StripeError(
                400,
                "Invalid quantity: must be greater than or equal to 0",
                param="quantity",
                code="parameter_invalid_integer",
            )
        action = params.get("action") or "increment"
        if action not in ("set", "increment"):
            raise StripeError(400, "Invalid action: must be one of increment, set", param="action")
        now = self._now()
        ts_raw = params.get("timestamp")
        timestamp = now if ts_raw in (None, "", "now") else _int_param(params, "timestamp")
        assert timestamp is not None
        if not (item["current_period_start"] < timestamp < item["current_period_end"]) or timestamp > now:
            raise StripeError(
                400,
                "Cannot create the usage record with this timestamp because timestamps must be after the "
                "subscription's last invoice period (or current period start time).",
                param="timestamp",
            )
        _apply_usage_record(self.usage_records.setdefault(id, {}), timestamp, action, quantity)
        self._usage_record_log.setdefault(id, []).append((self.clock(), timestamp, action, quantity))
        return {
            "id": _new_id("mbur_", 14),
            "object": "usage_record",
            "livemode": False,
            "quantity": quantity,
            "subscription_item": id,
            "timestamp": timestamp,
        }

    def _h_usage_record_summaries(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        item = self._legacy_item(hdrs, id, "usage record summaries")
        records: dict[int, int] = {}  # as the summaries show them by now: replayed up to summary_lag_seconds ago
        visible_from = self.clock() - self.summary_lag_seconds
        for created, timestamp, action, quantity in self._usage_record_log.get(id, []):
            if created <= visible_from:
                _apply_usage_record(records, timestamp, action, quantity)
        periods = [
            (item["current_period_start"], item["current_period_end"]),
            *reversed(self._past_periods.get(id, [])),
        ]
        summaries = [
            {
                "id": "sis_" + hashlib.sha1(f"{id}|{start}".encode(), usedforsecurity=False).hexdigest()[:24],
                "object": "usage_record_summary",
                "invoice": None,
                "livemode": False,
                "period": {"start": start, "end": end},
                "subscription_item": id,
                "total_usage": sum(q for ts, q in records.items() if start <= ts < end),
            }
            for start, end in periods
        ]
        return self._paginate(
            summaries,
            params,
            f"/v1/subscription_items/{id}/usage_record_summaries",
            "usage record summary",
        )

    def _usage_total(self, item: Mapping[str, Any]) -> int:
        records = self.usage_records.get(item["id"], {})
        start, end = item["current_period_start"], item["current_period_end"]
        return sum(q for ts, q in records.items() if start <= ts < end)

    def usage_record_total(self, item_id: str) -> int:
        """Sum of the stored legacy usage quantities in the item's current period."""
        with self.lock:
            return self._usage_total(self.subscription_items[item_id])


def _apply_usage_record(records: dict[int, int], timestamp: int, action: str, quantity: int) -> None:
    records[timestamp] = quantity if action == "set" else records.get(timestamp, 0) + quantity
