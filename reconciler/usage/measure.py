"""Measuring many stream periods with few OpenMeter queries.

A query names up to 100 subjects and groups its rows by subject. For SUM and COUNT meters a window's total is the
sum of its sub-windows', so one windowed query (`usage.window_size` windows) over the union of the periods serves
every subject in it, whatever their billing anchors; each period then adds up the rows inside its own window. For
other aggregations (MAX, LATEST, UNIQUE_COUNT, ...) only OpenMeter can aggregate a range, so subjects are grouped
by identical windows instead. MINUTE windows are never asked for over a union: that many rows would not fit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from reconciler.upstream.errors import PermanentError, UpstreamError
from reconciler.usage.model import KnownMeter, UsageRow, UsageWindow

# Far above any real total, and far below what the ledger's 64-bit integers hold.
MAX_BILLABLE_TOTAL = Decimal(10) ** 15
SUBJECTS_PER_QUERY = 100  # OpenMeter does not paginate query results: rows = windows × subjects
ADDITIVE_AGGREGATIONS = frozenset({"SUM", "COUNT"})
UNION_WINDOW_SIZES = frozenset({"HOUR", "DAY"})


class UsageQueries(Protocol):
    def query_rows(
        self,
        meter: str,
        subjects: Sequence[str],
        window: UsageWindow,
        window_size: str | None,
        time_zone: str,
        *,
        meter_id: str | None = None,
    ) -> list[UsageRow]: ...


@dataclass(frozen=True)
class Need:
    """One subject's usage on one meter over one window."""

    meter: str
    subject: str
    window: UsageWindow


@dataclass(frozen=True)
class Query:
    meter: str
    subjects: tuple[str, ...]
    window: UsageWindow
    window_size: str | None  # None: one value per subject for the whole window
    needs: tuple[Need, ...]


def plan_queries(needs: Iterable[Need], aggregations: Mapping[str, str], window_size: str) -> list[Query]:
    """The fewest queries (of at most SUBJECTS_PER_QUERY subjects) that measure every need."""
    groups: dict[tuple[str, UsageWindow | None], list[Need]] = defaultdict(list)
    for need in dict.fromkeys(needs):
        union = aggregations.get(need.meter) in ADDITIVE_AGGREGATIONS and window_size in UNION_WINDOW_SIZES
        groups[(need.meter, None if union else need.window)].append(need)
    queries = []
    for (meter, window), group in groups.items():
        subjects = sorted({need.subject for need in group})
        for first in range(0, len(subjects), SUBJECTS_PER_QUERY):
            chunk = set(subjects[first : first + SUBJECTS_PER_QUERY])
            chunk_needs = tuple(need for need in group if need.subject in chunk)
            span = window or UsageWindow(
                min(need.window.start for need in chunk_needs), max(need.window.end for need in chunk_needs)
            )
            queries.append(Query(meter, tuple(sorted(chunk)), span, None if window else window_size, chunk_needs))
    return queries


def total_of(need: Need, rows: Iterable[UsageRow]) -> Decimal:
    """The need's billable total from a query's rows: the sum of its subject's rows inside its window. A windowed
    row may be negative (usage corrected down); the total may not, nor be absurdly large. A row straddling the
    window's edge means the windows do not line up (a time zone mismatch): an error, never a guess."""
    total = Decimal(0)
    for row in rows:
        if row.subject != need.subject or row.window_end <= need.window.start or row.window_start >= need.window.end:
            continue
        if row.window_start < need.window.start or row.window_end > need.window.end:
            raise PermanentError(
                "openmeter",
                f"meter {need.meter!r}, subject {need.subject!r}: OpenMeter answered a row for "
                f"[{row.window_start.isoformat()}, {row.window_end.isoformat()}), which straddles the period's window "
                f"[{need.window.start.isoformat()}, {need.window.end.isoformat()})",
            )
        if isinstance(row.value, Exception):
            raise row.value
        total += row.value
    if total < 0 or total > MAX_BILLABLE_TOTAL:
        raise PermanentError(
            "openmeter",
            f"meter {need.meter!r}, subject {need.subject!r}: OpenMeter's usage adds up to {total}, not billable",
        )
    return total


class Measurements:
    """What a batch of queries found: each need's total, or the error that kept it from being measured."""

    def __init__(self) -> None:
        self._found: dict[Need, Decimal | Exception] = {}
        self.failed_meters: set[str] = set()  # slugs of meters a query failed for

    def record(self, need: Need, value: Decimal | Exception) -> None:
        self._found[need] = value

    def total(self, need: Need) -> Decimal:
        value = self._found[need]
        if isinstance(value, Exception):
            raise value
        return value

    def __contains__(self, need: object) -> bool:
        return need in self._found


def measure(
    openmeter: UsageQueries, needs: Iterable[Need], meters: Mapping[str, KnownMeter], window_size: str, time_zone: str
) -> Measurements:
    """Run the planned queries one after another; a failed query fails only the needs it was for. A meter in
    `meters` is queried by its id, so that the aggregation the plan relied on is the meter's own."""
    found = Measurements()
    aggregations = {slug: meter.aggregation for slug, meter in meters.items()}
    for query in plan_queries(needs, aggregations, window_size):
        known = meters.get(query.meter)
        try:
            rows = openmeter.query_rows(
                query.meter,
                query.subjects,
                query.window,
                query.window_size,
                time_zone,
                meter_id=known.id if known else None,
            )
        except UpstreamError as exc:
            found.failed_meters.add(query.meter)
            for need in query.needs:
                found.record(need, exc)
            continue
        by_subject: dict[str, list[UsageRow]] = defaultdict(list)
        for row in rows:
            by_subject[row.subject].append(row)
        for need in query.needs:
            try:
                found.record(need, total_of(need, by_subject[need.subject]))
            except Exception as exc:  # a bad value: this subject's error, not the batch's
                found.record(need, exc)
    return found
