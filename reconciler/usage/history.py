"""Past billing periods of a subscription item, derived from its billing cycle anchor: pure.

Stripe only returns an item's current period. A backfill also needs the earlier ones, which follow from the
billing cycle anchor and the price's interval: boundary k is the anchor moved by k intervals, with month ends
clamped the way Stripe bills them (an anchor on the 31st bills on Feb 28/29, then on Mar 31 again).
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta

from reconciler.usage.model import BillingPeriod


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, keeping its day where the month has it and clamping where not."""
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def boundary(anchor: datetime, interval: str, count: int, k: int) -> datetime:
    if interval == "month":
        return add_months(anchor, k * count)
    if interval == "year":
        return add_months(anchor, 12 * k * count)
    days = {"week": 7, "day": 1}[interval]
    return anchor + timedelta(days=days * count * k)


def periods_between(
    anchor: datetime, interval: str, count: int, since: datetime, until: datetime
) -> list[BillingPeriod]:
    """Every period `[boundary k, boundary k+1)` that overlaps `[since, until)`."""
    k = 0
    while boundary(anchor, interval, count, k) > since:
        k -= 1
    while boundary(anchor, interval, count, k + 1) <= since:
        k += 1
    periods = []
    while boundary(anchor, interval, count, k) < until:
        periods.append(BillingPeriod(boundary(anchor, interval, count, k), boundary(anchor, interval, count, k + 1)))
        k += 1
    return periods
