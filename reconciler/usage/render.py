"""The usage commands' results for people and machines: `sync-usage` (a cycle), `backfill` and `read-back`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import structlog
from rich.console import Console
from rich.table import Column

from reconciler.output import View, table
from reconciler.usage.backfill import BackfillResult
from reconciler.usage.job import CycleResult
from reconciler.usage.readback import ReadBackResult

SUMMARY_COLUMNS = ("seen", "reported", "unchanged", "unmapped", "failed", "finalized", "late drift")


def cycle_view(result: CycleResult, dry_run: bool) -> View:
    """A dry run shows its plan, one row per stream period; a run its summary."""
    plan = [
        {
            "customer": p.work.stream.customer_id,
            "stripe_target": p.work.stream.stripe_target,
            "period_start": p.work.period.start.isoformat(),
            "period_end": p.work.period.end.isoformat(),
            "reported": p.reported_total,
            "measured": p.decision.target,
            "action": p.decision.action.value,
            "quantity": p.decision.quantity,
        }
        for p in result.plan
    ]
    payload = {
        "run_id": result.run_id,
        "dry_run": dry_run,
        "summary": result.summary.as_dict(),
        "failures": result.summary.failures,
        "plan": plan,
    }

    def as_table(console: Console) -> None:
        if dry_run:
            print_plan(result, console)
        print_summary(result, console)

    return View(
        "usage sync",
        plan or [{**result.summary.as_dict(), "failures": "; ".join(result.summary.failures)}],
        lambda: json.dumps(payload, indent=2),
        as_table,
    )


def print_summary(result: CycleResult, console: Console) -> None:
    counts = table(
        "usage sync" + (" (dry run)" if result.run_id is None else f" run {result.run_id}"),
        *(Column(name, justify="right") for name in SUMMARY_COLUMNS),
    )
    counts.add_row(*(str(v) for v in result.summary.as_dict().values()))
    console.print(counts)
    for failure in result.failures:
        console.print(f"failed: {failure}", markup=False, highlight=False)
    if result.interrupted:
        console.print("interrupted: stopped before every item was synced", markup=False)


def print_plan(result: CycleResult, console: Console) -> None:
    plan = table(
        "dry run: what would be sent",
        *("customer", "meter / price", "period", "reported", "measured", "action", "send"),
    )
    for planned in result.plan:
        work, decision = planned.work, planned.decision
        send = "" if decision.quantity is None else f"{decision.quantity} @ {decision.timestamp:%Y-%m-%d %H:%M:%S}"
        plan.add_row(
            work.stream.customer_id,
            work.stream.stripe_target,
            f"{work.period.start:%Y-%m-%d %H:%M} → {work.period.end:%Y-%m-%d %H:%M}",
            str(planned.reported_total),
            str(decision.target),
            decision.action.value + (" (final)" if decision.final else ""),
            send,
        )
    console.print(plan)


def backfill_view(result: BackfillResult, dry_run: bool) -> View:
    def as_table(console: Console) -> None:
        periods = table(
            "backfill" + (" (dry run: nothing sent or written)" if dry_run else ""),
            *("customer", "meter / price", "period", "ledger", "measured", "action", "quantity", "amount"),
        )
        for line in result.lines:
            periods.add_row(
                line.customer,
                line.stripe_target,
                f"{line.period_start[:10]} → {line.period_end[:10]}",
                str(line.ledger_total),
                str(line.measured),
                line.action,
                "" if line.quantity is None else str(line.quantity),
                line.amount or "",
            )
        console.print(periods)
        for line in result.lines:
            if line.action == "out_of_reach":
                console.print(
                    f"out of reach: {line.customer} {line.stripe_target} {line.period_start[:10]}: "
                    f"{line.quantity} units ({line.amount or 'amount not estimated'}): {line.reason}",
                    markup=False,
                )

    return View("backfill", [asdict(line) for line in result.lines], result.as_json, as_table)


@contextmanager
def backfill_progress(console: Console, total: int) -> Iterator[Callable[[int, int], None]]:
    """Progress for a backfill: a bar on a terminal, else a log line every 25 periods and at the end."""
    if not sys.stdout.isatty():
        log = structlog.get_logger("reconciler.backfill")

        def log_progress(done: int, total: int) -> None:
            if done == total or done % 25 == 0:
                log.info("backfill progress", done=done, total=total)

        yield log_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("backfill", total=total)
        yield lambda done, total: bar.update(task, completed=done)


def readback_view(result: ReadBackResult) -> View:
    periods: list[dict[str, Any]] = [asdict(line) for line in result.lines]
    payload = {"run_id": result.run_id, "summary": result.as_dict(), "failures": result.failures, "periods": periods}

    def as_table(console: Console) -> None:
        findings = table(
            f"read-back: {result.checked} read, {result.not_yet} not yet settled in Stripe",
            *("customer", "meter / price", "period start", "reported", "Stripe", "finding", "note"),
        )
        for line in result.lines:
            findings.add_row(
                line.customer,
                line.stripe_target,
                line.period_start[:16],
                str(line.reported),
                line.stripe or "",
                line.finding,
                line.note,
            )
        console.print(findings)
        for failure in result.failures:
            console.print(f"failed: {failure}", markup=False, highlight=False)

    return View("read-back", periods, lambda: json.dumps(payload, indent=2), as_table)
