"""Time arithmetic of billing periods: pure functions, `now` always passed in.

Both ends of every period are rounded *down* to OpenMeter's window boundaries in the configured zone. Because
consecutive periods share a boundary and both are rounded the same way, the rounded windows partition the
timeline: usage just before a boundary lands in exactly one period, never in two and never in none.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from reconciler.usage.model import BillingPeriod, UsageWindow

ONE_SECOND = timedelta(seconds=1)
# Provisional meter events sit this far before period end, leaving room for the final event to be newest.
PROVISIONAL_EVENT_LEAD = timedelta(seconds=120)
# Stripe accepts meter events from the past 35 days; keep a margin for clock skew and request latency.
STRIPE_MAX_EVENT_AGE = timedelta(days=35) - timedelta(minutes=5)


# A cycle rounds a few instants over and over (its `now` for every current period, the period starts that many
# subscriptions share): remembered, a repeat costs a twentieth of the time-zone arithmetic.
@lru_cache(maxsize=4096)
def round_down_to_window(instant: datetime, window_size: str, zone: ZoneInfo) -> datetime:
    """The start of the OpenMeter window (MINUTE, HOUR or DAY, calendar-aligned in `zone`) holding `instant`."""
    local = instant.astimezone(zone)
    if window_size == "MINUTE":
        floored = local.replace(second=0, microsecond=0)
    elif window_size == "HOUR":
        floored = local.replace(minute=0, second=0, microsecond=0)
    elif window_size == "DAY":
        floored = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    else:
        raise ValueError(f"unknown window size {window_size!r}")
    return floored.astimezone(UTC)


def usage_window(period: BillingPeriod, now: datetime, window_size: str, zone: ZoneInfo) -> UsageWindow:
    """`[floor(period start), floor(min(period end, now)))`: what OpenMeter is asked for."""
    start = round_down_to_window(period.start, window_size, zone)
    end = round_down_to_window(min(period.end, now), window_size, zone)
    return UsageWindow(start=start, end=max(start, end))


def meter_event_timestamp(
    period: BillingPeriod, now: datetime, previous: datetime | None, *, final: bool
) -> datetime | None:
    """When to date a meter event so that it lands in `period` and the newest event is the latest total.

    Provisional events: `min(now, end - 120 s)`; the final one: `end - 1 s`; always at least one second after
    the previous event of the same stream and period. None when no instant satisfies Stripe's rules (inside
    the period, not in the future, within the past 35 days).
    """
    candidate = period.end - ONE_SECOND if final else min(now, period.end - PROVISIONAL_EVENT_LEAD)
    candidate = max(candidate, period.start)
    if previous is not None:
        candidate = max(candidate, previous + ONE_SECOND)
    candidate = candidate.replace(microsecond=0)
    if candidate < period.start or candidate >= period.end or candidate > now:
        return None
    if candidate < now - STRIPE_MAX_EVENT_AGE:
        return None
    return candidate


def legacy_record_timestamp(period: BillingPeriod) -> datetime:
    """Legacy usage records: one fixed instant per period, so `action=set` overwrites instead of adding.
    Stripe refuses the exact period start, hence one second after it."""
    return period.start + ONE_SECOND


def epoch_seconds(instant: datetime) -> int:
    return int(instant.timestamp())


def from_epoch_seconds(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
