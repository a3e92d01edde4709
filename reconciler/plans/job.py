"""The plan sync cycle: recompute every user's entitlement from Stripe, send the app only what changed.

State always comes from Stripe's subscriptions, never from a webhook body, so a lost or out-of-order event is
corrected by the next cycle. The app acknowledges with a 2xx; only then does the ledger record the state as
known to the app. Anything else is retried with backoff, counted and reported; the cycle goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import structlog

from reconciler.config import Config
from reconciler.jobs import JobName
from reconciler.plans.desired import Entitlement, desired_entitlements
from reconciler.plans.ports import EntitlementsApp, PlanBook, Runs, StripeSubscriptions
from reconciler.redact import redact
from reconciler.results import RunStatus, run_status
from reconciler.upstream.errors import UpstreamError

log = structlog.get_logger(__name__)


class PlanAction(StrEnum):
    """What the sync did for one customer."""

    SENT = "sent"
    UNCHANGED = "unchanged"  # the app already has it
    SKIPPED = "skipped"  # the subscriptions say nothing the app can be sent: a person must look
    FAILED = "failed"  # the app or Stripe refused or failed: the next cycle tries again
    WOULD_SEND = "would send"  # a dry run


@dataclass
class PlanLine:
    customer_id: str
    user_id: str | None
    plan: str | None
    status: str | None
    action: PlanAction
    reason: str = ""


@dataclass
class PlanResult:
    job: ClassVar[str] = JobName.PLAN_SYNC
    run_id: str | None  # None: a dry run
    lines: list[PlanLine] = field(default_factory=list)
    aborted: bool = False  # Stripe's subscriptions could not be listed: nothing was synced

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.action in (PlanAction.FAILED, PlanAction.SKIPPED))

    @property
    def status(self) -> RunStatus:
        return run_status(
            dry_run=self.run_id is None,
            failed=len(self.failures),
            left_for_a_person=self.failed,
            aborted=self.aborted,
        )

    @property
    def failures(self) -> list[str]:
        return [f"{line.customer_id}: {line.reason}" for line in self.lines if line.action == PlanAction.FAILED]

    @property
    def attention(self) -> list[str]:
        """Customers skipped: their subscriptions say nothing the app can be sent until a person fixes them."""
        return [
            f"{line.customer_id}: skipped: {line.reason}" for line in self.lines if line.action == PlanAction.SKIPPED
        ]

    def counts(self) -> dict[str, object]:
        return self.summary()

    def summary(self) -> dict[str, object]:
        actions = [line.action for line in self.lines]
        return {a.value: actions.count(a) for a in PlanAction if a in actions}


class PlanSync:
    def __init__(
        self,
        config: Config,
        stripe: StripeSubscriptions,
        app: EntitlementsApp,
        ledger: PlanBook,
        runs: Runs,
    ):
        self._config = config
        self._stripe = stripe
        self._app = app
        self._ledger = ledger
        self._runs = runs

    def close(self) -> None:
        self._app.close()

    def run_cycle(
        self, *, dry_run: bool = False, customers: frozenset[str] = frozenset(), full: bool = False
    ) -> PlanResult:
        """One cycle; `full` re-sends every user's state (for an app that lost its data)."""
        run_id = None if dry_run else self._runs.start(JobName.PLAN_SYNC)
        result = PlanResult(run_id)
        with structlog.contextvars.bound_contextvars(run_id=run_id, dry_run=dry_run, job=JobName.PLAN_SYNC):
            try:
                entitlements, problems = desired_entitlements(
                    self._stripe.subscription_snapshots(customers), self._config.plans
                )
            except UpstreamError as exc:
                result.lines.append(PlanLine("*", None, None, None, PlanAction.FAILED, self._redact(str(exc))))
                result.aborted = True
                self._finish(result)
                return result
            for problem in problems:
                log.warning("customer skipped", customer=problem.customer_id, reason=problem.reason)
                result.lines.append(PlanLine(problem.customer_id, None, None, None, PlanAction.SKIPPED, problem.reason))
            known = self._ledger.acknowledged()
            for entitlement in entitlements:
                result.lines.append(self._sync_one(entitlement, known, full, dry_run))
            self._finish(result)
        return result

    def _sync_one(self, e: Entitlement, known: dict[str, tuple[str, str, str]], full: bool, dry_run: bool) -> PlanLine:
        line = PlanLine(e.customer_id, e.user_id, e.plan, e.status, PlanAction.UNCHANGED)
        if not full and known.get(e.customer_id) == (e.user_id, e.plan, e.status):
            return line
        if dry_run:
            line.action = PlanAction.WOULD_SEND
            return line
        with structlog.contextvars.bound_contextvars(customer=e.customer_id, user=e.user_id):
            try:
                self._app.send(e)
            except UpstreamError as exc:
                line.action, line.reason = PlanAction.FAILED, self._redact(str(exc))
                self._ledger.failed(e, line.reason)
                log.error("plan update not acknowledged", error=line.reason)
                return line
            self._ledger.acknowledge(e)
            log.info("plan update acknowledged", plan=e.plan, status=e.status)
        line.action = PlanAction.SENT
        return line

    def _redact(self, text: str) -> str:
        return redact(text, self._config.secret_values())

    def _finish(self, result: PlanResult) -> None:
        log.info("plan sync finished", **result.counts())
        if result.run_id is not None:
            self._runs.finish(result.run_id, result.status, result.counts())
