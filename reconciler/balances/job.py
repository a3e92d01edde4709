"""The balance cycle: forward Stripe top-ups and refunds to Moesif exactly once, then compare balances.

Per mapped customer: resend what a crash left pending (same transaction id, flagged), forward every succeeded
top-up PaymentIntent not yet forwarded (credit, `transaction_id` = PaymentIntent id) and every refund of a
top-up (debit, `transaction_id` = refund id), then compare Stripe's credit with Moesif's balance
(reconciler.balances.drift) and, when allowed, send one correction. One customer's failure is logged with its
context and counted; the cycle goes on.

This module is the shell; each part lives in its own: what Stripe holds to forward (payments), forwarding it
exactly once (forwarding), sending one recorded Moesif transaction (transactions), observing, assessing and
correcting the balances (comparison, around the pure drift.assess), and the ports it all calls through (ports).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import ClassVar, TypeVar

import structlog

from reconciler.balances.accounts import CustomerAccount, UnpricedUsageError, map_accounts
from reconciler.balances.comparison import Comparison
from reconciler.balances.drift import UNCORRECTED, DriftAction
from reconciler.balances.forwarding import Forwarding, flag_forwarded_invoice_payments
from reconciler.balances.payments import StripeMoney, StripeMoneyReader
from reconciler.balances.ports import BalanceBook, MoesifBalances, Runs, StripeBalanceReads
from reconciler.balances.sweep import LastObservation
from reconciler.balances.transactions import TransactionSender
from reconciler.config import Config
from reconciler.jobs import JobName
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.results import RunStatus, run_status
from reconciler.upstream.errors import UpstreamError

log = structlog.get_logger(__name__)
T = TypeVar("T")

HOLD_CORRECTIONS = "a refund could not be attributed to its customer this cycle; corrections wait for the next"


@dataclass
class CustomerReport:
    """One line of the balance report."""

    customer_id: str
    subscription_id: str
    currency: str
    stripe_expected: Decimal | None = None  # Stripe credit minus open usage, currency units
    moesif: Decimal | None = None
    difference: Decimal | None = None
    action: str = ""
    reason: str = ""
    forwarded: list[str] = field(default_factory=list)  # "credit 25.00 pi_..." lines, sent or planned
    flags: list[str] = field(default_factory=list)  # things a person must look at
    held: list[str] = field(default_factory=list)  # money found this cycle that the job will not forward
    error: str | None = None
    moesif_reread: bool = True  # False: unchanged since an observation that agreed (balances.full_sweep_interval)

    def as_dict(self) -> dict[str, object]:
        def number(value: Decimal | None) -> str | None:
            return None if value is None else str(value)

        return {
            "customer": self.customer_id,
            "subscription": self.subscription_id,
            "currency": self.currency,
            "stripe_expected": number(self.stripe_expected),
            "moesif": number(self.moesif),
            "difference": number(self.difference),
            "action": self.action,
            "reason": self.reason,
            "forwarded": self.forwarded,
            "flags": self.flags,
            "held": self.held,
            "error": self.error,
            "moesif_reread": self.moesif_reread,
        }


@dataclass
class BalanceResult:
    job: ClassVar[str] = JobName.BALANCE_RECONCILE
    run_id: str | None
    dry_run: bool
    customers: list[CustomerReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def held(self) -> int:
        return sum(len(c.held) for c in self.customers)

    @property
    def status(self) -> RunStatus:
        """Partial when a customer failed or money was held for a person: either needs one."""
        return run_status(dry_run=self.dry_run, failed=self.failed, left_for_a_person=self.held)

    @property
    def attention(self) -> list[str]:
        """Money held for a person, and drift left uncorrected."""
        held = [f"{c.customer_id}: held: {line}" for c in self.customers for line in c.held]
        return held + [f"{c.customer_id}: {c.action}: {c.reason}" for c in self.customers if c.action in UNCORRECTED]

    def counts(self) -> dict[str, object]:
        return self.summary()

    @property
    def uncorrected_drift(self) -> int:
        return sum(1 for c in self.customers if c.action in UNCORRECTED)

    def summary(self) -> dict[str, object]:
        actions = [c.action for c in self.customers]
        return {
            "customers": len(self.customers),
            "forwarded": sum(len(c.forwarded) for c in self.customers),
            "in_sync": actions.count(DriftAction.IN_SYNC.value),
            "moesif_not_reread": sum(1 for c in self.customers if not c.moesif_reread),
            "corrected": actions.count(DriftAction.CORRECT.value),
            "settling": actions.count(DriftAction.SETTLING.value),
            "uncorrected_drift": self.uncorrected_drift,
            "flagged": sum(len(c.flags) for c in self.customers),
            "held": self.held,
            "failed": self.failed,
        }


class BalanceSync:
    """The shell: lists what the cycle needs, then per customer settles what an earlier run left pending, forwards
    new money (reconciler.balances.forwarding) and compares balances (reconciler.balances.comparison)."""

    def __init__(
        self,
        config: Config,
        stripe: StripeBalanceReads,
        moesif: MoesifBalances,
        ledger: BalanceBook,
        runs: Runs,
        clock: Callable[[], datetime],
        stop_requested: Callable[[], bool] = lambda: False,
        metrics: Metrics = NO_METRICS,
    ):
        self._config = config
        self._metrics = metrics
        self._settings = config.balances
        self._stripe = stripe
        self._moesif = moesif
        self._ledger = ledger
        self._runs = runs
        self._clock = clock
        self._stop_requested = stop_requested
        self._payments = StripeMoneyReader(stripe, self._settings.topups, self._redact)
        self._sender = TransactionSender(moesif, ledger, config.moesif, self._settings.stripe_source, self._redact)
        self._forwarding = Forwarding(ledger, self._sender)
        self._comparison = Comparison(
            self._settings, config.stripe.invoice_grace_period, stripe, moesif, ledger, self._sender, clock
        )

    def run_cycle(self, *, dry_run: bool = False, customers: frozenset[str] = frozenset()) -> BalanceResult:
        started = time.perf_counter()
        if dry_run:
            result = self._cycle(dry_run, customers)
        else:
            # Shared with other cycles; waits while a person resolves a transaction (`balances resolve`).
            with self._ledger.job_lock(exclusive=False):
                result = self._cycle(dry_run, customers)
        if not dry_run:
            self._metrics.job_finished(result, time.perf_counter() - started)
            for c in result.customers:
                if (
                    c.difference is not None
                    and c.action
                    and c.action not in (DriftAction.IN_SYNC, DriftAction.SETTLING)
                ):
                    self._metrics.drift(c.currency, c.difference, corrected=c.action == DriftAction.CORRECT)
        return result

    def _cycle(self, dry_run: bool, customers: frozenset[str]) -> BalanceResult:
        now = self._clock()
        run_id = None if dry_run else self._runs.start("balance_reconcile")
        result = BalanceResult(run_id=run_id, dry_run=dry_run)
        with structlog.contextvars.bound_contextvars(run_id=run_id, dry_run=dry_run, job="balance_reconcile"):
            log.info("balance reconcile started")
            listing = "subscriptions"
            try:
                accounts = self._accounts(customers, now)
                # Fail closed: without the InvoicePayments listing no PaymentIntent can be told from a bill.
                listing = "payments, invoice payments and refunds (nothing is forwarded this cycle)"
                money = self._payments.read(customers, now) if self._settings.topups.enabled else StripeMoney()
                observations = self._ledger.latest_observations(customers)
            except UpstreamError as exc:
                result.failures.append(f"listing {listing}: {self._redact(str(exc))}")
                log.error("balance reconcile could not list Stripe data", error=self._redact(str(exc)))
                self._finish(result)
                return result

            # A refund we could not attribute may have moved any customer's Stripe credit: a drift it explains
            # must not be corrected now and debited again when the refund is forwarded next cycle.
            result.failures += money.unattributed
            hold = HOLD_CORRECTIONS if money.unattributed else None
            invoice_flags = {} if dry_run else flag_forwarded_invoice_payments(self._ledger, money)

            def reconcile(customer_id: str) -> CustomerReport | None:
                if self._stop_requested():
                    return None
                return self._reconcile_one(
                    accounts[customer_id], money, observations.get(customer_id), now, run_id, hold
                )

            workers = self._config.moesif.max_concurrency if self._config.moesif else 1
            for report in _in_order(reconcile, sorted(accounts), workers):
                if report is None:
                    continue  # stop requested
                report.flags += invoice_flags.get(report.customer_id, [])
                result.customers.append(report)
                if report.error:
                    result.failures.append(f"{report.customer_id}: {report.error}")
            self._finish(result)
        return result

    def _accounts(self, customers: frozenset[str], now: datetime) -> dict[str, CustomerAccount]:
        items = self._stripe.metered_items(with_customer=True, customers=customers)
        return map_accounts(items, self._settings.subscription_metadata_key, now - self._settings.topups.lookback)

    # -- one customer --------------------------------------------------------------------------------

    def _reconcile_one(
        self,
        customer: CustomerAccount,
        money: StripeMoney,
        last: LastObservation | None,
        now: datetime,
        run_id: str | None,
        hold_corrections: str | None,
    ) -> CustomerReport:
        account = customer.account
        report = CustomerReport(account.customer_id, account.subscription_id, account.currency)
        with structlog.contextvars.bound_contextvars(
            customer=account.customer_id, subscription=account.subscription_id
        ):
            try:
                if run_id is not None:
                    for stored in self._ledger.pending(account.customer_id, now - self._settings.settle_delay):
                        self._sender.settle_interrupted(stored, report)
                if self._settings.topups.enabled:
                    self._forwarding.forward(customer, money, run_id, report)
                if self._settings.stripe_source != "none":
                    self._comparison.compare(customer, last, now, run_id, report, hold_corrections)
                else:
                    report.action = "forward_only"
                    report.reason = "stripe_source: none; top-ups forwarded exactly once are the reconciliation"
            except (UpstreamError, UnpricedUsageError) as exc:
                report.error = self._redact(str(exc))
                log.error("customer failed", error=report.error)
            except Exception as exc:  # one customer's bug must not stop the others
                log.exception("unexpected error")
                report.error = self._redact(f"unexpected error: {type(exc).__name__}: {exc}")
        return report

    # -- bookkeeping ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._moesif.close()

    def _redact(self, text: str) -> str:
        return redact(text, self._config.secret_values())

    def _finish(self, result: BalanceResult) -> None:
        summary = result.counts()
        log.info("balance reconcile finished", status=result.status.value, **summary)
        if result.run_id is not None:
            self._runs.finish(result.run_id, result.status, summary)


def _in_order(work: Callable[[str], T], keys: list[str], workers: int) -> Iterator[T]:
    """`work` for every key, results in the keys' order: inline with one worker (a seed replays exactly), else on
    `workers` threads, each task with the caller's logging context. Customers are independent of each other, so
    one's Moesif wait overlaps the others' ledger work."""
    if workers == 1:
        yield from map(work, keys)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="balances") as pool:
        futures = [pool.submit(contextvars.copy_context().run, work, key) for key in keys]
        for future in futures:
            yield future.result()
