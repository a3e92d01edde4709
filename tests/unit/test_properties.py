"""Property-based tests (hypothesis) of the pure arithmetic money depends on: window rounding, billing periods,
quantity rounding and currency conversion."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.balances.money import exponent, moesif_number, to_minor, to_minor_rounded, to_units
from reconciler.usage.history import periods_between
from reconciler.usage.model import BillingPeriod
from reconciler.usage.periods import meter_event_timestamp, round_down_to_window, usage_window
from reconciler.usage.rounding import round_quantity

ZONES = st.sampled_from([ZoneInfo(name) for name in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata")])
WINDOWS = st.sampled_from(["MINUTE", "HOUR", "DAY"])
INSTANTS = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31)).map(
    lambda naive: naive.replace(tzinfo=UTC)
)
CURRENCIES = st.sampled_from(["usd", "eur", "jpy", "krw", "kwd", "bhd"])


@given(INSTANTS, WINDOWS, ZONES)
def test_a_window_start_is_at_or_before_the_instant_and_idempotent(instant, window, zone):
    floored = round_down_to_window(instant, window, zone)
    assert floored <= instant
    assert round_down_to_window(floored, window, zone) == floored
    assert instant - floored < timedelta(days=1, hours=1)  # a DST day is at most 25 hours long


@given(
    INSTANTS,
    st.lists(st.timedeltas(min_value=timedelta(hours=1), max_value=timedelta(days=40)), min_size=2, max_size=4),
    WINDOWS,
    ZONES,
    INSTANTS,
)
def test_consecutive_periods_windows_partition_the_timeline(start, lengths, window, zone, now):
    """Every usage instant falls into the window of exactly one period: none lost, none counted twice."""
    bounds = [start]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    windows = [usage_window(BillingPeriod(a, b), now, window, zone) for a, b in itertools.pairwise(bounds)]
    for earlier, later in itertools.pairwise(windows):
        if not later.is_empty:
            assert earlier.end <= later.start  # no overlap: nothing counted twice
        if not earlier.is_empty and not later.is_empty:
            assert earlier.end == later.start  # no gap: nothing lost


@given(
    INSTANTS,
    st.timedeltas(min_value=timedelta(minutes=5), max_value=timedelta(days=400)),
    INSTANTS,
    st.booleans(),
    st.one_of(st.none(), INSTANTS),
)
def test_a_meter_event_timestamp_lies_inside_the_period_and_not_in_the_future(start, length, now, final, previous):
    period = BillingPeriod(start, start + length)
    stamp = meter_event_timestamp(period, now, previous, final=final)
    if stamp is not None:
        assert period.start <= stamp < period.end
        assert stamp <= now
        assert stamp.microsecond == 0
        if previous is not None:
            assert stamp > previous


@given(
    INSTANTS,
    st.sampled_from(["month", "year", "week", "day"]),
    st.integers(1, 3),
    INSTANTS,
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=800)),
)
@settings(max_examples=60)
def test_billing_periods_are_contiguous_and_cover_the_range(anchor, interval, count, since, span):
    until = since + span
    periods = periods_between(anchor, interval, count, since, until)
    if span:
        assert periods, "a non-empty range overlaps at least one period"
        assert periods[0].start <= since < periods[0].end
        assert periods[-1].start < until <= periods[-1].end
    for earlier, later in itertools.pairwise(periods):
        assert earlier.end == later.start
        assert earlier.start < earlier.end


@given(
    st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False), st.sampled_from(["ceil", "floor", "round"])
)
def test_rounding_stays_within_one_unit_and_respects_its_direction(value, mode):
    rounded = round_quantity(value, mode)
    assert abs(Decimal(rounded) - value) < 1
    noise = max(Decimal("1e-9"), value * Decimal("1e-14"))  # below this a total is a whole number, see rounding.py
    if abs(value - value.to_integral_value()) > noise:
        if mode == "ceil":
            assert rounded >= value
        elif mode == "floor":
            assert rounded <= value


@given(st.integers(0, 10**12), st.integers(-8, 8), st.sampled_from(["ceil", "floor", "round"]))
def test_float_noise_never_bills_an_extra_unit(whole, ulps, mode):
    """A double a few units in the last place off a whole number (what summing fractions gives) is that number."""
    noisy = float(whole)
    for _ in range(abs(ulps)):
        noisy = math.nextafter(noisy, math.inf if ulps > 0 else -math.inf)
    assert round_quantity(noisy, mode) == whole


@given(st.integers(-(10**12), 10**12), CURRENCIES)
def test_minor_units_survive_the_round_trip_through_currency_units(minor, currency):
    units = to_units(minor, currency)
    assert to_minor(units, currency) == minor
    assert to_minor_rounded(units, currency) == minor
    assert units.as_tuple().exponent == -exponent(currency)


@given(st.integers(0, 10**11), CURRENCIES)
def test_the_number_sent_to_moesif_is_the_amount_in_currency_units(minor, currency):
    number = moesif_number(to_units(minor, currency), currency)
    assert abs(Decimal(str(number)) - to_units(minor, currency)) < Decimal(10) ** -exponent(currency)
    assert isinstance(number, int) == (exponent(currency) == 0)
