"""`reconciler report`: what was measured, reported and corrected, from the ledger, for people and machines.

One `Report` is built from the ledger (no upstream calls) and rendered as a table, JSON, CSV (the periods, or
the audit trail) or one self-contained HTML file with inline SVG charts that opens without a server.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from reconciler.attention import AttentionItem, items_needing_attention
from reconciler.balances.drift import UNCORRECTED
from reconciler.balances.money import to_units
from reconciler.ledger.schema import (
    BalanceObservation,
    BalanceResolution,
    IntentState,
    LateDrift,
    MoesifTransaction,
    UnbilledItem,
    UsagePeriod,
    UsageReport,
)
from reconciler.output import STYLE, rows_table_html


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


@dataclass(frozen=True)
class AuditRow:
    time: str
    system: str  # stripe | moesif | person (a decision made with `reconciler balances resolve`)
    request: str
    key: str  # meter event identifier / idempotency key, or Moesif transaction id
    customer: str
    amount: str
    outcome: str


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

    def _at_risk(self) -> str:
        """Per currency, e.g. `0.75 usd`: unreported usage of the periods and the usage of unbilled items, at their
        prices per unit; what cannot be priced is left out (counted in `unbilled_items_amount_unknown`)."""
        sums: dict[str, Decimal] = defaultdict(Decimal)
        for row in [*self.periods, *self.unbilled]:
            if row.at_risk is not None and row.currency:
                sums[row.currency] += Decimal(row.at_risk)
        return ", ".join(f"{amount} {currency}" for currency, amount in sorted(sums.items())) or "0"

    @property
    def needs_a_person(self) -> bool:
        return (
            bool(self.attention)
            or any(p.status in ("late drift", "failed") for p in self.periods)
            or any(d.action in UNCORRECTED for d in self.drift)
        )


def build_report(engine: Engine, since: datetime, until: datetime) -> Report:
    report = Report(since.isoformat(), until.isoformat())
    with Session(engine) as session:
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
            report.periods.append(
                PeriodRow(
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
            )
        for o in session.scalars(
            select(BalanceObservation)
            .where(BalanceObservation.observed_at >= since, BalanceObservation.observed_at < until)
            .order_by(BalanceObservation.observed_at)
        ):
            report.drift.append(
                DriftRow(o.customer_id, o.observed_at.isoformat(), o.currency, o.difference_minor, o.action)
            )
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
            report.audit.append(
                AuditRow(
                    r.created_at.isoformat(),
                    "stripe",
                    request,
                    r.identifier,
                    customer,
                    str(r.quantity),
                    r.state + (f": {r.error}" if r.error else ""),
                )
            )
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
            report.audit.append(
                AuditRow(
                    t.created_at.isoformat(),
                    "moesif",
                    "POST /v1/~/billing/reports/balance_transactions",
                    t.transaction_id,
                    t.customer_id,
                    f"{t.type} {t.amount_minor} {t.currency} minor units",
                    outcome,
                )
            )
        for r, t in session.execute(
            select(BalanceResolution, MoesifTransaction)
            .join(MoesifTransaction, MoesifTransaction.transaction_id == BalanceResolution.transaction_id)
            .where(BalanceResolution.resolved_at >= since, BalanceResolution.resolved_at < until)
            .order_by(BalanceResolution.resolved_at, BalanceResolution.id)
        ):
            amount = f"{t.type} {t.amount_minor} {t.currency} minor units"
            report.audit.append(
                AuditRow(
                    r.resolved_at.isoformat(),
                    "person",
                    f"reconciler balances resolve --{r.action.replace('_', '-')}",
                    r.transaction_id,
                    r.customer_id,
                    amount,
                    f"by {r.resolved_by}: was {r.was}" + (f"; note: {r.note}" if r.note else ""),
                )
            )
            if r.action == "not_applied":  # the one resend it allows is a write to Moesif too
                report.audit.append(
                    AuditRow(
                        r.resolved_at.isoformat(),
                        "moesif",
                        "POST /v1/~/billing/reports/balance_transactions (resent)",
                        r.transaction_id,
                        r.customer_id,
                        amount,
                        t.state + (f": {t.error}" if t.error else ""),
                    )
                )
        for u in session.scalars(select(UnbilledItem).order_by(UnbilledItem.customer_id, UnbilledItem.stripe_target)):
            at_risk = None
            if u.measured is not None and u.unit_amount is not None and u.currency:
                at_risk = str(to_units(Decimal(u.unit_amount) * u.measured, u.currency))
            report.unbilled.append(
                UnbilledRow(
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
            )
    report.audit.sort(key=lambda a: a.time)
    report.attention = items_needing_attention(engine)
    return report


def render_json(report: Report) -> str:
    return json.dumps(
        {
            "since": report.since,
            "until": report.until,
            "totals": report.totals,
            "periods": [asdict(p) for p in report.periods],
            "balance_drift": [asdict(d) for d in report.drift],
            "audit": [asdict(a) for a in report.audit],
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
    return [asdict(a) for a in report.audit] if audit else [asdict(p) for p in report.periods]


def _bar_chart(title: str, series: dict[str, tuple[int, int]], labels: tuple[str, str]) -> str:
    """Paired bars per day (e.g. measured vs reported), as inline SVG."""
    width, height, pad = 640, 220, 30
    days = sorted(series)
    peak = max([max(pair) for pair in series.values()] + [1])
    slot = (width - 2 * pad) / max(1, len(days))
    bars = []
    for i, day in enumerate(days):
        for j, value in enumerate(series[day]):
            h = (height - 2 * pad) * value / peak
            x = pad + i * slot + j * slot / 2.2
            bars.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{slot / 2.4:.1f}" height="{h:.1f}" '
                f'class="s{j}"><title>{html.escape(day)} {labels[j]}: {value}</title></rect>'
            )
    axis = "".join(
        f'<text x="{pad + i * slot:.1f}" y="{height - 8}" font-size="9">{html.escape(day[5:])}</text>'
        for i, day in enumerate(days)
    )
    return (
        f'<figure><figcaption>{html.escape(title)} (<span class="s0">■</span> {labels[0]}, '
        f'<span class="s1">■</span> {labels[1]})</figcaption><svg viewBox="0 0 {width} {height}" role="img">'
        f"{''.join(bars)}{axis}</svg></figure>"
    )


def render_html(report: Report) -> str:
    """One file, no external resources: a finance person opens it in any browser."""
    per_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in report.periods:
        per_day[p.period_start[:10]][0] += p.measured or 0
        per_day[p.period_start[:10]][1] += p.reported
    drift_by_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in report.drift:
        drift_by_day[d.observed_at[:10]][0] += abs(d.difference_minor)
        drift_by_day[d.observed_at[:10]][1] += abs(d.difference_minor) if d.action == "correct" else 0

    totals = "".join(f"<dt>{html.escape(k.replace('_', ' '))}</dt><dd>{v}</dd>" for k, v in report.totals.items())
    title = f"reconciler report {html.escape(report.since[:10])} – {html.escape(report.until[:10])}"
    usage_chart = _bar_chart(
        "Usage measured vs reported, by period start",
        {k: (v[0], v[1]) for k, v in per_day.items()},
        ("measured", "reported"),
    )
    drift_chart = _bar_chart(
        "Balance drift found vs corrected (minor units), by day",
        {k: (v[0], v[1]) for k, v in drift_by_day.items()},
        ("found", "corrected"),
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
{STYLE}
</style></head><body>
<h1>Usage and balance reconciliation</h1>
<p>From {html.escape(report.since)} to {html.escape(report.until)}.</p>
<h2>Totals</h2><dl id="totals">{totals}</dl>
{usage_chart}
{drift_chart}
<h2>Needs a person</h2>{rows_table_html([_attention_row(i) for i in report.attention])}
<h2>Metered items nobody bills</h2>{rows_table_html([asdict(u) for u in report.unbilled])}
<h2>Periods</h2>{rows_table_html([asdict(p) for p in report.periods])}
<h2>Balance drift</h2>{rows_table_html([asdict(d) for d in report.drift])}
<h2>Audit trail: every write to Stripe and Moesif</h2>{rows_table_html([asdict(a) for a in report.audit])}
</body></html>
"""
