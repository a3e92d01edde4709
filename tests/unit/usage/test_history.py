from datetime import UTC, datetime

from reconciler.usage.history import add_months, periods_between


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_month_end_anchor_clamps_and_comes_back():
    anchor = utc(2028, 1, 31, 13, 45)
    assert [add_months(anchor, k) for k in (1, 2, 3)] == [
        utc(2028, 2, 29, 13, 45),
        utc(2028, 3, 31, 13, 45),
        utc(2028, 4, 30, 13, 45),
    ]
    assert add_months(anchor, -2) == utc(2027, 11, 30, 13, 45)


def test_periods_overlapping_a_range_partition_it():
    periods = periods_between(utc(2026, 3, 15, 8), "month", 1, utc(2026, 1, 1), utc(2026, 4, 1))
    assert [(p.start, p.end) for p in periods] == [
        (utc(2025, 12, 15, 8), utc(2026, 1, 15, 8)),
        (utc(2026, 1, 15, 8), utc(2026, 2, 15, 8)),
        (utc(2026, 2, 15, 8), utc(2026, 3, 15, 8)),
        (utc(2026, 3, 15, 8), utc(2026, 4, 15, 8)),
    ]


def test_weekly_and_yearly_intervals():
    weeks = periods_between(utc(2026, 3, 2), "week", 2, utc(2026, 3, 1), utc(2026, 3, 20))
    assert [(p.start.day, p.end.day) for p in weeks] == [(16, 2), (2, 16), (16, 30)]
    years = periods_between(utc(2024, 2, 29), "year", 1, utc(2025, 6, 1), utc(2025, 6, 2))
    assert [(p.start, p.end) for p in years] == [(utc(2025, 2, 28), utc(2026, 2, 28))]
