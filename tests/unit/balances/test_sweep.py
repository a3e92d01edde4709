"""When the balance job may skip reading a customer's Moesif balance."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from reconciler.balances.sweep import LastObservation, sweep_due_after, why_read_moesif
from tests.conftest import utc

OBSERVED = utc(2026, 3, 10, 12, 0)
AGREED = LastObservation(
    observed_at=OBSERVED,
    subscription_id="sub_1",
    stripe_credit_minor=5000,
    open_usage_minor=1200,
    moesif_minor=3800,
    action="in_sync",
)


DAY = timedelta(hours=24)


def why(last: LastObservation | None = AGREED, **changes) -> str | None:
    facts = {
        "customer_id": "cus_1",
        "subscription_id": "sub_1",
        "stripe_credit_minor": 5000,
        "open_usage_minor": 1200,
        "money_in_flight": False,
        "now": OBSERVED + sweep_due_after("cus_1", DAY) - timedelta(seconds=1),
        "full_sweep_interval": timedelta(hours=24),
        **changes,
    }
    return why_read_moesif(last, **facts)


def test_an_unchanged_customer_that_agreed_inside_the_sweep_interval_is_not_read():
    assert why() is None


@pytest.mark.parametrize(
    ("last", "changes", "reason"),
    [
        (None, {}, "never observed"),
        (replace(AGREED, action="settling"), {}, "last observation was settling"),
        (replace(AGREED, action="report"), {}, "last observation was report"),
        (AGREED, {"money_in_flight": True}, "a Moesif transaction of ours is recent or in flight"),
        (AGREED, {"subscription_id": "sub_2"}, "the customer maps to another Moesif subscription"),
        (AGREED, {"stripe_credit_minor": 4999}, "Stripe credit changed"),
        (AGREED, {"open_usage_minor": 1201}, "open usage changed"),
        (AGREED, {"now": OBSERVED + sweep_due_after("cus_1", DAY)}, "full sweep due"),
        (AGREED, {"now": OBSERVED + DAY}, "full sweep due"),
        (AGREED, {"full_sweep_interval": timedelta(0)}, "full sweep due"),
        # the first reason in this order is the one given
        (replace(AGREED, action="settling"), {"money_in_flight": True}, "last observation was settling"),
        (
            AGREED,
            {"money_in_flight": True, "stripe_credit_minor": 1},
            "a Moesif transaction of ours is recent or in flight",
        ),
        (
            AGREED,
            {"subscription_id": "sub_2", "open_usage_minor": 0},
            "the customer maps to another Moesif subscription",
        ),
        (AGREED, {"stripe_credit_minor": 1, "open_usage_minor": 0}, "Stripe credit changed"),
        (AGREED, {"open_usage_minor": 0, "now": OBSERVED + DAY}, "open usage changed"),
    ],
)
def test_any_change_or_a_due_sweep_means_a_read(last, changes, reason):
    assert why(last, **changes) == reason


def test_each_customer_falls_due_at_its_own_point_in_the_last_quarter_of_the_interval():
    due = {sweep_due_after(f"cus_{n}", DAY) for n in range(200)}
    assert all(DAY * 3 / 4 < after <= DAY for after in due)
    assert len(due) > 150  # spread, not one cycle for all
    assert sweep_due_after("cus_1", DAY) == sweep_due_after("cus_1", DAY)  # fixed per customer, across processes
