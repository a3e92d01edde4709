"""From Stripe's metered items to the streams we report: pure, with a reason for everything refused."""

from __future__ import annotations

import itertools
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from reconciler.config import UsageConfig
from reconciler.usage.model import (
    BillingPeriod,
    Meter,
    MeteredItem,
    Refusal,
    Stream,
    StreamKind,
    StreamPeriod,
)

# Subscriptions whose current period Stripe will invoice usage for.
LIVE_STATUSES = frozenset({"active", "trialing", "past_due"})
# Every status Stripe documents; one it adds later is refused by name rather than silently not billed.
KNOWN_STATUSES = LIVE_STATUSES | {"canceled", "incomplete", "incomplete_expired", "unpaid", "paused"}


def item_period(item: MeteredItem) -> BillingPeriod:
    """The item's period, cut short at `ended_at` for a subscription canceled mid-period."""
    if item.ended_at is not None and item.ended_at < item.period.end:
        return BillingPeriod(item.period.start, max(item.period.start, item.ended_at))
    return item.period


def is_in_scope(item: MeteredItem, now: datetime, lookback: timedelta) -> bool:
    """Live subscriptions, and canceled ones whose last period ended inside `usage.lookback`."""
    if item.subscription_status in LIVE_STATUSES:
        return True
    return item.subscription_status == "canceled" and item_period(item).end > now - lookback


def _stream_for(item: MeteredItem, meters: dict[str, Meter], usage: UsageConfig) -> Stream | Refusal:
    meter = meters.get(item.meter_id) if item.meter_id else None
    if item.meter_id and meter is None:
        return Refusal(
            item.customer_id,
            item.item_id,
            item.meter_id,
            f"price {item.price_id} points at meter {item.meter_id}, which Stripe did not list",
        )
    target = meter.event_name if meter else item.price_id
    mapping = usage.mapping_for(target)
    if mapping is None:
        what = f"meter event_name {target!r}" if meter else f"legacy price {target!r}"
        return Refusal(item.customer_id, item.item_id, target, f"{what} has no entry in usage.meters", unmapped=True)

    metadata_key = usage.subject_metadata_key
    subject = item.customer_id if metadata_key is None else (item.customer_metadata or {}).get(metadata_key, "")
    if meter is None:
        kind = StreamKind.LEGACY
    else:
        problem = meter_problem(meter)
        if problem:
            return Refusal(
                item.customer_id,
                item.item_id,
                target,
                problem,
                openmeter_meter=mapping.openmeter,
                subject=subject or None,
                rounding=mapping.rounding,
            )
        kind = StreamKind.METER_LAST if meter.formula == "last" else StreamKind.METER_SUM
    if not subject:
        return Refusal(
            item.customer_id,
            item.item_id,
            target,
            f"customer has no metadata key {metadata_key!r} to name its OpenMeter subject",
        )
    return Stream(
        kind=kind,
        customer_id=item.customer_id,
        subscription_id=item.subscription_id,
        item_id=item.item_id,
        stripe_target=target,
        openmeter_meter=mapping.openmeter,
        subject=subject,
        rounding=mapping.rounding,
        meter=meter,
        # Interned: a few distinct values shared by every stream period a cycle holds, not one copy each.
        unit_amount=None if item.unit_amount is None else sys.intern(str(item.unit_amount)),
        currency=sys.intern(item.currency),
    )


def _priced(refusal: Refusal, item: MeteredItem) -> Refusal:
    unit_amount = None if item.unit_amount is None else str(item.unit_amount)
    return replace(refusal, period=item_period(item), unit_amount=unit_amount, currency=item.currency)


def meter_problem(meter: Meter) -> str | None:
    """Why we cannot keep a total on this meter with set semantics, or None if we can."""
    name = f"meter {meter.event_name!r} ({meter.id})"
    if meter.status != "active":
        return f"{name} is {meter.status}; Stripe ignores events for it"
    if meter.event_time_window:
        return (
            f"{name} is pre-aggregated per {meter.event_time_window} (event_time_window): Stripe keeps only "
            "the newest event per window, so period totals cannot be expressed"
        )
    if meter.formula == "count":
        return f"{name} aggregates with count, which counts events and cannot express a usage total"
    if meter.formula not in ("sum", "last"):
        return f"{name} has an unknown aggregation formula {meter.formula!r}"
    return None


def classify(
    items: Iterable[MeteredItem], meters: dict[str, Meter], usage: UsageConfig, now: datetime
) -> Iterator[StreamPeriod | Refusal]:
    """Each metered item in scope as a stream period to sync this cycle, or refused with a reason; one at a time.
    Whether two of them clash (`clashes`) is known only once every period of their stream is seen."""
    for item in items:
        if item.subscription_status not in KNOWN_STATUSES:
            reason = f"subscription status {item.subscription_status!r} is unknown to reconciler: not billed"
            yield Refusal(item.customer_id, item.item_id, item.meter_id or item.price_id, reason)
            continue
        if not is_in_scope(item, now, usage.lookback):
            continue
        stream = _stream_for(item, meters, usage)
        if isinstance(stream, Refusal):
            yield _priced(stream, item)
            continue
        is_current = item.subscription_status in LIVE_STATUSES
        yield StreamPeriod(stream, item_period(item), is_current=is_current)


def clashes(group: Sequence[StreamPeriod]) -> list[Refusal]:
    """For every period of one stream (a customer's items on one meter) the refusal of each, if two of them overlap:
    meter events belong to the customer and meter, so whose usage an event is could not be told. Else none."""
    if not _overlapping(group):
        return []
    first = group[0].stream
    return [
        Refusal(
            sp.stream.customer_id,
            sp.stream.item_id,
            first.stripe_target,
            f"customer has {len(group)} subscription items on meter {first.stripe_target!r} in "
            f"overlapping periods ({', '.join(sorted(s.stream.item_id for s in group))}); meter "
            "events belong to the customer and meter, so their usage cannot be told apart",
            period=sp.period,
            unit_amount=sp.stream.unit_amount,
            currency=sp.stream.currency,
        )
        for sp in group
    ]


def build_work(
    items: Iterable[MeteredItem], meters: dict[str, Meter], usage: UsageConfig, now: datetime
) -> tuple[list[StreamPeriod], list[Refusal]]:
    """The stream periods to sync this cycle, and the items refused with a reason, held in memory: for a few items
    (a backfill's, one at a time). A cycle streams its listing through the ledger instead (reconciler.usage.job)."""
    refusals: list[Refusal] = []
    by_key: dict[str, list[StreamPeriod]] = defaultdict(list)
    for unit in classify(items, meters, usage, now):
        if isinstance(unit, Refusal):
            refusals.append(unit)
        else:
            by_key[unit.stream.key].append(unit)
    work: list[StreamPeriod] = []
    for group in by_key.values():
        refused = clashes(group)
        refusals += refused
        if not refused:
            work += group
    return work, refusals


def _overlapping(group: Sequence[StreamPeriod]) -> bool:
    ordered = sorted(group, key=lambda sp: sp.period.start)
    return any(later.period.start < earlier.period.end for earlier, later in itertools.pairwise(ordered))
