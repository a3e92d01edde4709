"""One customer's balance comparison: observe both sides, assess the drift, correct it when allowed.

Observing reads Stripe's side (the customer's credit, and the open usage the ledger knows Moesif has burned) and,
unless the last observation still stands (reconciler.balances.sweep), Moesif's balance. Assessing is pure:
reconciler.balances.drift.assess under the currency's policy (`assess_observed`). Correcting records one
observation and, for a drift `assess` says to correct, one Moesif transaction sent through the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from reconciler.balances.accounts import CustomerAccount, open_usage_cost_minor
from reconciler.balances.drift import Assessment, DriftAction, DriftPolicy, RecentTransaction, assess
from reconciler.balances.model import AlreadyRecordedError, BalanceAccount, PlannedTransaction
from reconciler.balances.money import to_minor, to_minor_rounded, to_units
from reconciler.balances.ports import BalanceBook, MoesifBalances, StripeBalanceReads
from reconciler.balances.sweep import LastObservation, sweep_due_after, why_read_moesif
from reconciler.balances.transactions import TransactionSender
from reconciler.config import BalancesConfig
from reconciler.upstream.errors import PermanentError

if TYPE_CHECKING:  # the job's report line: filled in here, defined (and built) by the job
    from reconciler.balances.job import CustomerReport

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StripeSide:
    """What Stripe says the customer has, minor units: its credit, and the cost of usage not yet invoiced."""

    credit_minor: int
    open_usage_minor: int

    @property
    def expected_minor(self) -> int:
        return self.credit_minor - self.open_usage_minor


def drift_policy(settings: BalancesConfig, currency: str) -> DriftPolicy:
    """The currency's drift policy; tolerance one minor unit unless configured."""
    return DriftPolicy(
        tolerance=settings.tolerance.get(currency, to_units(1, currency)),
        max_auto_correction=settings.max_auto_correction.get(currency),
        auto_correct=settings.auto_correct,
        settle_delay=settings.settle_delay,
    )


def assess_observed(
    stripe: StripeSide,
    moesif_minor: int,
    currency: str,
    recent: list[RecentTransaction],
    policy: DriftPolicy,
    now: datetime,
    hold_corrections: str | None = None,
) -> Assessment:
    """`assess` over minor units; with `hold_corrections` a drift to correct waits (settling) for that reason."""
    assessment = assess(
        stripe_credit=to_units(stripe.credit_minor, currency),
        open_usage_cost=to_units(stripe.open_usage_minor, currency),
        moesif_balance=to_units(moesif_minor, currency),
        recent=recent,
        policy=policy,
        now=now,
    )
    if assessment.action is DriftAction.CORRECT and hold_corrections:
        assessment = replace(assessment, action=DriftAction.SETTLING, reason=hold_corrections)
    return assessment


def report_unchanged(
    report: CustomerReport, last: LastObservation, expected_minor: int, full_sweep_interval: timedelta
) -> None:
    """The last comparison agreed and nothing on Stripe's side moved since: report it, without reading Moesif."""
    currency = report.currency
    read_again = last.observed_at + sweep_due_after(report.customer_id, full_sweep_interval)
    report.stripe_expected = to_units(expected_minor, currency)
    report.moesif = to_units(last.moesif_minor, currency)
    report.difference = to_units(expected_minor - last.moesif_minor, currency)
    report.action = DriftAction.IN_SYNC.value
    report.reason = (
        f"Moesif not re-read: Stripe's side is unchanged since the balances agreed at "
        f"{last.observed_at:%Y-%m-%d %H:%M} UTC (read again by {read_again:%Y-%m-%d %H:%M} UTC)"
    )
    report.moesif_reread = False


class Comparison:
    def __init__(
        self,
        settings: BalancesConfig,
        invoice_grace_period: timedelta,
        stripe: StripeBalanceReads,
        moesif: MoesifBalances,
        ledger: BalanceBook,
        sender: TransactionSender,
        clock: Callable[[], datetime],
    ):
        self._settings = settings
        self._invoice_grace_period = invoice_grace_period
        self._stripe = stripe
        self._moesif = moesif
        self._ledger = ledger
        self._sender = sender
        self._clock = clock

    def compare(
        self,
        customer: CustomerAccount,
        last: LastObservation | None,
        now: datetime,
        run_id: str | None,
        report: CustomerReport,
        hold_corrections: str | None,
    ) -> None:
        """Observe, assess and report; with a `run_id`, record the observation and act on it."""
        account = customer.account
        stripe = self._observe_stripe(customer, now)
        why = self._why_read_moesif(account, last, stripe, now, report)
        if why is None:
            assert last is not None  # never observed is always a reason to read
            report_unchanged(report, last, stripe.expected_minor, self._settings.full_sweep_interval)
            return
        log.debug("reading the Moesif balance", why=why)
        recent = self._ledger.recent(account.subscription_id, now - self._settings.settle_delay)
        moesif = self._moesif.balance(account.subscription_id).field(self._settings.moesif_balance_field)
        moesif_minor = to_minor_rounded(moesif, account.currency)
        policy = drift_policy(self._settings, account.currency)
        assessment = assess_observed(stripe, moesif_minor, account.currency, recent, policy, now, hold_corrections)
        report.stripe_expected, report.moesif, report.difference = (
            assessment.expected,
            to_units(moesif_minor, account.currency),
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
        if run_id is not None:
            self._act(customer, stripe, moesif_minor, assessment, run_id, report)

    # -- observing -----------------------------------------------------------------------------------

    def _observe_stripe(self, customer: CustomerAccount, now: datetime) -> StripeSide:
        credit_minor = self._stripe_credit_minor(customer)
        open_usage = self._ledger.open_usage(customer.account.customer_id, now, self._invoice_grace_period)
        return StripeSide(credit_minor, open_usage_cost_minor(open_usage, customer.unit_prices))

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

    def _why_read_moesif(
        self,
        account: BalanceAccount,
        last: LastObservation | None,
        stripe: StripeSide,
        now: datetime,
        report: CustomerReport,
    ) -> str | None:
        # Anything we sent that the last observation may not have seen land, or sent since: not a stable baseline.
        baseline = min(last.observed_at, now) if last else now
        unsettled_since_baseline = self._ledger.recent(account.subscription_id, baseline - self._settings.settle_delay)
        return why_read_moesif(
            last,
            customer_id=account.customer_id,
            subscription_id=account.subscription_id,
            stripe_credit_minor=stripe.credit_minor,
            open_usage_minor=stripe.open_usage_minor,
            money_in_flight=bool(unsettled_since_baseline or report.forwarded or report.flags),
            now=now,
            full_sweep_interval=self._settings.full_sweep_interval,
        )

    # -- correcting ----------------------------------------------------------------------------------

    def _act(
        self,
        customer: CustomerAccount,
        stripe: StripeSide,
        moesif_minor: int,
        assessment: Assessment,
        run_id: str,
        report: CustomerReport,
    ) -> None:
        """Record the observation; confirm our corrections when in sync, send one when `assess` says to correct."""
        account = customer.account
        observation = self._ledger.observe(
            account,
            run_id,
            stripe_credit_minor=stripe.credit_minor,
            open_usage_minor=stripe.open_usage_minor,
            moesif_minor=moesif_minor,
            assessment=assessment,
        )
        if assessment.action is DriftAction.IN_SYNC:
            self._ledger.verify_corrections(account.subscription_id)
        elif assessment.action is DriftAction.CORRECT:
            self._correct(account, assessment, observation, run_id, report)

    def _correct(
        self, account: BalanceAccount, assessment: Assessment, observation: int, run_id: str, report: CustomerReport
    ) -> None:
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
        self._sender.send(stored, report)
