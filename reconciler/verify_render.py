"""`verify`'s findings for people and machines."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console

from reconciler.output import View, table
from reconciler.verify import VerifyLine, verify_json


def view(lines: list[VerifyLine]) -> View:
    def as_table(console: Console) -> None:
        findings = table(
            "verify: Stripe's view against the ledger and OpenMeter",
            *("customer", "meter / price", "period start", "status", "measured", "reported", "Stripe"),
            *("finding", "note"),
        )
        for line in lines:
            findings.add_row(
                line.customer,
                line.stripe_target,
                line.period_start[:16],
                line.ledger_status,
                "" if line.measured is None else str(line.measured),
                str(line.reported),
                line.stripe or "",
                line.finding,
                line.note,
            )
        console.print(findings)

    return View("verify", [asdict(line) for line in lines], lambda: verify_json(lines), as_table)
