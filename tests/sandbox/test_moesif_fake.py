"""FakeMoesif (Management API: balance transactions and subscription balances) over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from reconciler_sandbox.moesif_fake import FakeMoesif
from tests.sandbox.conftest import MOESIF_TOKEN, NOW, Clock

TOKEN = MOESIF_TOKEN
TXN_PATH = "/v1/~/billing/reports/balance_transactions"


@pytest.fixture
def fake(moesif_fake: FakeMoesif) -> FakeMoesif:
    return moesif_fake


@pytest.fixture
def client(moesif_client: httpx.Client) -> httpx.Client:
    return moesif_client


def _txn(transaction_id: str = "t1", amount: float = 25.0, type: str = "credit", **extra: Any) -> dict[str, Any]:
    return {
        "company_id": "cus_1",
        "subscription_id": "sub_1",
        "amount": amount,
        "type": type,
        "transaction_id": transaction_id,
        **extra,
    }


def _balance(client: httpx.Client, sub: str = "sub_1") -> dict[str, Any]:
    resp = client.get(f"/v1/search/~/subscriptions/{sub}")
    assert resp.status_code == 200, resp.text
    return resp.json()["balance"]


def test_debit_consume_and_pending_activity(fake: FakeMoesif, client: httpx.Client):
    assert client.post(TXN_PATH, json=_txn("d1", 4.5, "debit")).status_code == 204
    assert fake.consume("sub_1", 0.1) == pytest.approx(5.4)
    fake.consume("sub_1", 0.2)
    fake.set_pending_activity("sub_1", -1.25)
    balance = _balance(client)
    assert balance["current_balance"] == 5.2  # Decimal inside: no 0.1 + 0.2 drift
    assert balance["pending_activity"] == -1.25
    assert balance["available_balance"] == 3.95


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer Bearer {TOKEN}", TOKEN, "Bearer wrong", f"Basic {TOKEN}", None],
)
def test_auth_requires_exactly_one_bearer(fake: FakeMoesif, client: httpx.Client, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    if authorization is None:
        del client.headers["Authorization"]
    post = client.post(TXN_PATH, json=_txn(), headers=headers)
    get = client.get("/v1/search/~/subscriptions/sub_1", headers=headers)
    for resp in (post, get):
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/json"
        assert "message" in resp.json()
    assert fake.transactions == []
    assert fake.balance("sub_1") == 10.0


@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in _txn().items() if k != "transaction_id"},
        {k: v for k, v in _txn().items() if k != "company_id"},
        _txn(amount=0),
        _txn(amount=-5.0),
        _txn(amount="25.00"),
        _txn(amount=True),
        _txn(type="refund"),
        _txn(transaction_id=""),
        _txn(active_at="not a date"),
        {**_txn(), "company_id": "cus_other"},
        ["not", "an", "object"],
    ],
)
def test_invalid_transactions_are_400(fake: FakeMoesif, client: httpx.Client, body: Any):
    resp = client.post(TXN_PATH, json=body)
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    assert isinstance(resp.json()["message"], str)
    assert fake.transactions == []


def test_unknown_subscription_and_route_are_404(client: httpx.Client):
    resp = client.post(TXN_PATH, json={**_txn(), "subscription_id": "sub_missing"})
    assert resp.status_code == 404
    assert "sub_missing" in resp.json()["message"]
    assert client.get("/v1/search/~/subscriptions/sub_missing").status_code == 404
    assert client.get("/v1/~/billing/reports/nothing").status_code == 404
    assert client.post(TXN_PATH, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400


def test_future_active_at_delays_the_credit(fake: FakeMoesif, client: httpx.Client, clock: Clock):
    assert client.post(TXN_PATH, json=_txn(active_at="2026-01-01T01:00:00Z")).status_code == 204
    assert fake.balance("sub_1") == 10.0
    clock.now = NOW + 3600
    assert fake.balance("sub_1") == 35.0


def test_fault_after_apply_loses_the_response_but_applies(fake: FakeMoesif, client: httpx.Client):
    fake.inject_fault("POST", TXN_PATH, 503, after_apply=True)
    resp = client.post(TXN_PATH, json=_txn())
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"
    assert fake.balance("sub_1") == 35.0

    fake.inject_fault("POST", TXN_PATH, 429, headers={"Retry-After": "2"})
    resp = client.post(TXN_PATH, json=_txn("t2"))
    assert (resp.status_code, resp.headers["retry-after"]) == (429, "2")
    assert fake.balance("sub_1") == 35.0
    assert client.post(TXN_PATH, json=_txn("t2")).status_code == 204
    assert fake.balance("sub_1") == 60.0


def test_reset_forgets_everything(fake: FakeMoesif, client: httpx.Client):
    client.post(TXN_PATH, json=_txn())
    fake.inject_fault("*", "/v1", 500)
    fake.reset()
    assert (fake.transactions, fake.requests) == ([], [])
    assert client.get("/v1/search/~/subscriptions/sub_1").status_code == 404  # no fault left, no subscription
