"""Which Moesif subscription stands for which Stripe customer, and what their open usage costs."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from reconciler.balances.accounts import UnpricedUsageError, map_accounts, open_usage_cost_minor
from reconciler.balances.model import OpenUsage
from reconciler.usage.model import BillingPeriod, CustomerCredit, MeteredItem
from tests.conftest import utc

ENDED_SINCE = utc(2026, 2, 1)
KEY = "moesif_subscription_id"
ITEM = MeteredItem(
    item_id="si_1",
    subscription_id="sub_1",
    subscription_status="active",
    customer_id="cus_1",
    price_id="price_1",
    meter_id="mtr_1",
    period=BillingPeriod(utc(2026, 3, 1), utc(2026, 4, 1)),
    subscription_created=utc(2025, 6, 1),
    unit_amount=Decimal("0.5"),
)


def item(**changes) -> MeteredItem:
    return replace(ITEM, **changes)


def ended(at, **changes) -> MeteredItem:
    return item(subscription_status="canceled", ended_at=at, **changes)


# name, items, metadata key -> {customer: (Moesif subscription, currency, unit prices)}
MAPPING_CASES = [
    pytest.param([], KEY, {}, id="no items, no accounts"),
    pytest.param([ITEM], KEY, {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})}, id="one live subscription"),
    pytest.param(
        [item(meter_id=None, price_id="price_legacy", unit_amount=Decimal(3))],
        KEY,
        {"cus_1": ("sub_1", "usd", {"price_legacy": Decimal(3)})},
        id="a legacy price is keyed by its price id",
    ),
    pytest.param(
        [item(unit_amount=None)], KEY, {"cus_1": ("sub_1", "usd", {"mtr_1": None})}, id="a tiered price has no unit"
    ),
    pytest.param(
        [item(subscription_id="sub_new", subscription_created=utc(2026, 1, 1)), item(subscription_id="sub_old")],
        KEY,
        {"cus_1": ("sub_old", "usd", {"mtr_1": Decimal("0.5")})},
        id="the oldest live subscription is chosen",
    ),
    pytest.param(
        [item(subscription_id="sub_b"), item(subscription_id="sub_a")],
        KEY,
        {"cus_1": ("sub_a", "usd", {"mtr_1": Decimal("0.5")})},
        id="created together: the smaller subscription id",
    ),
    pytest.param(
        [item(subscription_id="sub_dated"), item(subscription_id="sub_undated", subscription_created=None)],
        KEY,
        {"cus_1": ("sub_undated", "usd", {"mtr_1": Decimal("0.5")})},
        id="an unknown creation date counts as oldest",
    ),
    pytest.param(
        [item(subscription_status="trialing")],
        KEY,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="trialing is live",
    ),
    pytest.param(
        [item(subscription_status="past_due")],
        KEY,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="past_due is live",
    ),
    pytest.param(
        [
            item(subscription_id="sub_old", currency="eur", meter_id="mtr_a", unit_amount=Decimal(1)),
            item(subscription_id="sub_new", subscription_created=utc(2026, 1, 1), meter_id="mtr_b"),
        ],
        KEY,
        {"cus_1": ("sub_old", "eur", {"mtr_a": Decimal(1), "mtr_b": Decimal("0.5")})},
        id="the chosen subscription's currency; prices of every live item",
    ),
    pytest.param(
        [item(customer_metadata={KEY: "msub_9"})],
        KEY,
        {"cus_1": ("msub_9", "usd", {"mtr_1": Decimal("0.5")})},
        id="the customer's metadata names the Moesif subscription",
    ),
    pytest.param(
        [item(customer_metadata={KEY: ""})],
        KEY,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="an empty metadata value is no override",
    ),
    pytest.param(
        [item(customer_metadata={"other": "msub_9"})],
        KEY,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="metadata without the key is no override",
    ),
    pytest.param(
        [item(customer_metadata={KEY: "msub_9"})],
        None,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="no metadata key configured: no override",
    ),
    pytest.param(
        [ended(utc(2026, 2, 15))],
        KEY,
        {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})},
        id="a subscription ended within the look-back is kept",
    ),
    pytest.param(
        [ended(ENDED_SINCE)], KEY, {"cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")})}, id="ended at the bound"
    ),
    pytest.param([ended(utc(2026, 1, 31))], KEY, {}, id="a subscription ended before the look-back is dropped"),
    pytest.param([item(subscription_status="incomplete")], KEY, {}, id="neither live nor ended: dropped"),
    pytest.param(
        [ended(utc(2026, 2, 20), subscription_id="sub_ended"), item(subscription_id="sub_live")],
        KEY,
        {"cus_1": ("sub_live", "usd", {"mtr_1": Decimal("0.5")})},
        id="a live subscription wins over an ended one",
    ),
    pytest.param(
        [
            ended(utc(2026, 2, 10), subscription_id="sub_first", meter_id="mtr_a"),
            ended(utc(2026, 2, 20), subscription_id="sub_last", meter_id="mtr_b"),
        ],
        KEY,
        {"cus_1": ("sub_last", "usd", {"mtr_b": Decimal("0.5")})},
        id="all ended: the last to end, with only its prices",
    ),
    pytest.param(
        [ITEM, item(customer_id="cus_2", subscription_id="sub_2", currency="jpy", unit_amount=Decimal(2))],
        KEY,
        {
            "cus_1": ("sub_1", "usd", {"mtr_1": Decimal("0.5")}),
            "cus_2": ("sub_2", "jpy", {"mtr_1": Decimal(2)}),
        },
        id="one account per customer",
    ),
]


@pytest.mark.parametrize(("items", "metadata_key", "expected"), MAPPING_CASES)
def test_map_accounts(items, metadata_key, expected):
    accounts = map_accounts(items, metadata_key, ENDED_SINCE)
    got = {customer: (a.account.subscription_id, a.account.currency, a.unit_prices) for customer, a in accounts.items()}
    assert got == expected
    assert all(a.account.customer_id == customer for customer, a in accounts.items())


def test_the_chosen_items_customer_credit_comes_along():
    credit = CustomerCredit(minor=2500, currency="usd")
    accounts = map_accounts(
        [item(customer_credit=credit), item(subscription_id="sub_0", subscription_created=utc(2025, 1, 1))],
        KEY,
        ENDED_SINCE,
    )
    # the oldest subscription is sub_0, whose listing did not expand the customer
    assert (accounts["cus_1"].account.subscription_id, accounts["cus_1"].stripe_credit) == ("sub_0", None)
    assert map_accounts([item(customer_credit=credit)], KEY, ENDED_SINCE)["cus_1"].stripe_credit == credit


def usage(total: int, *, meter: str | None = "mtr_1", target: str = "api_calls", item_id: str = "si_1") -> OpenUsage:
    return OpenUsage(
        stripe_target=target, meter_id=meter, kind="sum", subscription_item_id=item_id, reported_total=total
    )


PRICES = {"mtr_1": Decimal("0.5"), "mtr_2": Decimal(2), "price_legacy": Decimal("0.25"), "api_calls": Decimal(100)}
COST_CASES = [
    pytest.param([], 0, id="no open usage costs nothing"),
    pytest.param([usage(1000)], 500, id="a meter's units at its unit price"),
    pytest.param([usage(0)], 0, id="nothing reported yet"),
    pytest.param([usage(3)], 2, id="1.5 rounds up"),
    pytest.param([usage(5)], 3, id="2.5 rounds up too (half up, not to even)"),
    pytest.param([usage(1, meter=None)], 100, id="a usage with no meter is priced by its stripe target"),
    pytest.param([usage(7, meter=None, target="price_legacy")], 2, id="legacy price: 1.75 rounds to 2"),
    pytest.param([usage(5, meter=None, target="price_legacy")], 1, id="legacy price: 1.25 rounds to 1"),
    pytest.param([usage(1), usage(1, item_id="si_2")], 1, id="the total is rounded once, not each usage"),
    pytest.param([usage(10), usage(3, meter="mtr_2")], 11, id="usages of several meters add up"),
    pytest.param([usage(2)], 1, id="the meter id is priced before the stripe target"),
]


@pytest.mark.parametrize(("open_usage", "minor"), COST_CASES)
def test_open_usage_cost_minor(open_usage, minor):
    assert open_usage_cost_minor(open_usage, PRICES) == minor


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        pytest.param(
            {"mtr_1": None},
            "cannot price the open usage of 'api_calls' (item si_9): only plain per-unit prices can be priced",
            id="a price that is not per-unit",
        ),
        pytest.param(
            {"mtr_2": Decimal(1)},
            "cannot price the open usage of 'api_calls' (item si_9): only plain per-unit prices can be priced",
            id="a meter with no price",
        ),
        pytest.param(
            {"api_calls": Decimal(100)},
            "cannot price the open usage of 'api_calls' (item si_9): only plain per-unit prices can be priced",
            id="a priced stripe target does not price its meter",
        ),
    ],
)
def test_usage_that_cannot_be_priced_fails_the_customer(prices, message):
    with pytest.raises(UnpricedUsageError) as raised:
        open_usage_cost_minor([usage(0, item_id="si_9")], prices)
    assert str(raised.value) == message
