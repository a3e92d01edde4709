"""FakeStripe's payments and balances (PaymentIntents, charges, refunds, customer balance, credit grants)
driven through the real stripe-python SDK over HTTP. Charges are served only inside their PaymentIntent
(``expand[]=latest_charge``), as the product reads them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe

from reconciler_sandbox.httpserver import LoopbackServer
from reconciler_sandbox.stripe_fake import FakeStripe
from tests.sandbox.conftest import NOW, Clock, stripe_sdk

DAY = 86400
METERED = {"type": "applicability_scope", "applicability_scope": {"price_type": "metered"}}


@pytest.fixture
def fake(clock: Clock) -> FakeStripe:
    return FakeStripe(clock=clock)


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[stripe.StripeClient]:
    with stripe_sdk(server.url) as client:
        yield client


def _charge(client: stripe.StripeClient, payment_intent: str) -> stripe.Charge:
    charge = client.v1.payment_intents.retrieve(payment_intent, params={"expand": ["latest_charge"]}).latest_charge
    assert isinstance(charge, stripe.Charge)
    return charge


def _summary(client: stripe.StripeClient, customer: str, flt: dict | None = None) -> list[dict]:
    summary = client.v1.billing.credit_balance_summary.retrieve(
        params={"customer": customer, "filter": flt or METERED}  # type: ignore[typeddict-item]
    )
    assert summary.object == "billing.credit_balance_summary"
    assert summary.customer == customer
    return [b.to_dict() for b in summary.balances]


# -- payment intents ---------------------------------------------------------------------------------


def test_payment_intent_wire_format(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    seeded = fake.add_payment_intent("cus_A", 2500, metadata={"topup": "t1"})
    failed = fake.add_payment_intent("cus_A", 900, status="requires_payment_method")

    pi = client.v1.payment_intents.retrieve(seeded["id"])
    assert pi.to_dict() == seeded
    assert pi.object == "payment_intent"
    assert pi.id.startswith("pi_")
    assert (pi.amount, pi.amount_received, pi.currency, pi.customer, pi.status) == (
        2500,
        2500,
        "usd",
        "cus_A",
        "succeeded",
    )
    assert pi.metadata.to_dict() == {"topup": "t1"}
    assert pi.latest_charge.startswith("ch_")

    other = client.v1.payment_intents.retrieve(failed["id"])
    assert (other.amount_received, other.latest_charge) == (0, None)

    expanded = client.v1.payment_intents.retrieve(seeded["id"], params={"expand": ["latest_charge"]})
    assert expanded.latest_charge.id == pi.latest_charge
    assert expanded.latest_charge.disputed is False


def test_payment_intents_list_filters_by_customer_newest_first(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    fake.add_customer("cus_B")
    older = fake.add_payment_intent("cus_A", 100, created=NOW - 20)
    newer = fake.add_payment_intent("cus_A", 200, created=NOW - 10)
    fake.add_payment_intent("cus_B", 300, created=NOW - 5)

    page = client.v1.payment_intents.list(params={"customer": "cus_A"})
    assert page.object == "list"
    assert page.url == "/v1/payment_intents"
    assert page.has_more is False
    assert [p.id for p in page.data] == [newer["id"], older["id"]]
    assert len(client.v1.payment_intents.list().data) == 3


def test_payment_intents_created_ranges(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    ids = {t: fake.add_payment_intent("cus_A", 100, created=NOW + t)["id"] for t in (0, 10, 20, 30)}

    def listed(created: dict | int) -> list[str]:
        return [p.id for p in client.v1.payment_intents.list(params={"customer": "cus_A", "created": created}).data]

    assert listed({"gte": NOW + 10, "lt": NOW + 30}) == [ids[20], ids[10]]
    assert listed({"gt": NOW + 10, "lte": NOW + 30}) == [ids[30], ids[20]]
    assert listed({"lte": NOW}) == [ids[0]]
    assert listed(NOW + 20) == [ids[20]]
    with pytest.raises(stripe.InvalidRequestError) as err:
        listed({"gte": "yesterday"})
    assert err.value.http_status == 400
    assert err.value.param == "created[gte]"


def test_payment_intents_paging(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    ids = [fake.add_payment_intent("cus_A", 100 + i, created=NOW + i)["id"] for i in range(5)]
    newest_first = ids[::-1]

    first = client.v1.payment_intents.list(params={"limit": 2})
    assert [p.id for p in first.data] == newest_first[:2]
    assert first.has_more is True
    second = client.v1.payment_intents.list(params={"limit": 2, "starting_after": first.data[-1].id})
    assert [p.id for p in second.data] == newest_first[2:4]
    back = client.v1.payment_intents.list(params={"limit": 2, "ending_before": second.data[0].id})
    assert [p.id for p in back.data] == newest_first[:2]
    assert [p.id for p in client.v1.payment_intents.list(params={"limit": 2}).auto_paging_iter()] == newest_first


def test_unknown_payment_intent_and_bad_key(fake: FakeStripe, server: LoopbackServer, client: stripe.StripeClient):
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.payment_intents.retrieve("pi_missing")
    assert err.value.http_status == 404
    assert err.value.code == "resource_missing"
    assert err.value.request_id.startswith("req_")

    wrong = stripe.StripeClient("sk_test_wrong", base_addresses={"api": server.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):
        wrong.v1.payment_intents.list()


# -- charges, refunds, disputes --------------------------------------------------------------------


def test_refunds_update_the_charge(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    pi = fake.add_payment_intent("cus_A", 5000)
    first = fake.add_refund(pi["id"], 1500, created=NOW + 1, reason="requested_by_customer")

    charge = _charge(client, pi["id"])
    assert (charge.amount, charge.amount_refunded, charge.refunded, charge.payment_intent) == (
        5000,
        1500,
        False,
        pi["id"],
    )

    rest = fake.add_refund(pi["id"], created=NOW + 2)  # default: the remainder
    assert rest["amount"] == 3500
    charge = _charge(client, pi["id"])
    assert (charge.amount_refunded, charge.refunded) == (5000, True)
    # Refunds leave the PaymentIntent's amount_received alone.
    assert client.v1.payment_intents.retrieve(pi["id"]).amount_received == 5000

    [refund] = [r for r in client.v1.refunds.list(params={"payment_intent": pi["id"]}).data if r.id == first["id"]]
    assert refund.to_dict() == first
    assert refund.object == "refund"
    assert refund.id.startswith("re_")
    assert (refund.amount, refund.currency, refund.charge, refund.status, refund.reason) == (
        1500,
        "usd",
        pi["latest_charge"],
        "succeeded",
        "requested_by_customer",
    )
    with pytest.raises(ValueError):
        fake.add_refund(pi["id"], 1)  # nothing left to refund


def test_refunds_list_filters_and_created(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    pi1 = fake.add_payment_intent("cus_A", 1000)
    pi2 = fake.add_payment_intent("cus_A", 1000)
    r1 = fake.add_refund(pi1["id"], 100, created=NOW + 10)
    r2 = fake.add_refund(pi1["id"], 200, created=NOW + 20)
    r3 = fake.add_refund(pi2["id"], 300, created=NOW + 30)

    page = client.v1.refunds.list(params={"payment_intent": pi1["id"]})
    assert page.url == "/v1/refunds"
    assert [r.id for r in page.data] == [r2["id"], r1["id"]]
    assert [r.id for r in client.v1.refunds.list(params={"charge": pi2["latest_charge"]}).data] == [r3["id"]]
    assert [r.id for r in client.v1.refunds.list(params={"created": {"gte": NOW + 20}}).data] == [r3["id"], r2["id"]]
    assert [r.id for r in client.v1.refunds.list(params={"created": {"lt": NOW + 20}}).data] == [r1["id"]]
    paged = client.v1.refunds.list(params={"limit": 1, "starting_after": r3["id"]})
    assert ([r.id for r in paged.data], paged.has_more) == ([r2["id"]], True)


def test_dispute_marks_the_charge(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    pi = fake.add_payment_intent("cus_A", 1000)
    other = fake.add_payment_intent("cus_A", 2000)
    assert _charge(client, pi["id"]).disputed is False

    fake.dispute_charge(pi["id"])
    assert (_charge(client, pi["id"]).id, _charge(client, pi["id"]).disputed) == (pi["latest_charge"], True)
    assert _charge(client, other["id"]).disputed is False
    listed = client.v1.payment_intents.list(params={"customer": "cus_A", "expand": ["data.latest_charge"]}).data
    assert {p.id: p.latest_charge.disputed for p in listed} == {pi["id"]: True, other["id"]: False}


# -- customer balance ------------------------------------------------------------------------------


def test_customer_balance_adjustments(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A", balance=-1000)
    fake.add_customer("cus_B", currency=None)
    assert fake.adjust_customer_balance("cus_A", -2500)["balance"] == -3500
    fake.adjust_customer_balance("cus_A", 700)

    customer = client.v1.customers.retrieve("cus_A")
    assert (customer.balance, customer.currency) == (-2800, "usd")
    fake.adjust_customer_balance("cus_B", -100, currency="eur")  # a customer without a currency takes the first
    assert (client.v1.customers.retrieve("cus_B").balance, client.v1.customers.retrieve("cus_B").currency) == (
        -100,
        "eur",
    )
    with pytest.raises(ValueError):
        fake.adjust_customer_balance("cus_A", -100, currency="eur")


# -- billing credit grants -------------------------------------------------------------------------


def test_credit_balance_summary_after_grants_and_consumption(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A")
    fake.add_customer("cus_empty")
    g1 = fake.add_credit_grant("cus_A", 3000)
    fake.add_credit_grant("cus_A", 2000)
    fake.add_credit_grant("cus_A", 700, "eur")

    def usd(available: int, ledger: int) -> dict:
        return {
            "available_balance": {"type": "monetary", "monetary": {"currency": "usd", "value": available}},
            "ledger_balance": {"type": "monetary", "monetary": {"currency": "usd", "value": ledger}},
        }

    balances = _summary(client, "cus_A")
    assert len(balances) == 2
    assert balances[0]["available_balance"]["monetary"] == {"currency": "eur", "value": 700}
    assert balances[1] == usd(5000, 5000)

    assert fake.consume_credit("cus_A", 1200) == 1200
    assert _summary(client, "cus_A")[1] == usd(3800, 3800)
    # Credits held on a draft invoice leave the ledger balance until it finalizes.
    fake.consume_credit("cus_A", 300, draft=True)
    assert _summary(client, "cus_A")[1] == usd(3500, 3800)
    # More than is left: only what is available is applied.
    assert fake.consume_credit("cus_A", 10_000) == 3500
    assert _summary(client, "cus_A")[1] == usd(0, 300)

    one = _summary(client, "cus_A", {"type": "credit_grant", "credit_grant": g1["id"]})
    assert len(one) == 1
    assert _summary(client, "cus_empty") == []


def test_credit_balance_summary_honours_effective_expiry_and_void(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
):
    fake.add_customer("cus_A")
    fake.add_credit_grant("cus_A", 1000, effective_at=NOW + DAY)
    expiring = fake.add_credit_grant("cus_A", 200, expires_at=NOW + 2 * DAY)
    voided = fake.add_credit_grant("cus_A", 50)
    fake.void_credit_grant(voided["id"])

    def available() -> int:
        return _summary(client, "cus_A")[0]["available_balance"]["monetary"]["value"]

    assert available() == 200
    clock.now = NOW + DAY
    assert available() == 1200
    clock.now = NOW + 2 * DAY
    assert available() == 1000
    # Consumption draws the soonest-expiring grant first.
    clock.now = NOW + DAY
    fake.consume_credit("cus_A", 150)
    only = _summary(client, "cus_A", {"type": "credit_grant", "credit_grant": expiring["id"]})
    assert only[0]["available_balance"]["monetary"]["value"] == 50


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"filter": METERED}, "customer"),
        ({"customer": "cus_A"}, "filter"),
        ({"customer": "cus_A", "filter": {"type": "bogus"}}, "filter[type]"),
        ({"customer": "cus_A", "filter": {"type": "credit_grant"}}, "filter[credit_grant]"),
        (
            {"customer": "cus_A", "filter": {"type": "credit_grant", "credit_grant": "credgr_nope"}},
            "filter[credit_grant]",
        ),
        ({"customer": "cus_nope", "filter": METERED}, "customer"),
    ],
)
def test_credit_balance_summary_validation(fake: FakeStripe, client: stripe.StripeClient, params: dict, param: str):
    fake.add_customer("cus_A")
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.billing.credit_balance_summary.retrieve(params=params)  # type: ignore[arg-type]
    assert err.value.http_status == 400
    assert err.value.param == param


def test_reset_clears_payments_and_balances(fake: FakeStripe, client: stripe.StripeClient):
    fake.add_customer("cus_A", balance=-100)
    pi = fake.add_payment_intent("cus_A", 1000)
    fake.add_refund(pi["id"], 10)
    fake.add_credit_grant("cus_A", 500)
    fake.reset()
    assert client.v1.payment_intents.list().data == []
    assert client.v1.refunds.list().data == []
    assert (fake.payment_intents, fake.charges, fake.refunds, fake.credit_grants) == ({}, {}, {}, {})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.retrieve("cus_A")
