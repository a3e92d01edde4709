"""Subscription invoices are paid by PaymentIntents too (https://docs.stripe.com/billing/billing-apis), and since
API 2025-03-31 such a PaymentIntent names no invoice: the balance job must tell them from top-ups through Stripe's
InvoicePayments (https://docs.stripe.com/api/invoice-payment/list), or every paid bill becomes prepaid credit."""

from __future__ import annotations

import json
from datetime import timedelta

from freezegun import freeze_time

from reconciler.report import build_report
from tests.conftest import ts
from tests.integration.test_balances import NOW, bh  # noqa: F401  (the fixture)


def test_a_paid_subscription_invoice_is_not_a_top_up_and_its_refund_is_not_debited(bh):  # noqa: F811
    bh.configure(stripe_source="none", auto_correct=False)  # the default filter: no metadata named
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 2500, created=ts(NOW - timedelta(hours=3)), id="pi_topup")
    invoice = bh.stripe.pay_invoice(
        "cus_M", [("price_base", 4900)], subscription="sub_M", created=ts(NOW - timedelta(seconds=3600))
    )
    bh.stripe.add_refund(invoice["payment_intent"], 900, created=ts(NOW - timedelta(seconds=600)), id="re_invoice")
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 0, result.failures
    assert [(p["transaction_id"], p["type"], p["amount"]) for p in bh.posts()] == [("pi_topup", "credit", 25.0)]
    assert bh.moesif.balance("sub_M") == 25.0


def test_a_refund_of_an_old_invoice_payment_is_checked_by_its_payment_intent(bh):  # noqa: F811
    bh.configure(stripe_source="none", auto_correct=False, topups={"lookback": "35d"})
    bh.customer(moesif_balance=40.0)
    invoice = bh.stripe.pay_invoice("cus_M", [("price_base", 4900)], created=ts(NOW - timedelta(days=90)))
    bh.stripe.add_refund(invoice["payment_intent"], 4900, created=ts(NOW - timedelta(days=1)), id="re_old")
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 0, result.failures
    assert bh.posts() == []
    asked = [r.query for r in bh.stripe.requests if r.path == "/v1/invoice_payments"]
    assert any(q.get("payment[payment_intent]") == [invoice["payment_intent"]] for q in asked)


def test_without_the_invoice_payments_listing_nothing_is_forwarded(bh):  # noqa: F811
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 2500, created=ts(NOW - timedelta(hours=3)), id="pi_topup")
    bh.stripe.pay_invoice("cus_M", [("price_base", 4900)], created=ts(NOW - timedelta(seconds=3600)))
    bh.stripe.inject_fault("GET", "/v1/invoice_payments", 500, times=3)  # every attempt of one cycle
    with freeze_time(NOW) as clock:
        closed = bh.cycle()
        assert [f.split(":")[0] for f in closed.failures] == [
            "listing payments, invoice payments and refunds (nothing is forwarded this cycle)"
        ]
        assert bh.posts() == []  # fail closed: no PaymentIntent can be told from a bill
        clock.tick(timedelta(minutes=5))
        bh.cycle()
    assert [p["transaction_id"] for p in bh.posts()] == ["pi_topup"]


def test_an_invoice_payment_an_earlier_version_forwarded_is_shown_to_a_person_never_debited(bh):  # noqa: F811
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    invoice = bh.stripe.pay_invoice("cus_M", [("price_base", 4900)], created=ts(NOW - timedelta(seconds=3600)))
    paid_with = invoice["payment_intent"]
    real_handle = bh.stripe.handle

    def as_before_invoice_payments(method, path, query, headers, body):  # an earlier version never asked
        if path == "/v1/invoice_payments":
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps({"object": "list", "data": [], "has_more": False}).encode(),
            )
        return real_handle(method, path, query, headers, body)

    bh.stripe.handle = as_before_invoice_payments
    with freeze_time(NOW) as clock:
        bh.cycle()
        assert [p["transaction_id"] for p in bh.posts()] == [paid_with]  # the old mistake
        bh.stripe.handle = real_handle
        clock.tick(timedelta(hours=1))
        flagged = bh.cycle()
        clock.tick(timedelta(hours=1))
        again = bh.cycle()
    assert [p["transaction_id"] for p in bh.posts()] == [paid_with]  # never debited
    assert [f"paid invoice {invoice['id']}" in flag for flag in flagged.customers[0].flags] == [True]
    assert again.customers[0].flags == []  # recorded once, not rediscovered every cycle
    [(state, attention)] = bh.rows("select state, attention from moesif_transactions")
    assert (state, attention) == ("sent", f"paid invoice {invoice['id']}: an invoice payment, not a top-up")
    audit = build_report(bh.engine, NOW - timedelta(days=1), NOW + timedelta(days=1)).audit
    assert [a.outcome for a in audit if a.key == paid_with] == [
        f"sent; needs a person: paid invoice {invoice['id']}: an invoice payment, not a top-up"
    ]


def test_invoices_selling_only_named_top_up_prices_are_top_ups_and_mixed_ones_are_held(bh):  # noqa: F811
    bh.configure(stripe_source="none", auto_correct=False, topups={"invoice_prices": ["price_credits"]})
    bh.customer()
    credits = bh.stripe.pay_invoice("cus_M", [("price_credits", 5000)], created=ts(NOW - timedelta(seconds=7200)))
    mixed = bh.stripe.pay_invoice(
        "cus_M", [("price_credits", 1000), ("price_base", 4900)], created=ts(NOW - timedelta(seconds=3600))
    )
    bh.stripe.pay_invoice("cus_M", [("price_base", 4900)], created=ts(NOW - timedelta(seconds=1800)))
    with freeze_time(NOW):
        result = bh.cycle()
    assert [(p["transaction_id"], p["amount"]) for p in bh.posts()] == [(credits["payment_intent"], 50.0)]
    [held] = result.customers[0].held
    assert held.startswith(f"topup {mixed['payment_intent']} (59.00 USD): paid invoice {mixed['id']}")
    assert result.summary()["held"] == 1


def test_a_top_up_later_attached_to_an_invoice_is_shown_to_a_person_never_debited(bh):  # noqa: F811
    """https://docs.stripe.com/api/invoices/attach_payment: a PaymentIntent that already succeeded can be attached to
    an invoice afterwards. Until then nothing tells it from a top-up, so it is credited; once Stripe maps it to the
    invoice, a person is told, and nothing is debited on a guess."""
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 4900, created=ts(NOW - timedelta(hours=2)), id="pi_later_a_bill")
    invoice = bh.stripe.open_invoice("cus_M", [("price_base", 4900)], created=ts(NOW - timedelta(hours=3)))
    with freeze_time(NOW) as clock:
        bh.cycle()
        clock.tick(timedelta(hours=1))
        bh.stripe.attach_payment(invoice["id"], "pi_later_a_bill")
        flagged = bh.cycle()
    assert [(p["transaction_id"], p["type"]) for p in bh.posts()] == [("pi_later_a_bill", "credit")]
    assert [f"paid invoice {invoice['id']}" in flag for flag in flagged.customers[0].flags] == [True]
    [(state, attention)] = bh.rows("select state, attention from moesif_transactions")
    assert (state, attention) == ("sent", f"paid invoice {invoice['id']}: an invoice payment, not a top-up")
