"""`sync-plans`' result for people and machines."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console

from reconciler.output import View, table
from reconciler.plans.job import PlanResult


def view(result: PlanResult, dry_run: bool) -> View:
    rows = [asdict(line) for line in result.lines]
    payload = {"run_id": result.run_id, "dry_run": dry_run, "summary": result.summary(), "customers": rows}

    def as_table(console: Console) -> None:
        title = "plan sync" + (" (dry run: nothing sent or written)" if dry_run else f" run {result.run_id}")
        lines = table(title, "customer", "user", "plan", "status", "action", "reason")
        for line in result.lines:
            lines.add_row(
                line.customer_id, line.user_id or "", line.plan or "", line.status or "", line.action, line.reason
            )
        console.print(lines)
        console.print(", ".join(f"{k} {v}" for k, v in result.summary().items()) or "nothing to do", markup=False)

    return View("plan sync", rows, lambda: json.dumps(payload, indent=2), as_table)
