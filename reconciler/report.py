"""`reconciler report`: what was measured, reported and corrected, from the ledger, for people and machines.

One `Report` is built from the ledger (no upstream calls) and rendered as a table, JSON, CSV (the periods, or
the audit trail) or one self-contained HTML file with inline SVG charts that opens without a server
(`reconciler.report_html`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from reconciler.attention import AttentionItem, items_needing_attention
from reconciler.balances.drift import UNCORRECTED
from reconciler.balances.money import to_units, units_text
from reconciler.balances.resolve import NOT_APPLIED
from reconciler.config import Config
from reconciler.ledger.schema import (
    BalanceObservation,
    BalanceResolution,
    LateDrift,
    MoesifTransaction,
    UnbilledItem,
    UsagePeriod,
    UsageReport,
)
from reconciler.usage.model import IntentState

# Marks a field the HTML page shows that JSON and CSV leave out: their shapes are what scripts already read.
PAGE_ONLY = {"page_only": True}


@dataclass(frozen=True)
class PeriodRow:
    customer: str
    stripe_target: str
    period_start: str
    period_end: str
    status: str  # provisional | final | late drift | failed
    measured: int | None
    reported: int
    difference: int
    stripe: str | None  # what Stripe held when `verify` last read it back
    at_risk: str | None  # unreported quantity × the price per unit, currency units; None: not estimated
    currency: str | None
    last_error: str | None


@dataclass(frozen=True)
class UnbilledRow:
    """A metered item nobody bills (usage sync refused it, or usage.meters does not map it)."""

    customer: str
    item: str
    stripe_target: str
    why: str  # unmapped | refused
    reason: str
    period_start: str | None
    measured: int | None  # its usage this period; None: unknown (unmapped: nothing says which meter to measure)
    at_risk: str | None  # measured × the price per unit, currency units; None: unknown
    currency: str | None


@dataclass(frozen=True)
class DriftRow:
    customer: str
    observed_at: str
    currency: str
    difference_minor: int
    action: str
    # The two balances compared (difference = expected − Moesif) and why the action, for the page.
    expected_minor: int | None = field(default=None, metadata=PAGE_ONLY)
    moesif_minor: int | None = field(default=None, metadata=PAGE_ONLY)
    reason: str = field(default="", metadata=PAGE_ONLY)


@dataclass(frozen=True)
class AuditRow:
    time: str
    system: str  # stripe | moesif | person (a decision made with `reconciler balances resolve`)
    request: str
    key: str  # meter event identifier / idempotency key, or Moesif transaction id
    customer: str
    amount: str
    outcome: str
    amount_in_units: str | None = field(default=None, metadata=PAGE_ONLY)  # money, e.g. `credit 25.00 USD`


def exported(row: DriftRow | AuditRow) -> dict[str, object]:
    """A row as JSON and CSV hold it: without the fields only the page shows."""
    return {f.name: getattr(row, f.name) for f in fields(row) if not f.metadata.get("page_only")}


@dataclass
class Report:
    since: str
    until: str
    periods: list[PeriodRow] = field(default_factory=list)
    drift: list[DriftRow] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    attention: list[AttentionItem] = field(default_factory=list)  # what needs a person now, whatever the window
    unbilled: list[UnbilledRow] = field(default_factory=list)  # as the latest usage cycle saw them

    @property
    def totals(self) -> dict[str, int]:
        return {
            "periods": len(self.periods),
            "measured": sum(p.measured or 0 for p in self.periods),
            "reported": sum(p.reported for p in self.periods),
            "unreported": sum(p.difference for p in self.periods),
            "revenue_at_risk": self._at_risk(),
            "unbilled_items": len(self.unbilled),
            "unbilled_items_amount_unknown": sum(1 for u in self.unbilled if u.at_risk is None),
            "late_drift_periods": sum(1 for p in self.periods if p.status == "late drift"),
            "failed_periods": sum(1 for p in self.periods if p.status == "failed"),
            "stripe_writes": sum(1 for a in self.audit if a.system == "stripe"),
            "moesif_writes": sum(1 for a in self.audit if a.system == "moesif"),
            "needing_a_person": len(self.attention),
        }

    def at_risk_by_currency(self) -> dict[str, Decimal]:
        """Unreported usage of the periods and the usage of unbilled items, at their prices per unit, in currency
        units; what cannot be priced is left out (counted in `unbilled_items_amount_unknown`)."""
        sums: dict[str, Decimal] = defaultdict(Decimal)
        for row in [*self.periods, *self.unbilled]:
            if row.at_risk is not None and row.currency:
                sums[row.currency] += Decimal(row.at_risk)
        return dict(sorted(sums.items()))

    def _at_risk(self) -> str:
        """Per currency, e.g. `0.75 usd`."""
        return ", ".join(f"{amount} {currency}" for currency, amount in self.at_risk_by_currency().items()) or "0"

    @property
    def needs_a_person(self) -> bool:
        return (
            bool(self.attention)
            or any(p.status in ("late drift", "failed") for p in self.periods)
            or any(d.action in UNCORRECTED for d in self.drift)
        )


def report_for(config: Config, since: datetime | None, until: datetime | None) -> tuple[Report, datetime, datetime]:
    """`reconciler report`: from the migrated ledger, over [since, until) (default: usage.lookback until now)."""
    from reconciler.app import opened_ledger
    from reconciler.clock import utc_now

    now = utc_now()
    since, until = since or now - config.usage.lookback, until or now
    with opened_ledger(config) as engine:
        return build_report(engine, since, until), since, until


def build_report(engine: Engine, since: datetime, until: datetime) -> Report:
    """The ledger's view of [since, until): one query per section, the audit trail in time order."""
    report = Report(since.isoformat(), until.isoformat())
    with Session(engine) as session:
        report.periods = list(_period_rows(session, since, until))
        report.drift = list(_drift_rows(session, since, until))
        writes = (_stripe_writes, _moesif_writes, _resolutions)
        report.audit = sorted((row for rows in writes for row in rows(session, since, until)), key=lambda a: a.time)
        report.unbilled = list(_unbilled_rows(session))
    report.attention = items_needing_attention(engine)
    return report


def _period_rows(session: Session, since: datetime, until: datetime) -> Iterator[PeriodRow]:
    periods = session.scalars(
        select(UsagePeriod)
        .where(UsagePeriod.period_end > since, UsagePeriod.period_start < until)
        .order_by(UsagePeriod.customer_id, UsagePeriod.stripe_target, UsagePeriod.period_start)
    ).all()
    drifted = set(session.scalars(select(LateDrift.period_id)))
    for p in periods:
        status = "failed" if p.last_error else "late drift" if p.id in drifted else p.status
        measured = p.late_total if p.late_total is not None else p.target
        difference = (measured or 0) - p.reported_total
        at_risk = None
        if p.unit_amount is not None and p.currency:
            at_risk = str(to_units(Decimal(p.unit_amount) * difference, p.currency))
        yield PeriodRow(
            p.customer_id,
            p.stripe_target,
            p.period_start.isoformat(),
            p.period_end.isoformat(),
            status,
            measured,
            p.reported_total,
            difference,
            p.stripe_total,
            at_risk,
            p.currency,
            p.last_error,
        )


def _drift_rows(session: Session, since: datetime, until: datetime) -> Iterator[DriftRow]:
    for o in session.scalars(
        select(BalanceObservation)
        .where(BalanceObservation.observed_at >= since, BalanceObservation.observed_at < until)
        .order_by(BalanceObservation.observed_at)
    ):
        yield DriftRow(
            o.customer_id,
            o.observed_at.isoformat(),
            o.currency,
            o.difference_minor,
            o.action,
            o.expected_minor,
            o.moesif_minor,
            o.reason,
        )


def _stripe_writes(session: Session, since: datetime, until: datetime) -> Iterator[AuditRow]:
    for r, customer, kind in session.execute(
        select(UsageReport, UsagePeriod.customer_id, UsagePeriod.kind)
        .join(UsagePeriod, UsagePeriod.id == UsageReport.period_id)
        .where(UsageReport.created_at >= since, UsageReport.created_at < until)
        .order_by(UsageReport.created_at, UsageReport.id)
    ):
        request = (
            "POST /v1/subscription_items/…/usage_records (action=set)"
            if kind == "legacy"
            else "POST /v1/billing/meter_events"
        )
        yield AuditRow(
            r.created_at.isoformat(),
            "stripe",
            request,
            r.identifier,
            customer,
            str(r.quantity),
            r.state + (f": {r.error}" if r.error else ""),
        )


def _moesif_writes(session: Session, since: datetime, until: datetime) -> Iterator[AuditRow]:
    for t in session.scalars(
        select(MoesifTransaction)
        .where(MoesifTransaction.created_at >= since, MoesifTransaction.created_at < until)
        .order_by(MoesifTransaction.created_at, MoesifTransaction.id)
    ):
        outcome = t.state + (" (outcome was unknown once)" if t.outcome_unknown else "")
        if t.state == IntentState.HELD:
            outcome += f": {t.error}"
        elif t.attention:
            outcome += f"; needs a person: {t.attention}"
        yield AuditRow(
            t.created_at.isoformat(),
            "moesif",
            "POST /v1/~/billing/reports/balance_transactions",
            t.transaction_id,
            t.customer_id,
            f"{t.type} {t.amount_minor} {t.currency} minor units",
            outcome,
            _in_units(t),
        )


def _resolutions(session: Session, since: datetime, until: datetime) -> Iterator[AuditRow]:
    """A person's decisions (`reconciler balances resolve`), and the one resend `not_applied` allows."""
    for r, t in session.execute(
        select(BalanceResolution, MoesifTransaction)
        .join(MoesifTransaction, MoesifTransaction.transaction_id == BalanceResolution.transaction_id)
        .where(BalanceResolution.resolved_at >= since, BalanceResolution.resolved_at < until)
        .order_by(BalanceResolution.resolved_at, BalanceResolution.id)
    ):
        amount, in_units = f"{t.type} {t.amount_minor} {t.currency} minor units", _in_units(t)
        yield AuditRow(
            r.resolved_at.isoformat(),
            "person",
            f"reconciler balances resolve --{r.action.replace('_', '-')}",
            r.transaction_id,
            r.customer_id,
            amount,
            f"by {r.resolved_by}: was {r.was}" + (f"; note: {r.note}" if r.note else ""),
            in_units,
        )
        if r.action == NOT_APPLIED:  # the one resend it allows is a write to Moesif too
            yield AuditRow(
                r.resolved_at.isoformat(),
                "moesif",
                "POST /v1/~/billing/reports/balance_transactions (resent)",
                r.transaction_id,
                r.customer_id,
                amount,
                t.state + (f": {t.error}" if t.error else ""),
                in_units,
            )


def _unbilled_rows(session: Session) -> Iterator[UnbilledRow]:
    for u in session.scalars(select(UnbilledItem).order_by(UnbilledItem.customer_id, UnbilledItem.stripe_target)):
        at_risk = None
        if u.measured is not None and u.unit_amount is not None and u.currency:
            at_risk = str(to_units(Decimal(u.unit_amount) * u.measured, u.currency))
        yield UnbilledRow(
            u.customer_id,
            u.subscription_item_id,
            u.stripe_target,
            "unmapped" if u.unmapped else "refused",
            u.reason,
            u.period_start.isoformat() if u.period_start else None,
            u.measured,
            at_risk,
            u.currency,
        )


def _in_units(t: MoesifTransaction) -> str:
    return f"{t.type} {units_text(to_units(t.amount_minor, t.currency), t.currency)}"


def report_json(report: Report) -> str:
    return json.dumps(
        {
            "since": report.since,
            "until": report.until,
            "totals": report.totals,
            "periods": [asdict(p) for p in report.periods],
            "balance_drift": [exported(d) for d in report.drift],
            "audit": [exported(a) for a in report.audit],
            "needs_a_person": report.needs_a_person,
            "attention": [_attention_row(i) for i in report.attention],
            "unbilled": [asdict(u) for u in report.unbilled],
        },
        indent=2,
    )


def _attention_row(item: AttentionItem) -> dict[str, object]:
    return {**asdict(item), "since": item.since.isoformat()}


def render_rows(report: Report, *, audit: bool = False) -> list[dict[str, object]]:
    """The rows a CSV export holds: the periods, or the audit trail."""
    return [exported(a) for a in report.audit] if audit else [asdict(p) for p in report.periods]
