"""Is a customer's Moesif balance what Stripe says it should be, and what to do if not: a pure function.

The money model. Stripe is the source of truth for money: what was paid (top-ups) and what credit is left.
Moesif burns credit continuously as API usage arrives, while Stripe applies credit (credit grants or the
customer balance) only when an invoice finalizes. So the balance Moesif *should* show is

    expected = Stripe credit − cost of usage Stripe has been told about but not yet invoiced

and drift is `expected − Moesif`. A positive drift means Moesif shows too little (correct with a credit),
a negative one too much (correct with a debit). Amounts are in currency units throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum


class DriftAction(StrEnum):
    IN_SYNC = "in_sync"  # within tolerance
    SETTLING = "settling"  # our own recent Moesif transactions may not be visible yet: wait
    CORRECT = "correct"  # send one correcting transaction
    REPORT = "report"  # drift, but auto_correct is off
    OVER_LIMIT = "over_limit"  # drift above max_auto_correction, or a currency without a limit
    UNSETTLED = "unsettled"  # our last correction never became visible: a person must look


UNCORRECTED = frozenset({DriftAction.REPORT, DriftAction.OVER_LIMIT, DriftAction.UNSETTLED})


@dataclass(frozen=True)
class RecentTransaction:
    """A Moesif balance transaction we sent: signed (credit > 0, debit < 0), in currency units."""

    amount: Decimal
    sent_at: datetime
    is_correction: bool


@dataclass(frozen=True)
class DriftPolicy:
    tolerance: Decimal
    max_auto_correction: Decimal | None  # None: never auto-correct this currency
    auto_correct: bool
    settle_delay: timedelta


@dataclass(frozen=True)
class Assessment:
    action: DriftAction
    expected: Decimal
    difference: Decimal  # expected − Moesif
    reason: str

    @property
    def correction(self) -> Decimal | None:
        """The signed amount to send (credit > 0), only when the action is CORRECT."""
        return self.difference if self.action is DriftAction.CORRECT else None


def assess(
    *,
    stripe_credit: Decimal,
    open_usage_cost: Decimal,
    moesif_balance: Decimal,
    recent: list[RecentTransaction],
    policy: DriftPolicy,
    now: datetime,
) -> Assessment:
    expected = stripe_credit - open_usage_cost
    difference = expected - moesif_balance

    def result(action: DriftAction, reason: str) -> Assessment:
        return Assessment(action, expected, difference, reason)

    if abs(difference) <= policy.tolerance:
        return result(DriftAction.IN_SYNC, "within tolerance")

    in_flight = [t for t in recent if now - t.sent_at < policy.settle_delay]
    if in_flight:
        pending = sum((t.amount for t in in_flight), Decimal(0))
        return result(
            DriftAction.SETTLING,
            f"{len(in_flight)} transaction(s) of ours ({pending:+}) sent less than settle_delay ago may not be "
            "visible in Moesif yet; no correction until they settle",
        )

    last_correction = next((t for t in sorted(recent, key=lambda t: t.sent_at, reverse=True) if t.is_correction), None)
    if last_correction is not None and abs(difference - last_correction.amount) <= policy.tolerance:
        return result(
            DriftAction.UNSETTLED,
            f"the correction of {last_correction.amount:+} sent at {last_correction.sent_at:%Y-%m-%d %H:%M} UTC is "
            "still not visible in Moesif after settle_delay; not correcting again",
        )

    if not policy.auto_correct:
        return result(DriftAction.REPORT, "drift above tolerance; auto_correct is off")
    if policy.max_auto_correction is None:
        return result(DriftAction.OVER_LIMIT, "the currency has no balances.max_auto_correction entry")
    if abs(difference) > policy.max_auto_correction:
        return result(
            DriftAction.OVER_LIMIT, f"drift exceeds balances.max_auto_correction ({policy.max_auto_correction})"
        )
    return result(DriftAction.CORRECT, "drift above tolerance")
