"""The balance cycle: forward Stripe top-ups and refunds to Moesif exactly once, then compare balances.

Per mapped customer: resend what a crash left pending (same transaction id, flagged), forward every succeeded
top-up PaymentIntent not yet forwarded (credit, `transaction_id` = PaymentIntent id) and every refund of a
top-up (debit, `transaction_id` = refund id), then compare Stripe's credit with Moesif's balance
(reconciler.balances.drift) and, when allowed, send one correction. One customer's failure is logged with its
context and counted; the cycle goes on.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import chain
from typing import ClassVar, TypeVar

import structlog

from reconciler.balances.accounts import CustomerAccount, UnpricedUsageError, map_accounts, open_usage_cost_minor
from reconciler.balances.drift import UNCORRECTED, Assessment, DriftAction, DriftPolicy, assess
from reconciler.balances.invoices import PaymentRole, role_of, unclear_reason
from reconciler.balances.model import InvoicePayment, Refund, TopUp
from reconciler.balances.money import exactly_representable, to_minor, to_minor_rounded, to_units
from reconciler.balances.sweep import LastObservation, sweep_due_after, why_read_moesif
from reconciler.config import Config
from reconciler.ledger.balance_ledger import (
    AlreadyRecordedError,
    BalanceLedger,
    PlannedTransaction,
    StoredTransaction,
)
from reconciler.ledger.runs import RunLog
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.results import RunStatus, run_status
from reconciler.upstream.errors import OutcomeUnknownError, PermanentError, UpstreamError
from reconciler.upstream.moesif_api import BalanceTransaction, MoesifGateway
from reconciler.upstream.stripe_api import StripeGateway

log = structlog.get_logger(__name__)
T = TypeVar("T")

HOLD_CORRECTIONS = "a refund could not be attributed to its customer this cycle; corrections wait for the next"


def not_resent(stripe_source: str) -> str:
    """What a person is told about a transaction whose outcome is unknown and that was not resent. Only a source
    with a Stripe balance has a comparison that would show it missing; with `none` nothing ever will."""
    unknown = (
        "whether Moesif applied it is unknown and it was not resent (Moesif may not ignore a repeated transaction_id); "
    )
    if stripe_source == "none":
        return unknown + (
            "nothing compares balances (balances.stripe_source: none): check it in Moesif, then run "
            "`reconciler balances resolve <transaction_id> --applied` or `--not-applied`"
        )
    return unknown + (
        "check Moesif: the balance comparison after the settle delay shows a drift if it never landed; "
        "close it with `reconciler balances resolve <transaction_id>`"
    )


# The docs do not promise that an InvoicePayment is never created before the PaymentIntent it names.
INVOICE_PAYMENT_SLACK = timedelta(hours=1)


@dataclass
class _Money:
    """What one cycle found in Stripe to forward, for all customers."""

    top_ups: dict[str, list[TopUp]] = field(default_factory=dict)  # by customer id
    refunds: dict[str, list[Refund]] = field(default_factory=dict)  # by the refunded top-up's customer id
    held: dict[str, str] = field(default_factory=dict)  # PaymentIntent id -> why its money waits for a person
    invoice_paid: dict[str, str] = field(default_factory=dict)  # PaymentIntent id -> the invoice it paid
    invoice_paid_since: datetime | None = None  # when the oldest of them was created
    unattributed: list[str] = field(default_factory=list)  # refunds whose PaymentIntent could not be read


class _InvoicesOf:
    """Which invoice a PaymentIntent paid: looked up in one listing of every InvoicePayment created since
    `complete_since`, or, for a PaymentIntent older than that (or with no listing), asked of Stripe by id."""

    def __init__(
        self,
        stripe: StripeGateway,
        with_lines: bool,
        listing: Iterable[InvoicePayment] = (),
        complete_since: datetime | None = None,
    ):
        self._stripe = stripe
        self._with_lines = with_lines
        self._listed = {payment.payment_intent_id: payment for payment in listing}
        self._complete_since = complete_since

    def of(self, payment_intent: TopUp) -> InvoicePayment | None:
        if self._complete_since is not None and payment_intent.created >= self._complete_since:
            return self._listed.get(payment_intent.payment_intent_id)
        return self._stripe.invoice_payment_of(payment_intent.payment_intent_id, with_lines=self._with_lines)


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
    job: ClassVar[str] = "balance_reconcile"
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
    def __init__(
        self,
        config: Config,
        stripe: StripeGateway,
        moesif: MoesifGateway,
        ledger: BalanceLedger,
        runs: RunLog,
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
                if c.difference is not None and c.action not in ("in_sync", "settling", ""):
                    self._metrics.drift(c.currency, c.difference, corrected=c.action == DriftAction.CORRECT.value)
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
                money = self._money(customers, now) if self._settings.topups.enabled else _Money()
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
            invoice_flags = {} if dry_run else self._flag_forwarded_invoice_payments(money)

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

    # -- collecting ----------------------------------------------------------------------------------

    def _accounts(self, customers: frozenset[str], now: datetime) -> dict[str, CustomerAccount]:
        items = self._stripe.metered_items(with_customer=True, customers=customers)
        return map_accounts(items, self._settings.subscription_metadata_key, now - self._settings.topups.lookback)

    def _money(self, customers: frozenset[str], now: datetime) -> _Money:
        """Succeeded top-ups in the look-back and succeeded refunds of top-ups, by customer: one listing each for
        all customers (100 a page), not one per customer, and one listing of InvoicePayments that tells the
        PaymentIntents which paid an invoice apart from top-ups (reconciler.balances.invoices). A run for a few
        customers (a webhook's) asks about each of their PaymentIntents instead of listing everyone's invoices."""
        since = now - self._settings.topups.lookback
        with_lines = bool(self._invoice_top_up_prices)
        if customers:
            listing = chain.from_iterable(self._stripe.succeeded_payment_intents(since, c) for c in sorted(customers))
            invoices = _InvoicesOf(self._stripe, with_lines)
        else:
            # The docs do not say an InvoicePayment is never created before its PaymentIntent: an hour of slack.
            complete_since = since - INVOICE_PAYMENT_SLACK
            invoices = _InvoicesOf(
                self._stripe,
                with_lines,
                self._stripe.invoice_payments(complete_since, with_lines=with_lines),
                complete_since,
            )
            listing = self._stripe.succeeded_payment_intents(since)
        money = _Money()
        roles: dict[str, tuple[TopUp, PaymentRole]] = {}
        for payment_intent in listing:
            if payment_intent.customer_id:
                role = self._classify(payment_intent, invoices.of(payment_intent), money)
                roles[payment_intent.payment_intent_id] = (payment_intent, role)
                if role in (PaymentRole.TOP_UP, PaymentRole.UNCLEAR_INVOICE):
                    money.top_ups.setdefault(payment_intent.customer_id, []).append(payment_intent)
        self._attribute_refunds(money, roles, invoices, since)
        return money

    def _attribute_refunds(
        self, money: _Money, roles: dict[str, tuple[TopUp, PaymentRole]], invoices: _InvoicesOf, since: datetime
    ) -> None:
        """Succeeded refunds of top-ups, by the top-up's customer, and an error for each refund that could not be
        attributed. Refunds are listed by their own creation date, so a refund of a top-up older than the
        look-back is still seen; such a PaymentIntent is fetched by id, and whether it paid an invoice asked of
        InvoicePayments, once per cycle. One that cannot be read leaves its refund for the next cycle, and the
        rest goes on."""
        for refund in self._stripe.refunds(since):
            if refund.status != "succeeded" or not refund.payment_intent_id:
                continue
            if refund.payment_intent_id not in roles:
                try:
                    payment_intent = self._stripe.payment_intent(refund.payment_intent_id)
                    invoice = invoices.of(payment_intent)
                except UpstreamError as exc:
                    error = self._redact(f"refund {refund.refund_id}: its PaymentIntent could not be read: {exc}")
                    log.error("refund not forwarded this cycle", error=error)
                    money.unattributed.append(error)
                    continue
                roles[refund.payment_intent_id] = (payment_intent, self._classify(payment_intent, invoice, money))
            payment_intent, role = roles[refund.payment_intent_id]
            if payment_intent.customer_id and role in (PaymentRole.TOP_UP, PaymentRole.UNCLEAR_INVOICE):
                money.refunds.setdefault(payment_intent.customer_id, []).append(refund)

    @property
    def _invoice_top_up_prices(self) -> frozenset[str]:
        return frozenset(self._settings.topups.invoice_prices)

    def _classify(self, payment_intent: TopUp, invoice: InvoicePayment | None, money: _Money) -> PaymentRole:
        role = role_of(
            payment_intent.metadata, invoice, self._settings.topups.payment_intent_metadata, self._invoice_top_up_prices
        )
        if invoice is not None and role is PaymentRole.INVOICE:
            money.invoice_paid[payment_intent.payment_intent_id] = invoice.invoice_id
            money.invoice_paid_since = min(money.invoice_paid_since or payment_intent.created, payment_intent.created)
        elif invoice is not None and role is PaymentRole.UNCLEAR_INVOICE:
            money.held[payment_intent.payment_intent_id] = unclear_reason(invoice)
        return role

    def _flag_forwarded_invoice_payments(self, money: _Money) -> dict[str, list[str]]:
        """Invoice payments an earlier version forwarded as top-ups: shown to a person, never debited on a guess
        (the customer may have spent the credit, or the company may have meant it)."""
        if money.invoice_paid_since is None:
            return {}
        flags: dict[str, list[str]] = {}
        paid = self._ledger.flag_invoice_payments(money.invoice_paid, money.invoice_paid_since)
        for customer_id, transaction_id, invoice_id in paid:
            flags.setdefault(customer_id, []).append(
                f"top-up {transaction_id} was credited to Moesif but paid invoice {invoice_id}: check the customer's "
                "Moesif balance (not debited automatically)"
            )
        return flags

    # -- one customer --------------------------------------------------------------------------------

    def _reconcile_one(
        self,
        customer: CustomerAccount,
        money: _Money,
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
                        self._settle_interrupted(stored, report)
                if self._settings.topups.enabled:
                    self._forward_money(customer, money, run_id, report)
                if self._settings.stripe_source != "none":
                    self._compare(customer, last, now, run_id, report, hold_corrections)
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

    def _forward_money(
        self, customer: CustomerAccount, money: _Money, run_id: str | None, report: CustomerReport
    ) -> None:
        customer_id = customer.account.customer_id
        top_ups = {t.payment_intent_id: t for t in money.top_ups.get(customer_id, [])}
        refunds = money.refunds.get(customer_id, [])
        plans: list[tuple[PlannedTransaction, str | None]] = []
        forwarded_already = self._ledger.known_sources("topup", list(top_ups))
        for top_up in top_ups.values():
            if top_up.disputed:
                report.flags.append(f"top-up {top_up.payment_intent_id} is disputed: not debited automatically")
            elif top_up.payment_intent_id not in forwarded_already:
                description = f"Stripe top-up {top_up.payment_intent_id}"
                planned, refusal = self._plan(
                    "topup",
                    top_up.payment_intent_id,
                    customer,
                    top_up.amount_minor,
                    top_up.currency,
                    "credit",
                    description,
                )
                plans.append((planned, money.held.get(top_up.payment_intent_id) or refusal))

        refunded_already = self._ledger.known_sources("refund", [r.refund_id for r in refunds])
        for refund in refunds:
            if refund.refund_id not in refunded_already:
                description = f"Stripe refund {refund.refund_id} of {refund.payment_intent_id}"
                planned, refusal = self._plan(
                    "refund", refund.refund_id, customer, refund.amount_minor, refund.currency, "debit", description
                )
                held = money.held.get(refund.payment_intent_id or "")
                plans.append((planned, f"a refund of a PaymentIntent that {held}" if held else refusal))

        for planned, refusal in plans:
            if refusal is not None:
                self._hold(planned, refusal, run_id, report)
                continue
            line = _forwarded_line(planned)
            if run_id is None:
                report.forwarded.append(line)
                continue
            # Moesif refused it before (e.g. its subscription did not exist yet): the same transaction again.
            stored = self._ledger.reopen_failed(planned.kind, planned.source_id)
            if stored is not None:
                line += " (retry)"
            else:
                try:
                    stored = self._ledger.record(planned, run_id)
                except AlreadyRecordedError:
                    continue  # another replica recorded it first and sends it
            report.forwarded.append(line)
            self._send(stored, report)

    def _hold(self, planned: PlannedTransaction, reason: str, run_id: str | None, report: CustomerReport) -> None:
        """Money the job will not forward: flagged in this cycle and recorded once, so that `status` and `report`
        keep showing it to a person and later cycles do not find it again as new."""
        amount = to_units(planned.amount_minor, planned.account.currency)
        report.held.append(
            f"{planned.kind} {planned.transaction_id} ({amount} {planned.account.currency.upper()}): {reason}"
        )
        log.warning("not forwarded to Moesif: held for a person", transaction_id=planned.transaction_id, reason=reason)
        if run_id is not None:
            self._ledger.hold(planned, run_id, reason)

    def _plan(
        self,
        kind: str,
        source_id: str,
        customer: CustomerAccount,
        amount_minor: int,
        currency: str,
        direction: str,
        description: str,
    ) -> tuple[PlannedTransaction, str | None]:
        """The transaction for a top-up or refund, and why it cannot be forwarded (None: it can)."""
        account = customer.account
        refusal = None
        if currency != account.currency:
            refusal = (
                f"paid in {currency.upper()} but the Moesif subscription counts {account.currency.upper()}; "
                "the reconciler does not convert currencies"
            )
            account = replace(account, currency=currency)  # recorded in the currency it was paid in
        elif not exactly_representable(to_units(amount_minor, currency), currency):
            refusal = "the amount cannot be sent to Moesif exactly (it has no exact JSON number)"
        return PlannedTransaction(kind, source_id, source_id, account, amount_minor, direction, description), refusal

    @property
    def _resend_is_safe(self) -> bool:
        assert self._config.moesif is not None  # the balance job runs only with a moesif section
        return self._config.moesif.deduplicates_transaction_ids

    @property
    def _not_resent(self) -> str:
        return not_resent(self._settings.stripe_source)

    def _settle_interrupted(self, stored: StoredTransaction, report: CustomerReport) -> None:
        """A transaction an earlier run recorded but never saw answered (it died, or every attempt failed)."""
        planned = stored.planned
        if not stored.attempted:
            # The run died before any request for it left (waiting on the Moesif budget, say): it was never
            # applied, and leaving it would lose the customer's money.
            report.forwarded.append(f"{_forwarded_line(planned)} (recorded by an interrupted run, never sent)")
            self._send(stored, report)
            return
        if self._resend_is_safe:
            report.flags.append(
                f"resending {planned.kind} {planned.transaction_id}: an earlier attempt's outcome is unknown"
            )
            self._send(stored, report)
            return
        self._ledger.mark_sent(
            stored, outcome_was_unknown=True, error="a run stopped between recording and confirming it"
        )
        report.flags.append(f"{planned.kind} {planned.transaction_id}: {self._not_resent}")

    def _send(self, stored: StoredTransaction, report: CustomerReport) -> None:
        planned = stored.planned
        transaction = moesif_transaction(planned)
        try:
            outcome = self._moesif.post_transaction(
                transaction, before_send=lambda: self._ledger.mark_attempted(stored)
            )
        except PermanentError as exc:
            self._ledger.mark_failed(stored, self._redact(str(exc)))
            raise
        except OutcomeUnknownError as exc:
            if not self._resend_is_safe:
                self._ledger.mark_sent(stored, outcome_was_unknown=True, error=self._redact(str(exc)))
                report.flags.append(f"{planned.transaction_id}: {self._not_resent}")
                log.warning("moesif transaction outcome unknown; not resent", transaction_id=planned.transaction_id)
                return
            self._ledger.note_unknown_outcome(stored, self._redact(str(exc)))
            report.flags.append(f"{planned.transaction_id}: outcome unknown, will be resent with the same id")
            raise
        except UpstreamError as exc:
            self._ledger.note_unknown_outcome(stored, self._redact(str(exc)))
            raise
        self._ledger.mark_sent(stored, outcome_was_unknown=outcome.had_unknown_outcome)
        if outcome.had_unknown_outcome:
            report.flags.append(
                f"{planned.transaction_id}: an attempt's outcome was unknown and it was resent with the same id; "
                "check Moesif if it does not deduplicate"
            )
        log.info(
            "moesif transaction sent",
            transaction_id=planned.transaction_id,
            type=planned.type,
            amount=str(transaction.amount),
            kind=planned.kind,
        )

    # -- balance comparison --------------------------------------------------------------------------

    def _compare(
        self,
        customer: CustomerAccount,
        last: LastObservation | None,
        now: datetime,
        run_id: str | None,
        report: CustomerReport,
        hold_corrections: str | None,
    ) -> None:
        account = customer.account
        currency = account.currency
        credit_minor = self._stripe_credit_minor(customer)
        open_usage = self._ledger.open_usage(account.customer_id, now, self._config.stripe.invoice_grace_period)
        open_minor = open_usage_cost_minor(open_usage, customer.unit_prices)
        # Anything we sent that the last observation may not have seen land, or sent since: not a stable baseline.
        baseline = min(last.observed_at, now) if last else now
        unsettled_since_baseline = self._ledger.recent(account.subscription_id, baseline - self._settings.settle_delay)
        why = why_read_moesif(
            last,
            customer_id=account.customer_id,
            subscription_id=account.subscription_id,
            stripe_credit_minor=credit_minor,
            open_usage_minor=open_minor,
            money_in_flight=bool(unsettled_since_baseline or report.forwarded or report.flags),
            now=now,
            full_sweep_interval=self._settings.full_sweep_interval,
        )
        if why is None:
            assert last is not None  # never observed is always a reason to read
            self._report_unchanged(report, last, credit_minor - open_minor)
            return
        log.debug("reading the Moesif balance", why=why)
        recent = self._ledger.recent(account.subscription_id, now - self._settings.settle_delay)
        moesif = self._moesif.balance(account.subscription_id).field(self._settings.moesif_balance_field)
        moesif_minor = to_minor_rounded(moesif, currency)

        policy = DriftPolicy(
            tolerance=self._settings.tolerance.get(currency, to_units(1, currency)),
            max_auto_correction=self._settings.max_auto_correction.get(currency),
            auto_correct=self._settings.auto_correct,
            settle_delay=self._settings.settle_delay,
        )
        assessment = assess(
            stripe_credit=to_units(credit_minor, currency),
            open_usage_cost=to_units(open_minor, currency),
            moesif_balance=to_units(moesif_minor, currency),
            recent=recent,
            policy=policy,
            now=now,
        )
        if assessment.action is DriftAction.CORRECT and hold_corrections:
            assessment = replace(assessment, action=DriftAction.SETTLING, reason=hold_corrections)
        report.stripe_expected, report.moesif, report.difference = (
            assessment.expected,
            to_units(moesif_minor, currency),
            assessment.difference,
        )
        report.action, report.reason = assessment.action.value, assessment.reason
        log.info(
            "balance compared",
            stripe_expected=str(assessment.expected),
            moesif=str(moesif),
            difference=str(assessment.difference),
            action=assessment.action.value,
        )
        if run_id is None:
            return
        observation = self._ledger.observe(
            account,
            run_id,
            stripe_credit_minor=credit_minor,
            open_usage_minor=open_minor,
            moesif_minor=moesif_minor,
            assessment=assessment,
        )
        if assessment.action is DriftAction.IN_SYNC:
            self._ledger.verify_corrections(account.subscription_id)
        elif assessment.action is DriftAction.CORRECT:
            self._correct(customer, assessment, observation, run_id, report)

    def _correct(
        self, customer: CustomerAccount, assessment: Assessment, observation: int, run_id: str, report: CustomerReport
    ) -> None:
        account = customer.account
        correction = assessment.correction
        assert correction is not None
        transaction_id = f"reconciler-drift-{account.customer_id}-{observation}"
        planned = PlannedTransaction(
            kind="correction",
            source_id=str(observation),
            transaction_id=transaction_id,
            account=account,
            amount_minor=abs(to_minor(correction, account.currency)),
            type="credit" if correction > 0 else "debit",
            description=f"reconciler drift correction (observation {observation})",
        )
        try:
            stored = self._ledger.record(
                planned, run_id, no_correction_since=self._clock() - self._settings.settle_delay
            )
        except AlreadyRecordedError:
            report.action, report.reason = DriftAction.SETTLING.value, "another run is correcting this drift"
            return
        self._ledger.link_correction(observation, transaction_id)
        report.forwarded.append(f"{planned.type} {abs(correction)} {transaction_id}")
        self._send(stored, report)

    def _report_unchanged(self, report: CustomerReport, last: LastObservation, expected_minor: int) -> None:
        """The last comparison agreed and nothing on Stripe's side moved since: report it, without reading Moesif."""
        currency = report.currency
        read_again = last.observed_at + sweep_due_after(report.customer_id, self._settings.full_sweep_interval)
        report.stripe_expected = to_units(expected_minor, currency)
        report.moesif = to_units(last.moesif_minor, currency)
        report.difference = to_units(expected_minor - last.moesif_minor, currency)
        report.action = DriftAction.IN_SYNC.value
        report.reason = (
            f"Moesif not re-read: Stripe's side is unchanged since the balances agreed at "
            f"{last.observed_at:%Y-%m-%d %H:%M} UTC (read again by {read_again:%Y-%m-%d %H:%M} UTC)"
        )
        report.moesif_reread = False

    def _stripe_credit_minor(self, customer: CustomerAccount) -> int:
        """The customer's credit on Stripe, minor units: from the subscription listing's expanded customer when it
        has it (no request), else retrieved."""
        account = customer.account
        if self._settings.stripe_source == "credit_grants":
            return self._stripe.metered_credit_balance(account.customer_id, account.currency)
        credit = customer.stripe_credit or self._stripe.customer_credit(account.customer_id)
        if credit.currency and credit.currency.lower() != account.currency:
            raise PermanentError(
                "reconciler", f"customer balance is in {credit.currency}, subscription in {account.currency}"
            )
        return credit.minor

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


def moesif_transaction(planned: PlannedTransaction, description: str | None = None) -> BalanceTransaction:
    """What Moesif is sent for a ledger transaction: currency units, under its one `transaction_id`."""
    return BalanceTransaction(
        company_id=planned.account.customer_id,
        subscription_id=planned.account.subscription_id,
        amount=to_units(planned.amount_minor, planned.account.currency),
        currency=planned.account.currency,
        type=planned.type,
        transaction_id=planned.transaction_id,
        description=description or planned.description,
    )


def _forwarded_line(planned: PlannedTransaction) -> str:
    """How a sent (or planned) transaction reads in the report: "credit 25.00 pi_…"."""
    return f"{planned.type} {to_units(planned.amount_minor, planned.account.currency)} {planned.transaction_id}"


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
