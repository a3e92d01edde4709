"""The read-back job: before a period's invoice closes, check that Stripe holds what the ledger says it sent.

Stripe validates and aggregates meter events asynchronously and names the events it rejects only by sample in its
error reports (https://docs.stripe.com/api/v2/core/events/event-types: "a Meter has invalid async usage events";
https://docs.stripe.com/api/billing/meter-event-summary: summaries are "an eventually consistent view"). An
accepted event may therefore never count, and its error report may name it or not, or be lost. So once for each
period after its final sync (and again for any period an error report names), once `stripe.summary_lag` has passed
since the newest event of ours its summary covers, the job reads Stripe's summary (legacy items: their usage
record summary) and compares it with the ledger's `reported_total`:

- equal: read back, nothing to do.
- less, and an error report named our events (positive evidence), while the invoice still takes usage (before
  `period end + stripe.invoice_grace_period`): the ledger takes Stripe's number and reopens the period, and a
  usage cycle for the customer (run at once by the caller) sends what OpenMeter measured under a new identifier
  (`sum`: the shortfall; `last`: the total again, dated after every event Stripe still holds). The period is read
  back once more when it is final.
- less without evidence, less after the invoice finalized, or more (another writer): never guessed; the period is
  reported for a person (`status`, `report`, /metrics, and `verify` exits 3 on it).

It costs one summary listing per period per billing period (again only after a resend), inside the Stripe budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import ClassVar

import structlog

from reconciler.config import Config
from reconciler.jobs import JobName
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.results import RunStatus, run_status
from reconciler.upstream.errors import UpstreamError
from reconciler.usage.model import RecordedPeriod
from reconciler.usage.ports import ReadBackBook, Runs
from reconciler.usage.stripe_view import StripeView, settled

log = structlog.get_logger(__name__)

JOB = JobName.USAGE_READBACK


class Finding(StrEnum):
    OK = "ok"
    RESENDING = "resending"  # error reports explain a shortfall: reopened, resent by a usage cycle
    MISSING_IN_STRIPE = "missing_in_stripe"  # for a person
    FOREIGN_USAGE = "foreign_usage"  # for a person
    UNVERIFIABLE = "unverifiable"  # Stripe's summaries cannot show the period, and nothing says it is short


NEEDS_A_PERSON = frozenset({Finding.MISSING_IN_STRIPE, Finding.FOREIGN_USAGE})


def assess(*, reported: int, held: Decimal | None, rejected: int, writable: bool) -> tuple[Finding, str]:
    """The finding for one period whose summary has settled. `rejected`: how many of our events error reports
    named; `writable`: the period's invoice still takes usage."""
    named = f"Stripe's error reports named {rejected} of our events"
    if held is None:
        if rejected:
            return Finding.MISSING_IN_STRIPE, f"{named}, and its summaries cannot show this period: check it there"
        return Finding.UNVERIFIABLE, "Stripe's summaries cannot show this period on its own"
    if held == reported:
        return Finding.OK, ""
    if held > reported:
        return Finding.FOREIGN_USAGE, f"Stripe holds {held - reported} more than the reconciler sent (another writer?)"
    short = f"Stripe holds {held}, {reported - held} less than the reconciler sent"
    if not rejected:
        return Finding.MISSING_IN_STRIPE, (
            f"{short}, and no error report names our events: check it in Stripe; resending could bill twice"
        )
    if not writable:
        return Finding.MISSING_IN_STRIPE, f"{short}; {named}, but the invoice has finalized: it can take no resend"
    if held != held.to_integral_value():
        return Finding.MISSING_IN_STRIPE, f"{short}; {named}, but Stripe's total is fractional: check it there"
    return Finding.RESENDING, f"{short}; {named}: the difference is resent under a new identifier"


@dataclass(frozen=True)
class ReadBackLine:
    customer: str
    stripe_target: str
    period_start: str
    reported: int  # what the ledger says Stripe holds because of us
    stripe: str | None  # what Stripe's summary holds
    finding: str
    note: str


@dataclass
class ReadBackResult:
    job: ClassVar[str] = JOB
    run_id: str
    checked: int = 0  # summaries read
    not_yet: int = 0  # due, but an event of ours is younger than stripe.summary_lag
    findings: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lines: list[ReadBackLine] = field(default_factory=list)
    # Customers with a period reopened for a resend: the caller runs a usage cycle for them at once, under whatever
    # keeps usage cycles apart, rather than leave the resend to the next scheduled one.
    resent_customers: frozenset[str] = frozenset()
    interrupted: bool = False  # a stop was requested before every due period was read

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "not_yet": self.not_yet,
            **self.findings,
            "failed": len(self.failures),
        }

    @property
    def needs_a_person(self) -> int:
        return sum(self.findings.get(finding, 0) for finding in NEEDS_A_PERSON)

    # -- the shared shape (reconciler.results.JobResult) --

    @property
    def status(self) -> RunStatus:
        return run_status(dry_run=False, failed=len(self.failures), interrupted=self.interrupted)

    @property
    def attention(self) -> list[str]:
        return [
            f"{line.customer} {line.stripe_target} {line.period_start}: {line.finding}: {line.note}"
            for line in self.lines
            if line.finding in NEEDS_A_PERSON
        ]

    def counts(self) -> dict[str, object]:
        return self.as_dict()


class ReadBack:
    def __init__(
        self,
        config: Config,
        view: StripeView,
        ledger: ReadBackBook,
        runs: Runs,
        clock: Callable[[], datetime],
        *,
        stop_requested: Callable[[], bool] = lambda: False,
        metrics: Metrics = NO_METRICS,
    ):
        self._config = config
        self._stop_requested = stop_requested
        self._view = view
        self._ledger = ledger
        self._runs = runs
        self._clock = clock
        self._metrics = metrics

    def run_cycle(self) -> ReadBackResult:
        started = time.perf_counter()
        now = self._clock()
        result = ReadBackResult(run_id=self._runs.start(JOB))
        resend: set[str] = set()
        with structlog.contextvars.bound_contextvars(run_id=result.run_id):
            log.info("read-back started")
            for period in self._ledger.due(now, self._config.usage.lookback):
                if self._stop_requested():
                    result.interrupted = True
                    break  # SIGTERM: the rest is read at the next run
                if self._read_back(period, now, result):
                    resend.add(period.customer_id)
            result.resent_customers = frozenset(resend)
            self._runs.finish(result.run_id, result.status, result.counts())
            log.info("read-back finished", **result.counts())
        self._metrics.job_finished(result, time.perf_counter() - started)
        return result

    def _read_back(self, period: RecordedPeriod, now: datetime, result: ReadBackResult) -> bool:
        """Reads one period back and records what it found; True if it was reopened for a resend."""
        if not settled(self._view.newest_send(period, now), now, self._config.stripe.summary_lag):
            result.not_yet += 1  # not yet known is never missing: read at a later run, no call spent now
            return False
        try:
            holding = self._view.holding(period, now)
        except UpstreamError as exc:
            result.failures.append(f"{period.customer_id} {period.stripe_target}: {exc}")
            log.warning("read-back failed", customer=period.customer_id, target=period.stripe_target, error=str(exc))
            return False
        result.checked += 1
        writable = period.meter_id is not None and now < period.period_end + self._config.stripe.invoice_grace_period
        rejected = self._ledger.rejected_reports(period.id)
        finding, note = assess(reported=period.reported_total, held=holding.total, rejected=rejected, writable=writable)
        note = "; ".join(part for part in (note, holding.note) if part)
        reopened = False
        if finding is Finding.RESENDING:
            assert holding.total is not None
            reopened = self._ledger.reopen_for_resend(period, int(holding.total), note)
            if not reopened:  # a usage cycle wrote an intent meanwhile: read back at a later run
                return False
        else:
            self._ledger.record(period.id, finding, note, holding.total)
        result.findings[finding] = result.findings.get(finding, 0) + 1
        line = ReadBackLine(
            customer=period.customer_id,
            stripe_target=period.stripe_target,
            period_start=period.period_start.isoformat(),
            reported=period.reported_total,
            stripe=None if holding.total is None else str(holding.total),
            finding=str(finding),
            note=note,
        )
        result.lines.append(line)
        (log.warning if finding in NEEDS_A_PERSON or reopened else log.info)("read back", **asdict(line))
        return reopened
