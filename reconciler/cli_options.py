"""The command line's options, declared once: the commands in `reconciler.cli` (and the sandbox's) share them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from reconciler.errors import SetupError


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    html = "html"


def _when(option: str) -> Callable[[str], datetime]:
    """An option naming a time: a date (midnight UTC) or an ISO 8601 time (UTC unless it says otherwise)."""

    def parse(value: str) -> datetime:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise SetupError(f"{option}: {value!r} is not a date (YYYY-MM-DD or an ISO 8601 time)") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    return parse


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.yaml to use (default: $RECONCILER_CONFIG, else ./config.yaml)"),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; send and write nothing.")]
CustomerOption = Annotated[list[str] | None, typer.Option("--customer", help="Only this Stripe customer (repeatable).")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table, json, csv or html.")]
OutputOption = Annotated[Path | None, typer.Option("--output", help="Write the result to this file.")]

FailOnUnmapped = Annotated[
    bool, typer.Option("--fail-on-unmapped", help="Exit 1 when a metered item has no entry in usage.meters.")
]
FailOnDrift = Annotated[bool, typer.Option("--fail-on-drift", help="Exit 3 when uncorrected drift remains.")]
ReportFailOnDrift = Annotated[
    bool, typer.Option("--fail-on-drift", help="Exit 3 when anything needs a person (see `status`), e.g. late drift.")
]
TransactionId = Annotated[str, typer.Argument(help="The Moesif transaction_id (pi_…, re_…, reconciler-drift-…).")]
Applied = Annotated[
    bool | None,
    typer.Option(
        "--applied/--not-applied",
        help="Moesif has it (close it) / Moesif does not have it (resend it once, same transaction_id).",
    ),
]
Note = Annotated[str | None, typer.Option("--note", help="Why, for the audit trail.")]
By = Annotated[str | None, typer.Option("--by", help="Who decided (default: the login name).")]
Full = Annotated[bool, typer.Option("--full", help="Re-send every user's state (for an app that lost it).")]
BackfillFrom = Annotated[
    datetime, typer.Option("--from", parser=_when("--from"), help="Start of the range (YYYY-MM-DD or ISO 8601).")
]
BackfillTo = Annotated[datetime, typer.Option("--to", parser=_when("--to"), help="End of the range, exclusive.")]
Meter = Annotated[list[str] | None, typer.Option("--meter", help="Only this meter event_name / price.")]
Yes = Annotated[bool, typer.Option("--yes", help="Do not ask before sending many reports.")]
VerifyFrom = Annotated[
    datetime | None,
    typer.Option("--from", parser=_when("--from"), help="Periods ending after this date (default: lookback)."),
]
VerifyTo = Annotated[
    datetime | None,
    typer.Option("--to", parser=_when("--to"), help="Periods starting before this date (default: now)."),
]
ReportFrom = Annotated[
    datetime | None, typer.Option("--from", parser=_when("--from"), help="Start (default: usage.lookback ago).")
]
ReportTo = Annotated[datetime | None, typer.Option("--to", parser=_when("--to"), help="End, exclusive (default: now).")]
Audit = Annotated[bool, typer.Option("--audit", help="CSV: the audit trail instead of the periods.")]
MaxItems = Annotated[
    int, typer.Option("--max-items", min=1, help="Metered items to read for unmapped prices and a Moesif sample.")
]
