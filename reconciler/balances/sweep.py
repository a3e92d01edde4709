"""Whether a customer's Moesif balance must be read this cycle: pure.

Moesif's Management API allows 500 requests a minute, so reading every customer's balance every cycle makes that
budget the wall at a few thousand customers. A balance that agreed at the last observation can only have moved
since if something on Stripe's side moved (credit, open usage, a top-up or refund we forwarded) or Moesif moved on
its own. The first shows in this cycle's Stripe data; the second only in Moesif, so every balance is still read
at least once per `balances.full_sweep_interval`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from reconciler.balances.drift import DriftAction


@dataclass(frozen=True)
class LastObservation:
    """The newest comparison recorded for a customer, in minor units."""

    observed_at: datetime
    subscription_id: str
    stripe_credit_minor: int
    open_usage_minor: int
    moesif_minor: int
    action: str


def sweep_due_after(customer_id: str, full_sweep_interval: timedelta) -> timedelta:
    """How long after its last read a customer's balance is read again regardless: between three quarters of the
    interval and all of it, fixed per customer (a hash of its id). Customers all first observed in one cycle then
    fall due in different cycles, and the sweep spreads out instead of landing in one long cycle a day."""
    stagger = (zlib.crc32(customer_id.encode()) % 1000) / 4000
    return full_sweep_interval * (1 - stagger)


def why_read_moesif(
    last: LastObservation | None,
    *,
    customer_id: str,
    subscription_id: str,
    stripe_credit_minor: int,
    open_usage_minor: int,
    money_in_flight: bool,
    now: datetime,
    full_sweep_interval: timedelta,
) -> str | None:
    """Why Moesif's balance must be read now, or None when the last observation still stands.

    `money_in_flight`: this cycle forwarded or flagged something for the customer, or a transaction of ours was
    sent after, or less than the settle delay before, the last observation: that observation may not have seen it
    land (it can agree by coincidence while our transaction is still invisible), so it is no baseline."""
    if last is None:
        return "never observed"
    if last.action != DriftAction.IN_SYNC:
        return f"last observation was {last.action}"
    if money_in_flight:
        return "a Moesif transaction of ours is recent or in flight"
    if last.subscription_id != subscription_id:
        return "the customer maps to another Moesif subscription"
    if last.stripe_credit_minor != stripe_credit_minor:
        return "Stripe credit changed"
    if last.open_usage_minor != open_usage_minor:
        return "open usage changed"
    if now - last.observed_at >= sweep_due_after(customer_id, full_sweep_interval):
        return "full sweep due"
    return None
