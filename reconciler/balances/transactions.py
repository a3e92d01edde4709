"""Sending one Moesif balance transaction the ledger recorded, and recording how it went.

Every transaction is written before it is sent (reconciler.ledger.balance_ledger), so it goes out under its one
`transaction_id` at most once per outcome: a refused one is marked failed; one whose outcome is unknown is resent
with the same id only when Moesif deduplicates ids (`moesif.deduplicates_transaction_ids`), otherwise marked sent
and flagged for a person. Top-ups, refunds and drift corrections all go through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from reconciler.balances.model import PlannedTransaction, StoredTransaction
from reconciler.balances.money import to_units
from reconciler.balances.ports import BalanceBook, MoesifBalances
from reconciler.config import MoesifConfig
from reconciler.upstream.errors import OutcomeUnknownError, PermanentError, UpstreamError
from reconciler.upstream.moesif_api import BalanceTransaction

if TYPE_CHECKING:  # the job's report line: filled in here, defined (and built) by the job
    from reconciler.balances.job import CustomerReport

log = structlog.get_logger(__name__)


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


def forwarded_line(planned: PlannedTransaction) -> str:
    """How a sent (or planned) transaction reads in the report: "credit 25.00 pi_…"."""
    return f"{planned.type} {to_units(planned.amount_minor, planned.account.currency)} {planned.transaction_id}"


class TransactionSender:
    def __init__(
        self,
        moesif: MoesifBalances,
        ledger: BalanceBook,
        moesif_config: MoesifConfig | None,
        stripe_source: str,
        redact: Callable[[str], str],
    ):
        self._moesif = moesif
        self._ledger = ledger
        self._moesif_config = moesif_config
        self._not_resent = not_resent(stripe_source)
        self._redact = redact

    @property
    def _resend_is_safe(self) -> bool:
        assert self._moesif_config is not None  # the balance job runs only with a moesif section
        return self._moesif_config.deduplicates_transaction_ids

    def settle_interrupted(self, stored: StoredTransaction, report: CustomerReport) -> None:
        """A transaction an earlier run recorded but never saw answered (it died, or every attempt failed)."""
        planned = stored.planned
        if not stored.attempted:
            # The run died before any request for it left (waiting on the Moesif budget, say): it was never
            # applied, and leaving it would lose the customer's money.
            report.forwarded.append(f"{forwarded_line(planned)} (recorded by an interrupted run, never sent)")
            self.send(stored, report)
            return
        if self._resend_is_safe:
            report.flags.append(
                f"resending {planned.kind} {planned.transaction_id}: an earlier attempt's outcome is unknown"
            )
            self.send(stored, report)
            return
        self._ledger.mark_sent(
            stored, outcome_was_unknown=True, error="a run stopped between recording and confirming it"
        )
        report.flags.append(f"{planned.kind} {planned.transaction_id}: {self._not_resent}")

    def send(self, stored: StoredTransaction, report: CustomerReport) -> None:
        """POST the recorded transaction and record the outcome; re-raises what failed it, after recording it."""
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
