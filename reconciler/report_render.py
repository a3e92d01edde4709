"""`report` for people (tables) and machines (JSON, CSV), and its HTML page (`reconciler.report_html`)."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console

from reconciler.output import View, table
from reconciler.report import Report, render_rows, report_json
from reconciler.report_html import render_html


def view(built: Report, since: datetime, until: datetime, *, audit: bool = False) -> View:
    return View(
        "report",
        render_rows(built, audit=audit),
        lambda: report_json(built),
        lambda console: report_table(built, since, until, console),
        page=lambda: render_html(built),
    )


def report_table(built: Report, since: datetime, until: datetime, console: Console) -> None:
    periods = table(
        f"report {since:%Y-%m-%d} → {until:%Y-%m-%d}",
        *("customer", "meter / price", "period start", "status", "measured", "reported", "difference"),
    )
    for p in built.periods:
        periods.add_row(
            p.customer,
            p.stripe_target,
            p.period_start[:10],
            p.status,
            str(p.measured),
            str(p.reported),
            f"{p.difference:+}",
        )
    console.print(periods)
    console.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in built.totals.items()), markup=False)
    if built.unbilled:
        unbilled = table(
            "metered items nobody bills",
            *("customer", "item", "meter / price", "why", "measured", "at risk", "reason"),
        )
        for u in built.unbilled:
            at_risk = f"{u.at_risk} {u.currency}" if u.at_risk is not None else "unknown"
            measured = "unknown" if u.measured is None else str(u.measured)
            unbilled.add_row(u.customer, u.item, u.stripe_target, u.why, measured, at_risk, u.reason)
        console.print(unbilled)
    if built.attention:
        needs = table("needs a person", "job", "reason", "customer", "item", "since", "detail")
        for i in built.attention:
            needs.add_row(i.job, i.reason, i.customer or "", i.key, f"{i.since:%Y-%m-%d %H:%M:%S}", i.detail)
        console.print(needs)
