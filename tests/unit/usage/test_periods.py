"""Window rounding and billing-period arithmetic (pure functions, no I/O)."""

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from reconciler.usage.model import BillingPeriod
from reconciler.usage.periods import (
    legacy_record_timestamp,
    meter_event_timestamp,
    round_down_to_window,
    usage_window,
)

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_hour_window_rounds_13_45_down_to_13_00():
    assert round_down_to_window(utc(2026, 3, 10, 13, 45, 12), "HOUR", UTC_ZONE) == utc(2026, 3, 10, 13, 0)


def test_minute_window_drops_seconds():
    assert round_down_to_window(utc(2026, 3, 10, 13, 45, 59, 999), "MINUTE", UTC_ZONE) == utc(2026, 3, 10, 13, 45)


def test_instant_on_a_boundary_stays_put():
    assert round_down_to_window(utc(2026, 3, 10, 13, 0), "HOUR", UTC_ZONE) == utc(2026, 3, 10, 13, 0)


def test_day_window_follows_local_midnight_in_winter_and_summer():
    # Berlin is UTC+1 in winter and UTC+2 in summer.
    assert round_down_to_window(utc(2026, 1, 15, 10), "DAY", BERLIN) == utc(2026, 1, 14, 23)
    assert round_down_to_window(utc(2026, 7, 15, 10), "DAY", BERLIN) == utc(2026, 7, 14, 22)


def test_day_window_across_spring_forward():
    # 2026-03-29: clocks jump 02:00 -> 03:00 local; the day is 23 hours long.
    start = round_down_to_window(utc(2026, 3, 29, 12), "DAY", BERLIN)
    end = round_down_to_window(utc(2026, 3, 30, 12), "DAY", BERLIN)
    assert start == utc(2026, 3, 28, 23)
    assert end == utc(2026, 3, 29, 22)
    assert end - start == timedelta(hours=23)


def test_day_window_across_fall_back():
    # 2026-10-25: clocks fall 03:00 -> 02:00 local; the day is 25 hours long.
    start = round_down_to_window(utc(2026, 10, 25, 12), "DAY", BERLIN)
    end = round_down_to_window(utc(2026, 10, 26, 12), "DAY", BERLIN)
    assert start == utc(2026, 10, 24, 22)
    assert end == utc(2026, 10, 25, 23)
    assert end - start == timedelta(hours=25)


def test_hour_window_in_the_repeated_hour_of_fall_back():
    # 00:30 and 01:30 UTC are both "02:30" local on 2026-10-25; each belongs to its own hour.
    assert round_down_to_window(utc(2026, 10, 25, 0, 30), "HOUR", BERLIN) == utc(2026, 10, 25, 0)
    assert round_down_to_window(utc(2026, 10, 25, 1, 30), "HOUR", BERLIN) == utc(2026, 10, 25, 1)


def test_hour_window_in_a_half_hour_zone():
    kolkata = ZoneInfo("Asia/Kolkata")  # UTC+05:30: local hours start at :30 UTC
    assert round_down_to_window(utc(2026, 3, 10, 13, 45), "HOUR", kolkata) == utc(2026, 3, 10, 13, 30)
    assert round_down_to_window(utc(2026, 3, 10, 13, 15), "HOUR", kolkata) == utc(2026, 3, 10, 12, 30)


def month_end_periods() -> list[BillingPeriod]:
    """Monthly periods anchored on Jan 31 13:45 UTC as Stripe bills them: clamped to the month's last day."""
    bounds = [
        utc(2028, 1, 31, 13, 45),
        utc(2028, 2, 29, 13, 45),  # leap year
        utc(2028, 3, 31, 13, 45),
        utc(2028, 4, 30, 13, 45),
    ]
    return [BillingPeriod(a, b) for a, b in itertools.pairwise(bounds)]


def test_month_end_anchor_clamps_to_february_and_rounds_both_ends():
    february = month_end_periods()[0]
    window = usage_window(february, now=utc(2028, 6, 1), window_size="HOUR", zone=UTC_ZONE)
    assert (window.start, window.end) == (utc(2028, 1, 31, 13), utc(2028, 2, 29, 13))


@pytest.mark.parametrize("window_size", ["MINUTE", "HOUR", "DAY"])
@pytest.mark.parametrize("zone", [UTC_ZONE, BERLIN])
def test_consecutive_periods_partition_time(window_size, zone):
    periods = month_end_periods()
    windows = [usage_window(p, now=utc(2029, 1, 1), window_size=window_size, zone=zone) for p in periods]
    for earlier, later in itertools.pairwise(windows):
        assert earlier.end == later.start  # no gap, no overlap
    # Every instant between the first start and the last end belongs to exactly one window.
    instant = windows[0].start
    while instant < windows[-1].end:
        assert sum(w.start <= instant < w.end for w in windows) == 1
        instant += timedelta(hours=7, minutes=13)


def test_window_of_the_current_period_ends_at_the_last_full_window_before_now():
    period = BillingPeriod(utc(2026, 3, 1, 13, 45), utc(2026, 4, 1, 13, 45))
    window = usage_window(period, now=utc(2026, 3, 5, 9, 59), window_size="HOUR", zone=UTC_ZONE)
    assert (window.start, window.end) == (utc(2026, 3, 1, 13), utc(2026, 3, 5, 9))


def test_window_is_empty_minutes_after_the_period_started():
    period = BillingPeriod(utc(2026, 3, 1, 13, 45), utc(2026, 4, 1, 13, 45))
    window = usage_window(period, now=utc(2026, 3, 1, 13, 50), window_size="HOUR", zone=UTC_ZONE)
    assert window.is_empty


PERIOD = BillingPeriod(utc(2026, 3, 1), utc(2026, 4, 1))


def test_provisional_event_is_dated_now_while_the_period_runs():
    now = utc(2026, 3, 10, 12, 0, 30, 500)
    assert meter_event_timestamp(PERIOD, now, None, final=False) == utc(2026, 3, 10, 12, 0, 30)


def test_provisional_event_after_period_end_sits_two_minutes_before_the_end():
    now = utc(2026, 4, 1, 0, 10)
    assert meter_event_timestamp(PERIOD, now, None, final=False) == utc(2026, 3, 31, 23, 58)


def test_final_event_sits_one_second_before_the_end():
    now = utc(2026, 4, 1, 0, 40)
    assert meter_event_timestamp(PERIOD, now, utc(2026, 3, 31, 23, 58), final=True) == utc(2026, 3, 31, 23, 59, 59)


def test_event_is_at_least_one_second_after_the_previous_one():
    now = utc(2026, 4, 1, 0, 10)
    previous = utc(2026, 3, 31, 23, 58)
    assert meter_event_timestamp(PERIOD, now, previous, final=False) == utc(2026, 3, 31, 23, 58, 1)


def test_no_timestamp_when_it_would_be_in_the_future():
    now = utc(2026, 3, 10, 12, 0, 0)
    assert meter_event_timestamp(PERIOD, now, previous=now, final=False) is None


def test_no_timestamp_older_than_stripes_35_days():
    assert meter_event_timestamp(PERIOD, utc(2026, 5, 10), None, final=True) is None


def test_no_timestamp_after_the_final_event():
    now = utc(2026, 4, 1, 1)
    assert meter_event_timestamp(PERIOD, now, utc(2026, 3, 31, 23, 59, 59), final=True) is None


def test_legacy_record_is_one_second_after_period_start():
    assert legacy_record_timestamp(PERIOD) == utc(2026, 3, 1, 0, 0, 1)
