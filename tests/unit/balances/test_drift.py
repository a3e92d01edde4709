"""The drift core: whether Moesif's balance is what Stripe says it should be, and what to do if not."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from reconciler.balances.drift import DriftAction, DriftPolicy, RecentTransaction, assess
from tests.conftest import utc

NOW = utc(2026, 3, 10, 12, 0)
POLICY = DriftPolicy(
    tolerance=Decimal("0.01"),
    max_auto_correction=Decimal("50.00"),
    auto_correct=True,
    settle_delay=timedelta(minutes=10),
)


def sent(amount: str, minutes_ago: float, *, correction: bool = False) -> RecentTransaction:
    return RecentTransaction(Decimal(amount), NOW - timedelta(minutes=minutes_ago), is_correction=correction)


A = DriftAction
NO_AUTO = replace(POLICY, auto_correct=False)
NO_LIMIT = replace(POLICY, max_auto_correction=None)


def case(name, credit, open_usage, moesif, action, expected, difference, *, recent=(), policy=POLICY):
    """One row: Stripe credit, open usage cost and Moesif balance in; the action, expected balance and drift out."""
    return pytest.param(credit, open_usage, moesif, list(recent), policy, action, expected, difference, id=name)


# fmt: off
CASES = [
    case("equal balances are in sync", "50.00", "0", "50.00", A.IN_SYNC, "50.00", "0.00"),
    case("a drift of the tolerance up is in sync", "50.00", "0", "49.99", A.IN_SYNC, "50.00", "0.01"),
    case("a drift of the tolerance down is in sync", "50.00", "0", "50.01", A.IN_SYNC, "50.00", "-0.01"),
    case("just over the tolerance is corrected", "50.00", "0", "49.98", A.CORRECT, "50.00", "0.02"),
    case("open usage Moesif burned lowers the expected", "50.00", "12.50", "37.50", A.IN_SYNC, "37.50", "0.00"),
    case("usage Moesif never burned is debited", "50.00", "12.50", "50.00", A.CORRECT, "37.50", "-12.50"),
    case("Moesif short of a top-up is credited", "50.00", "0", "30.00", A.CORRECT, "50.00", "20.00"),
    case("usage above the credit expects a negative balance", "5.00", "8.00", "-3.00", A.IN_SYNC, "-3.00", "0.00"),
    case("ours sent within settle_delay: settling", "50.00", "0", "25.00", A.SETTLING, "50.00", "25.00",
         recent=[sent("25.00", 5)]),
    case("ours sent exactly settle_delay ago has settled", "50.00", "0", "25.00", A.CORRECT, "50.00", "25.00",
         recent=[sent("25.00", 10)]),
    case("a top-up older than settle_delay is not waited for", "50.00", "0", "25.00", A.CORRECT, "50.00", "25.00",
         recent=[sent("25.00", 11)]),
    case("a top-up of the drift's amount is no correction", "50.00", "0", "30.00", A.CORRECT, "50.00", "20.00",
         recent=[sent("20.00", 30)]),
    case("our last correction still invisible: not resent", "50.00", "0", "30.00", A.UNSETTLED, "50.00", "20.00",
         recent=[sent("20.00", 30, correction=True)]),
    case("an invisible correction within tolerance", "50.00", "0", "29.99", A.UNSETTLED, "50.00", "20.01",
         recent=[sent("20.00", 30, correction=True)]),
    case("an old correction of another amount", "50.00", "0", "30.00", A.CORRECT, "50.00", "20.00",
         recent=[sent("5.00", 30, correction=True)]),
    case("only the newest correction counts (differs)", "50.00", "0", "30.00", A.CORRECT, "50.00", "20.00",
         recent=[sent("20.00", 60, correction=True), sent("5.00", 30, correction=True)]),
    case("only the newest correction counts (matches)", "50.00", "0", "45.00", A.UNSETTLED, "50.00", "5.00",
         recent=[sent("20.00", 60, correction=True), sent("5.00", 30, correction=True)]),
    case("auto_correct off only reports", "50.00", "0", "30.00", A.REPORT, "50.00", "20.00", policy=NO_AUTO),
    case("auto_correct off, within tolerance", "50.00", "0", "50.00", A.IN_SYNC, "50.00", "0.00", policy=NO_AUTO),
    case("settling before auto_correct off", "50.00", "0", "30.00", A.SETTLING, "50.00", "20.00", policy=NO_AUTO,
         recent=[sent("20.00", 1)]),
    case("a currency without a limit", "50.00", "0", "30.00", A.OVER_LIMIT, "50.00", "20.00", policy=NO_LIMIT),
    case("a drift of exactly the limit is corrected", "50.00", "0", "0.00", A.CORRECT, "50.00", "50.00"),
    case("a drift over the limit is not", "50.00", "0", "-0.01", A.OVER_LIMIT, "50.00", "50.01"),
    case("the limit holds for debits too", "0.00", "0", "50.01", A.OVER_LIMIT, "0.00", "-50.01"),
    case("a zero tolerance corrects a cent", "50.00", "0", "49.99", A.CORRECT, "50.00", "0.01",
         policy=replace(POLICY, tolerance=Decimal(0))),
    case("yen: two over a one-yen tolerance", "500", "0", "498", A.CORRECT, "500", "2",
         policy=replace(POLICY, tolerance=Decimal(1), max_auto_correction=Decimal(1000))),
]
# fmt: on


@pytest.mark.parametrize(
    ("credit", "open_usage", "moesif", "recent", "policy", "action", "expected", "difference"), CASES
)
def test_assess(credit, open_usage, moesif, recent, policy, action, expected, difference):
    assessment = assess(
        stripe_credit=Decimal(credit),
        open_usage_cost=Decimal(open_usage),
        moesif_balance=Decimal(moesif),
        recent=recent,
        policy=policy,
        now=NOW,
    )
    assert (assessment.action, assessment.expected, assessment.difference) == (
        action,
        Decimal(expected),
        Decimal(difference),
    )
    # Only a drift to correct carries a correction, and it is the whole difference, signed (credit > 0).
    assert assessment.correction == (Decimal(difference) if action is DriftAction.CORRECT else None)


@pytest.mark.parametrize(
    ("recent", "policy", "reason"),
    [
        pytest.param([], POLICY, "drift above tolerance", id="correct"),
        pytest.param(
            [sent("20.00", 5), sent("-5.00", 2), sent("7.00", 30)],
            POLICY,
            "2 transaction(s) of ours (+15.00) sent less than settle_delay ago may not be visible in Moesif yet; "
            "no correction until they settle",
            id="settling counts and sums only the transactions in flight",
        ),
        pytest.param(
            [sent("20.00", 30, correction=True)],
            POLICY,
            "the correction of +20.00 sent at 2026-03-10 11:30 UTC is still not visible in Moesif after "
            "settle_delay; not correcting again",
            id="unsettled names the correction",
        ),
        pytest.param(
            [], replace(POLICY, auto_correct=False), "drift above tolerance; auto_correct is off", id="report"
        ),
        pytest.param(
            [],
            replace(POLICY, max_auto_correction=None),
            "the currency has no balances.max_auto_correction entry",
            id="no limit",
        ),
        pytest.param(
            [],
            replace(POLICY, max_auto_correction=Decimal("10")),
            "drift exceeds balances.max_auto_correction (10)",
            id="over the limit",
        ),
    ],
)
def test_each_action_says_why(recent, policy, reason):
    assessment = assess(
        stripe_credit=Decimal("50.00"),
        open_usage_cost=Decimal("0"),
        moesif_balance=Decimal("30.00"),
        recent=recent,
        policy=policy,
        now=NOW,
    )
    assert assessment.reason == reason
