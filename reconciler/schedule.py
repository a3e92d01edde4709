"""Turning a `schedule.*` config value (a cron expression or an interval such as `15m`) into a trigger."""

from __future__ import annotations

from datetime import UTC, datetime

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from reconciler.durations import parse_duration


def parse_schedule(value: str) -> BaseTrigger:
    """`"*/15 * * * *"` -> a cron trigger in UTC; `"15m"` -> an interval trigger. ValueError otherwise."""
    text = value.strip()
    if len(text.split()) == 5:
        try:
            return CronTrigger.from_crontab(text, timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid cron expression: {exc}") from None
    try:
        interval = parse_duration(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a cron expression (5 fields, e.g. '*/15 * * * *') nor an interval (e.g. 15m)"
        ) from None
    if interval.total_seconds() <= 0:
        raise ValueError("an interval must be longer than zero")
    return IntervalTrigger(seconds=int(interval.total_seconds()), timezone=UTC)


def tick_key(value: str, now: datetime) -> str:
    """The same key on every replica for the same scheduled tick: the interval bucket of `now`, or for cron
    schedules (minute resolution) the minute. The replica that inserts it first plans the cycle."""
    text = value.strip()
    if len(text.split()) != 5:
        seconds = max(1, int(parse_duration(text).total_seconds()))
        return f"every-{seconds}s-{int(now.timestamp()) // seconds}"
    return f"cron-{now.astimezone(UTC):%Y%m%dT%H%M}"
