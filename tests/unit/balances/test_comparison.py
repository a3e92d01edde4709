"""The comparison's pure parts: the currency's drift policy, and assessing what was observed in minor units."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from reconciler.balances.comparison import StripeSide, assess_observed, drift_policy
from reconciler.balances.drift import DriftAction, DriftPolicy, RecentTransaction
from reconciler.config import BalancesConfig
from tests.conftest import utc

NOW = utc(2026, 3, 10, 12, 0)
SETTINGS = BalancesConfig(
    tolerance={"usd": Decimal("0.05")},
    max_auto_correction={"usd": Decimal(100)},
    auto_correct=True,
    settle_delay=timedelta(minutes=15),
)


@pytest.mark.parametrize(
    ("currency", "policy"),
    [
        pytest.param(
            "usd",
            DriftPolicy(Decimal("0.05"), Decimal(100), True, timedelta(minutes=15)),
            id="the configured tolerance and limit",
        ),
        pytest.param(
            "eur", DriftPolicy(Decimal("0.01"), None, True, timedelta(minutes=15)), id="no entry: one cent, no limit"
        ),
        pytest.param("jpy", DriftPolicy(Decimal(1), None, True, timedelta(minutes=15)), id="no entry: one yen"),
        pytest.param("kwd", DriftPolicy(Decimal("0.001"), None, True, timedelta(minutes=15)), id="three decimals"),
    ],
)
def test_drift_policy(currency, policy):
    assert drift_policy(SETTINGS, currency) == policy


HOLD = "a refund could not be attributed"
# name: Stripe credit and open usage (minor), Moesif (minor), currency, hold reason -> action, expected, difference
OBSERVED_CASES = [
    pytest.param(StripeSide(5000, 1250), 3750, "usd", None, DriftAction.IN_SYNC, "37.50", "0.00", id="in sync"),
    pytest.param(StripeSide(5000, 0), 3000, "usd", None, DriftAction.CORRECT, "50.00", "20.00", id="drift"),
    pytest.param(StripeSide(500, 0), 498, "jpy", None, DriftAction.CORRECT, "500", "2", id="zero-decimal units"),
    pytest.param(
        StripeSide(5000, 0), 3000, "usd", HOLD, DriftAction.SETTLING, "50.00", "20.00", id="a held correction waits"
    ),
    pytest.param(
        StripeSide(5000, 0), 4999, "usd", HOLD, DriftAction.IN_SYNC, "50.00", "0.01", id="the hold changes no in-sync"
    ),
]


@pytest.mark.parametrize(("stripe", "moesif", "currency", "hold", "action", "expected", "difference"), OBSERVED_CASES)
def test_assess_observed(stripe, moesif, currency, hold, action, expected, difference):
    policy = DriftPolicy(Decimal("0.01"), Decimal(1000), True, timedelta(minutes=15))
    assessment = assess_observed(stripe, moesif, currency, [], policy, NOW, hold)
    assert (assessment.action, assessment.expected, assessment.difference) == (
        action,
        Decimal(expected),
        Decimal(difference),
    )
    if hold and action is DriftAction.SETTLING:
        assert (assessment.reason, assessment.correction) == (HOLD, None)


def test_a_hold_does_not_hide_why_a_drift_is_not_corrected():
    policy = DriftPolicy(Decimal("0.01"), Decimal(1000), True, timedelta(minutes=15))
    unsettled = [RecentTransaction(Decimal(20), NOW - timedelta(hours=1), is_correction=True)]
    assessment = assess_observed(StripeSide(5000, 0), 3000, "usd", unsettled, policy, NOW, HOLD)
    assert assessment.action is DriftAction.UNSETTLED
