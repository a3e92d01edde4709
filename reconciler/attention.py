"""What needs a person, from the ledger: one definition for `status`, `report` and the daemon's /metrics gauges.

Each kind of item is one SELECT whose rows are the items (with a `reason` and a `since` column): `status` and
`report` list them (`items_needing_attention`), and /metrics counts them per job and reason with the age of the
oldest (`attention_summary`, a grouped count over the same SELECT, read at every scrape). An item disappears when
the columns it is found by change: a held Moesif transaction until its state changes, `attention` or
`outcome_unknown` until cleared (`balances resolve`), a failing period until a cycle succeeds for it, balance drift
until the customer's latest observation is no longer uncorrected.

Jobs and reasons:
- balance_reconcile: outcome_unknown, held, invoice_payment, attention, uncorrected_drift
- usage_sync: late_drift, failed, rejected_by_stripe, and the read-back's missing_in_stripe and foreign_usage (until
  a `verify` finds the period agreeing)
- webhooks: given_up
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Row, Select, String, case, func, literal, select
from sqlalchemy.orm import aliased

from reconciler.balances.drift import UNCORRECTED
from reconciler.balances.money import to_units
from reconciler.jobs import JobName
from reconciler.ledger.schema import (
    REJECTED_BY_STRIPE,
    BalanceObservation,
    LateDrift,
    MoesifTransaction,
    UsagePeriod,
    WebhookEvent,
)
from reconciler.usage.model import IntentState
from reconciler.usage.readback import NEEDS_A_PERSON as READBACK_NEEDS_A_PERSON

BALANCES, USAGE, WEBHOOKS = JobName.BALANCE_RECONCILE, JobName.USAGE_SYNC, "webhooks"

# How `status` introduces an item of each reason.
PHRASES = {
    "outcome_unknown": "check in Moesif (an attempt's outcome was unknown)",
    "held": "not forwarded to Moesif, held for a person",
    "invoice_payment": "forwarded to Moesif, check it",
    "attention": "forwarded to Moesif, check it",
    "uncorrected_drift": "balance drift left uncorrected",
    "late_drift": "late drift, Stripe can no longer be told",
    "failed": "failing",
    "rejected_by_stripe": "failing",
    "missing_in_stripe": "Stripe holds less than we sent",
    "foreign_usage": "Stripe holds more than we sent",
    "given_up": "webhook work given up",
}


@dataclass(frozen=True)
class AttentionItem:
    job: str
    reason: str
    key: str  # the transaction id, period (`meter / price` and start) or webhook event id
    customer: str | None
    since: datetime  # when it started needing a person, as well as the ledger knows
    detail: str

    def line(self) -> str:
        who = f"{self.customer} " if self.customer else ""
        return f"{PHRASES.get(self.reason, self.reason)}: {who}{self.key}: {self.detail}"


@dataclass(frozen=True)
class _Kind:
    job: str
    statement: Select  # one row per item, with `reason` and `since` columns
    describe: Callable[[Row], tuple[str, str | None, str]]  # key, customer, detail


def _reason(value: str):
    return literal(value, String).label("reason")


def _kinds() -> list[_Kind]:
    # Over 80 lines on purpose: one declarative table, one entry per kind of item a person must look at, each a
    # short query; kept in one list so the kinds and their order (as status, report and /metrics show them) read
    # top to bottom, and a new kind is one more entry here.
    t = MoesifTransaction
    o = BalanceObservation
    newest = aliased(BalanceObservation)
    latest = select(func.max(newest.id)).group_by(newest.customer_id).scalar_subquery()
    ok = aliased(BalanceObservation)
    last_ok = (  # the customer's latest observation that needed no one
        select(func.max(ok.id))
        .where(ok.customer_id == o.customer_id, ok.action.not_in(list(UNCORRECTED)))
        .correlate(o)
        .scalar_subquery()
    )
    streak = aliased(BalanceObservation)
    drift_since = (
        select(func.min(streak.observed_at))
        .where(streak.customer_id == o.customer_id, streak.id > func.coalesce(last_ok, 0))
        .correlate(o)
        .scalar_subquery()
    )
    period = UsagePeriod
    rejected = period.last_error.like(f"{REJECTED_BY_STRIPE}%")

    period_columns = (period.customer_id, period.stripe_target, period.period_start)  # what period_key reads
    late_drift_columns = (*period_columns, period.reported_total, period.late_total)

    def period_key(r: Row) -> str:
        return f"{r.stripe_target} period {r.period_start:%Y-%m-%d}"

    return [
        _Kind(
            BALANCES,
            select(t.transaction_id, t.customer_id, _reason("outcome_unknown"), t.created_at.label("since")).where(
                t.outcome_unknown.is_(True)
            ),
            lambda r: (r.transaction_id, r.customer_id, "an attempt may have been applied without an answer"),
        ),
        _Kind(
            BALANCES,
            select(t.transaction_id, t.customer_id, t.error, _reason("held"), t.created_at.label("since")).where(
                t.state == IntentState.HELD
            ),
            lambda r: (r.transaction_id, r.customer_id, r.error or "held"),
        ),
        _Kind(
            BALANCES,
            select(
                t.transaction_id,
                t.customer_id,
                t.attention,
                # the text BalanceLedger.flag_invoice_payments writes
                case((t.attention.like("paid invoice %"), "invoice_payment"), else_="attention").label("reason"),
                t.created_at.label("since"),
            ).where(t.attention.is_not(None), t.state != IntentState.HELD),
            lambda r: (r.transaction_id, r.customer_id, r.attention),
        ),
        _Kind(
            BALANCES,
            select(
                o.customer_id,
                o.action,
                o.reason.label("why"),
                o.difference_minor,
                o.currency,
                _reason("uncorrected_drift"),
                drift_since.label("since"),
            ).where(o.id.in_(latest), o.action.in_(list(UNCORRECTED))),
            lambda r: (
                f"balance {r.currency}",
                r.customer_id,
                f"{r.action}: {to_units(r.difference_minor, r.currency):+} {r.currency.upper()}: {r.why}",
            ),
        ),
        _Kind(
            USAGE,
            select(*late_drift_columns, _reason("late_drift"), func.min(LateDrift.observed_at).label("since"))
            .join(LateDrift, LateDrift.period_id == period.id)
            .group_by(period.id, *late_drift_columns),
            lambda r: (
                period_key(r),
                r.customer_id,
                f"OpenMeter measures {r.late_total}, Stripe holds {r.reported_total}",
            ),
        ),
        _Kind(
            USAGE,
            select(
                *period_columns,
                period.last_error,
                case((rejected, "rejected_by_stripe"), else_="failed").label("reason"),
                # no column records the first failure: the age restarts at each failed attempt
                period.updated_at.label("since"),
            ).where(period.last_error.is_not(None)),
            lambda r: (period_key(r), r.customer_id, r.last_error),
        ),
        _Kind(
            USAGE,
            select(
                *period_columns,
                period.read_back_note,
                period.read_back_finding.label("reason"),
                period.read_back_at.label("since"),
            ).where(period.read_back_finding.in_(sorted(READBACK_NEEDS_A_PERSON))),
            lambda r: (period_key(r), r.customer_id, r.read_back_note or ""),
        ),
        _Kind(
            WEBHOOKS,
            select(
                WebhookEvent.event_id,
                WebhookEvent.customer_id,
                WebhookEvent.type,
                WebhookEvent.error,
                _reason("given_up"),
                WebhookEvent.received_at.label("since"),
            ).where(WebhookEvent.state == "failed"),
            lambda r: (r.event_id, r.customer_id, f"({r.type}): {r.error}"),
        ),
    ]


def items_needing_attention(engine: Engine) -> list[AttentionItem]:
    items = []
    with engine.connect() as connection:
        for kind in _kinds():
            for row in connection.execute(kind.statement):
                key, customer, detail = kind.describe(row)
                items.append(AttentionItem(kind.job, row.reason, key, customer, row.since, detail))
    return sorted(items, key=lambda i: (i.job, i.reason, i.since, i.key))


@dataclass(frozen=True)
class Count:
    job: str
    reason: str
    count: int
    oldest: datetime


def attention_summary(engine: Engine) -> list[Count]:
    """Items per job and reason, with the oldest one's `since`: grouped counts, no rows fetched."""
    counts = []
    with engine.connect() as connection:
        for kind in _kinds():
            items = kind.statement.subquery()
            for reason, count, oldest in connection.execute(
                select(items.c.reason, func.count(), func.min(items.c.since)).group_by(items.c.reason)
            ):
                counts.append(Count(kind.job, reason, count, oldest))
    return counts


class AttentionCollector(Collector):
    """reconciler_items_needing_attention{job,reason} and reconciler_oldest_item_needing_attention_seconds{job},
    read from the ledger at each scrape, so the age grows between cycles; 0 for a job with nothing waiting."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime], jobs: Callable[[], list[str]]):
        self._engine, self._clock, self._jobs = engine, clock, jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = attention_summary(self._engine)
        now = self._clock()
        items = GaugeMetricFamily(
            "reconciler_items_needing_attention", "Ledger items waiting for a person.", labels=["job", "reason"]
        )
        oldest = GaugeMetricFamily(
            "reconciler_oldest_item_needing_attention_seconds",
            "Age of the oldest item waiting for a person (0: none).",
            labels=["job"],
        )
        ages: dict[str, float] = dict.fromkeys([*self._jobs(), WEBHOOKS], 0.0)
        for c in counts:
            items.add_metric([c.job, c.reason], c.count)
            ages[c.job] = max(ages.get(c.job, 0.0), (now - c.oldest).total_seconds())
        for job, age in sorted(ages.items()):
            oldest.add_metric([job], max(age, 0.0))
        yield items
        yield oldest
