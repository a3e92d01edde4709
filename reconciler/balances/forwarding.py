"""Top-ups and refunds of top-ups, forwarded to Moesif exactly once.

A succeeded top-up PaymentIntent is a credit (`transaction_id` = the PaymentIntent id), a refund of a top-up a
debit (`transaction_id` = the refund id). The ledger's record of each source is what makes it once: a source it
knows is never planned again, one Moesif refused before is retried under the same id, and one another replica
recorded first is left to it. Money the job will not forward (another currency, an amount with no exact JSON
number, an invoice that may not be only a top-up) is held: recorded once and shown to a person.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from reconciler.balances.accounts import CustomerAccount
from reconciler.balances.model import AlreadyRecordedError, PlannedTransaction
from reconciler.balances.money import exactly_representable, to_units
from reconciler.balances.payments import StripeMoney
from reconciler.balances.ports import BalanceBook
from reconciler.balances.transactions import TransactionSender, forwarded_line

if TYPE_CHECKING:  # the job's report line: filled in here, defined (and built) by the job
    from reconciler.balances.job import CustomerReport

log = structlog.get_logger(__name__)

Plan = tuple[PlannedTransaction, str | None]  # the transaction, and why it is held (None: it is forwarded)


def plan_transaction(
    kind: str,
    source_id: str,
    customer: CustomerAccount,
    amount_minor: int,
    currency: str,
    direction: str,
    description: str,
) -> Plan:
    """The transaction for a top-up or refund, and why it cannot be forwarded (None: it can). Pure."""
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


def flag_forwarded_invoice_payments(ledger: BalanceBook, money: StripeMoney) -> dict[str, list[str]]:
    """Invoice payments an earlier version forwarded as top-ups, by customer: shown to a person, never debited on a
    guess (the customer may have spent the credit, or the company may have meant it)."""
    if money.invoice_paid_since is None:
        return {}
    flags: dict[str, list[str]] = {}
    paid = ledger.flag_invoice_payments(money.invoice_paid, money.invoice_paid_since)
    for customer_id, transaction_id, invoice_id in paid:
        flags.setdefault(customer_id, []).append(
            f"top-up {transaction_id} was credited to Moesif but paid invoice {invoice_id}: check the customer's "
            "Moesif balance (not debited automatically)"
        )
    return flags


class Forwarding:
    def __init__(self, ledger: BalanceBook, sender: TransactionSender):
        self._ledger = ledger
        self._sender = sender

    def forward(
        self, customer: CustomerAccount, money: StripeMoney, run_id: str | None, report: CustomerReport
    ) -> None:
        """Forward (or, with no `run_id`, only report) the customer's top-ups and refunds not forwarded yet."""
        for planned, refusal in self._plans(customer, money, report):
            if refusal is not None:
                self._hold(planned, refusal, run_id, report)
            else:
                self._forward_one(planned, run_id, report)

    def _plans(self, customer: CustomerAccount, money: StripeMoney, report: CustomerReport) -> list[Plan]:
        """Every top-up and refund of the customer's the ledger does not know yet; a disputed top-up is flagged."""
        customer_id = customer.account.customer_id
        top_ups = {t.payment_intent_id: t for t in money.top_ups.get(customer_id, [])}
        refunds = money.refunds.get(customer_id, [])
        plans: list[Plan] = []
        forwarded_already = self._ledger.known_sources("topup", list(top_ups))
        for top_up in top_ups.values():
            if top_up.disputed:
                report.flags.append(f"top-up {top_up.payment_intent_id} is disputed: not debited automatically")
            elif top_up.payment_intent_id not in forwarded_already:
                description = f"Stripe top-up {top_up.payment_intent_id}"
                planned, refusal = plan_transaction(
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
                planned, refusal = plan_transaction(
                    "refund", refund.refund_id, customer, refund.amount_minor, refund.currency, "debit", description
                )
                held = money.held.get(refund.payment_intent_id or "")
                plans.append((planned, f"a refund of a PaymentIntent that {held}" if held else refusal))
        return plans

    def _forward_one(self, planned: PlannedTransaction, run_id: str | None, report: CustomerReport) -> None:
        line = forwarded_line(planned)
        if run_id is None:
            report.forwarded.append(line)
            return
        # Moesif refused it before (e.g. its subscription did not exist yet): the same transaction again.
        stored = self._ledger.reopen_failed(planned.kind, planned.source_id)
        if stored is not None:
            line += " (retry)"
        else:
            try:
                stored = self._ledger.record(planned, run_id)
            except AlreadyRecordedError:
                return  # another replica recorded it first and sends it
        report.forwarded.append(line)
        self._sender.send(stored, report)

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
