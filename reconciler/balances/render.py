"""The balance report, for people (a table) and for machines (JSON)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Column

from reconciler.balances.drift import DriftAction
from reconciler.balances.job import BalanceResult
from reconciler.output import View, table


def view(result: BalanceResult) -> View:
    return View(
        "balance reconcile",
        [c.as_dict() for c in result.customers],
        lambda: balance_json(result),
        lambda console: balance_table(result, console),
    )


def exit_code(result: BalanceResult, *, fail_on_drift: bool) -> int:
    """1: a customer failed; 3 (with --fail-on-drift): drift left uncorrected or money held; 1: money held (a
    person must place it: as loud as a failure); else 0."""
    if result.failed:
        return 1
    if fail_on_drift and (result.uncorrected_drift or result.held):
        return 3
    return 1 if result.held else 0


def balance_json(result: BalanceResult) -> str:
    return json.dumps(
        {
            "run_id": result.run_id,
            "dry_run": result.dry_run,
            "summary": result.summary(),
            "customers": [c.as_dict() for c in result.customers],
            "failures": result.failures,
        },
        indent=2,
    )


def balance_table(result: BalanceResult, console: Console) -> None:
    title = "balance reconcile" + (" (dry run: nothing sent or written)" if result.dry_run else f" run {result.run_id}")
    balances = table(
        title,
        *("customer", "cur"),
        *(Column(name, justify="right") for name in ("Stripe expected", "Moesif", "difference")),
        "action",
    )
    for c in result.customers:
        balances.add_row(
            c.customer_id,
            c.currency.upper(),
            "" if c.stripe_expected is None else str(c.stripe_expected),
            "" if c.moesif is None else str(c.moesif),
            "" if c.difference is None else f"{c.difference:+}",
            "failed" if c.error else c.action + ("" if c.moesif_reread else ", Moesif not re-read"),
        )
    console.print(balances)
    for c in result.customers:
        for line in c.forwarded:
            console.print(f"{c.customer_id}: {'would send' if result.dry_run else 'sent'} {line}", markup=False)
        if c.action and c.reason and c.action != DriftAction.IN_SYNC:
            console.print(f"{c.customer_id}: {c.action}: {c.reason}", markup=False)
        for flag in c.flags:
            console.print(f"{c.customer_id}: CHECK: {flag}", markup=False)
        for line in c.held:
            console.print(f"{c.customer_id}: NOT FORWARDED, held for a person: {line}", markup=False)
        if c.error:
            console.print(f"{c.customer_id}: failed: {c.error}", markup=False)
    summary = result.summary()
    console.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items()), markup=False)
