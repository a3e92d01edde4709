"""`reconciler backfill`: re-drive past periods after an outage, a migration, a mapping fix or late usage.

Every stream period overlapping the range is measured again and goes through the same rules and ledger as
the scheduled sync, so nothing is ever reported twice. A difference Stripe can still bill (meter prices until
the invoice finalizes; legacy prices only in the current period) is reported; any other is out of reach and
listed with the quantity and the amount at stake, for a credit note or an invoice item, never sent. A
checkpoint per run lets the same command continue where an interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from reconciler.balances.money import to_units
from reconciler.jobs import JobName
from reconciler.results import RunStatus, run_status
from reconciler.usage.decide import Action
from reconciler.usage.job import CycleResult, PlannedReport, UsageSync
from reconciler.usage.model import CycleSummary, MeteredItem, StreamPeriod
from reconciler.usage.ports import BackfillCheckpoints, Runs


@dataclass(frozen=True)
class BackfillLine:
    customer: str
    stripe_target: str
    period_start: str
    period_end: str
    ledger_total: int | None
    measured: int | None
    action: str  # report | unchanged | out_of_reach | failed (dry run: would_report)
    quantity: int | None  # sent (report) or at stake (out of reach)
    amount: str | None  # at stake, currency units, when the price is per-unit
    reason: str


@dataclass
class BackfillResult:
    run_id: str | None
    resumed_from: int = 0  # stream periods already done by the interrupted run this one continues
    lines: list[BackfillLine] = field(default_factory=list)

    job: ClassVar[str] = JobName.BACKFILL

    def count(self, action: str) -> int:
        return sum(1 for line in self.lines if line.action == action)

    # -- the shared shape (reconciler.results.JobResult) --

    @property
    def status(self) -> RunStatus:
        return run_status(dry_run=self.run_id is None, failed=self.count("failed"))

    @property
    def failures(self) -> list[str]:
        return [_described(line) for line in self.lines if line.action == "failed"]

    @property
    def attention(self) -> list[str]:
        """Usage Stripe can no longer bill: a credit note or an invoice item, for a person."""
        return [_described(line) for line in self.lines if line.action == "out_of_reach"]

    def counts(self) -> dict[str, object]:
        return {a: self.count(a) for a in ("report", "out_of_reach", "failed")}

    def as_json(self) -> str:
        summary = {a: self.count(a) for a in ("report", "would_report", "unchanged", "out_of_reach", "failed")}
        return json.dumps(
            {
                "run_id": self.run_id,
                "resumed_from": self.resumed_from,
                "summary": summary,
                "periods": [asdict(line) for line in self.lines],
            },
            indent=2,
        )


def unit_key(work: StreamPeriod) -> str:
    return f"{work.stream.key}@{work.period.start.isoformat()}"


def command_key(since: datetime, until: datetime, customers: frozenset[str], meters: frozenset[str]) -> str:
    text = json.dumps([since.isoformat(), until.isoformat(), sorted(customers), sorted(meters)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Backfill:
    def __init__(self, usage_sync: UsageSync, checkpoints: BackfillCheckpoints, runs: Runs):
        self._usage_sync = usage_sync
        self._checkpoints = checkpoints
        self._runs = runs

    def plan(
        self, since: datetime, until: datetime, customers: frozenset[str], meters: frozenset[str]
    ) -> list[tuple[StreamPeriod, MeteredItem]]:
        return self._usage_sync.backfill_work(since, until, customers, meters)

    def run(
        self,
        units: list[tuple[StreamPeriod, MeteredItem]],
        key: str,
        *,
        dry_run: bool,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> BackfillResult:
        result = BackfillResult(run_id=None)
        cycle = CycleResult(run_id=None, summary=CycleSummary())
        done: set[str] = set()
        checkpoint_id = None
        if not dry_run:
            checkpoint_id, done = self._checkpoints.start_or_resume(key, len(units))
            result.run_id = self._runs.start(JobName.BACKFILL)
            result.resumed_from = len(done)
        for position, (work, item) in enumerate(units, start=1):
            if unit_key(work) not in done:
                planned = self._usage_sync.sync_for_backfill(work, result.run_id, cycle)
                result.lines.append(_line(work, item, planned, dry_run))
                if checkpoint_id is not None:
                    self._checkpoints.done(checkpoint_id, unit_key(work))
            progress(position, len(units))
        if checkpoint_id is not None and result.run_id is not None:
            self._checkpoints.finish(checkpoint_id)
            self._runs.finish(result.run_id, result.status, result.counts())
        return result

    def reports_planned(self, units: list[tuple[StreamPeriod, MeteredItem]], key: str) -> int:
        """How many reports a run over `units` would send to Stripe (a dry run, counted): what the command asks
        a person to confirm above backfill.confirm_above."""
        return self.run(units, key, dry_run=True).count("would_report")


def _described(line: BackfillLine) -> str:
    return f"{line.customer} {line.stripe_target} {line.period_start}: {line.reason}"


def _line(work: StreamPeriod, item: MeteredItem, planned: PlannedReport | None, dry_run: bool) -> BackfillLine:
    def line(action: str, quantity: int | None = None, amount: str | None = None, reason: str = "") -> BackfillLine:
        return BackfillLine(
            customer=work.stream.customer_id,
            stripe_target=work.stream.stripe_target,
            period_start=work.period.start.isoformat(),
            period_end=work.period.end.isoformat(),
            ledger_total=planned.reported_total if planned else None,
            measured=planned.decision.target if planned else None,
            action=action,
            quantity=quantity,
            amount=amount,
            reason=reason,
        )

    if planned is None:
        return line("failed", reason="see the log and `reconciler status`")
    decision = planned.decision
    if decision.action is Action.REPORT:
        return line("would_report" if dry_run else "report", decision.quantity, reason=decision.reason)
    known_drift = decision.action is Action.UNCHANGED and decision.target != planned.reported_total
    if decision.action is Action.LATE_DRIFT or known_drift:  # listed every time, never silently skipped
        at_stake = decision.target - planned.reported_total
        amount = None
        if item.unit_amount is not None:
            amount = str(to_units(Decimal(at_stake) * item.unit_amount, item.currency))
        reason = "already recorded as late drift: the period is final" if known_drift else decision.reason
        return line("out_of_reach", at_stake, amount, reason)
    if decision.action is Action.FAIL:
        return line("failed", reason=decision.reason)
    return line("unchanged", reason=decision.reason)
