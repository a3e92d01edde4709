"""Planning a top-up or refund for Moesif, and why one is held instead of forwarded."""

from __future__ import annotations

from decimal import Decimal

import pytest

from reconciler.balances.accounts import CustomerAccount
from reconciler.balances.forwarding import plan_transaction
from reconciler.balances.model import BalanceAccount

CUSTOMER = CustomerAccount(BalanceAccount("cus_1", "sub_1", "usd"), {"mtr_1": Decimal(1)})
CURRENCY = "paid in EUR but the Moesif subscription counts USD; the reconciler does not convert currencies"
INEXACT = "the amount cannot be sent to Moesif exactly (it has no exact JSON number)"


@pytest.mark.parametrize(
    ("kind", "amount_minor", "currency", "direction", "recorded_currency", "refusal"),
    [
        pytest.param("topup", 2500, "usd", "credit", "usd", None, id="a top-up in the account's currency"),
        pytest.param("refund", 700, "usd", "debit", "usd", None, id="a refund in the account's currency"),
        pytest.param("topup", 2500, "eur", "credit", "eur", CURRENCY, id="another currency is held, recorded in it"),
        pytest.param("topup", 10**17 + 1, "usd", "credit", "usd", INEXACT, id="no exact JSON number"),
        pytest.param("topup", 10**15, "usd", "credit", "usd", None, id="a large amount a double still holds"),
    ],
)
def test_plan_transaction(kind, amount_minor, currency, direction, recorded_currency, refusal):
    planned, why = plan_transaction(kind, "src_1", CUSTOMER, amount_minor, currency, direction, "Stripe top-up src_1")
    assert why == refusal
    assert (planned.kind, planned.source_id, planned.transaction_id, planned.type) == (
        kind,
        "src_1",
        "src_1",
        direction,
    )
    assert (planned.amount_minor, planned.description) == (amount_minor, "Stripe top-up src_1")
    assert planned.account == BalanceAccount("cus_1", "sub_1", recorded_currency)
