"""Planning OpenMeter queries for many stream periods, and adding up their rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from reconciler.upstream.errors import PermanentError, TransientError
from reconciler.usage.measure import Need, measure, plan_queries, total_of
from reconciler.usage.model import KnownMeter, UsageRow, UsageWindow

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def hours(start: int, end: int) -> UsageWindow:
    return UsageWindow(T0 + timedelta(hours=start), T0 + timedelta(hours=end))


def row(subject: str, start: int, end: int, value: object) -> UsageRow:
    return UsageRow(subject, T0 + timedelta(hours=start), T0 + timedelta(hours=end), value)  # type: ignore[arg-type]


def test_a_sum_meter_is_asked_once_per_100_subjects_over_the_union_of_their_windows():
    needs = [Need("api", f"cus_{i:03d}", hours(i % 24, 48 + i % 7)) for i in range(250)]
    queries = plan_queries(needs, {"api": "SUM"}, "HOUR")
    assert [len(q.subjects) for q in queries] == [100, 100, 50]
    assert all(q.window_size == "HOUR" for q in queries)
    assert queries[0].window == UsageWindow(T0, T0 + timedelta(hours=54))
    assert {n for q in queries for n in q.needs} == set(needs)


def test_a_non_additive_meter_is_grouped_by_identical_windows_and_aggregated_by_openmeter():
    needs = [Need("storage", f"cus_{i}", hours(0, 10 if i % 2 else 20)) for i in range(6)]
    queries = plan_queries(needs, {"storage": "MAX"}, "HOUR")
    assert {(q.window, len(q.subjects), q.window_size) for q in queries} == {
        (hours(0, 10), 3, None),
        (hours(0, 20), 3, None),
    }


@pytest.mark.parametrize("aggregations", [{"api": "SUM"}, {}], ids=["minute-windows", "unknown-aggregation"])
def test_minute_windows_and_unknown_meters_are_never_asked_as_a_windowed_union(aggregations):
    needs = [Need("api", "cus_a", hours(0, 5)), Need("api", "cus_b", hours(1, 5))]
    window_size = "MINUTE" if aggregations else "HOUR"
    queries = plan_queries(needs, aggregations, window_size)
    assert [(q.window, q.window_size) for q in queries] == [(hours(0, 5), None), (hours(1, 5), None)]


def test_a_total_adds_its_subjects_rows_inside_its_window_and_allows_negative_windows():
    need = Need("api", "cus_a", hours(2, 6))
    rows = [
        row("cus_a", 1, 2, 100),  # before the window: another period's
        row("cus_a", 2, 3, Decimal(5)),
        row("cus_a", 4, 5, Decimal(-2)),  # usage corrected down in one window
        row("cus_b", 3, 4, Decimal(50)),  # another subject
        row("cus_a", 6, 7, Decimal(9)),  # after the window
    ]
    assert total_of(need, rows) == 3


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row("cus_a", 2, 3, Decimal(-4))], "adds up to -4"),
        ([row("cus_a", 2, 3, Decimal(10) ** 16)], "not billable"),
        ([row("cus_a", 1, 3, Decimal(1))], "straddles"),
        ([row("cus_a", 2, 3, PermanentError("openmeter", "value None"))], "value None"),
    ],
    ids=["negative-total", "huge", "straddling-row", "unreadable-value"],
)
def test_a_total_that_cannot_be_billed_is_an_error_naming_meter_and_subject(rows, message):
    with pytest.raises(PermanentError, match=message) as raised:
        total_of(Need("api", "cus_a", hours(2, 6)), rows)
    assert "value None" in message or "cus_a" in str(raised.value)


class Answers:
    """OpenMeter's answers by subject set: rows, or an error to raise."""

    def __init__(self, answers: dict[frozenset[str], list[UsageRow] | Exception]):
        self.answers = answers
        self.asked: list[tuple[str, ...]] = []
        self.meters: list[str] = []

    def query_rows(self, meter, subjects, window, window_size, time_zone, *, meter_id=None):
        self.asked.append(tuple(subjects))
        self.meters.append(meter_id or meter)
        answer = self.answers[frozenset(subjects)]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_failed_query_fails_only_the_periods_it_was_for():
    needs = [Need("api", f"cus_{i:03d}", hours(0, 4)) for i in range(150)]
    first, second = frozenset(n.subject for n in needs[:100]), frozenset(n.subject for n in needs[100:])
    openmeter = Answers({first: [row("cus_000", 0, 1, Decimal(7))], second: TransientError("openmeter", "503")})
    found = measure(openmeter, needs, {"api": KnownMeter("01JMETERID", "SUM")}, "HOUR", "UTC")
    assert len(openmeter.asked) == 2
    assert openmeter.meters == ["01JMETERID"] * 2  # by id: the meter whose aggregation the plan relied on
    assert found.failed_meters == {"api"}
    assert found.total(needs[0]) == 7
    assert found.total(needs[1]) == 0  # no rows: no usage
    with pytest.raises(TransientError, match="503"):
        found.total(needs[120])
