"""What needs a person: one query over the ledger for `status`, `report` and the /metrics gauges."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from reconciler.attention import AttentionCollector, attention_summary, items_needing_attention
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.schema import (
    BalanceObservation,
    LateDrift,
    MoesifTransaction,
    UsagePeriod,
    WebhookEvent,
)
from tests.conftest import utc

T0 = utc(2026, 3, 1)
NOW = T0 + timedelta(days=10)


def at(hours: int):
    return T0 + timedelta(hours=hours)


def moesif(transaction_id: str, hours: int, state: str = "sent", **fields) -> MoesifTransaction:
    return MoesifTransaction(
        transaction_id=transaction_id,
        kind="topup",
        source_id=transaction_id,
        customer_id=f"cus_{transaction_id}",
        subscription_id="sub",
        currency="usd",
        amount_minor=100,
        type="credit",
        state=state,
        run_id="r",
        created_at=at(hours),
        **fields,
    )


def observation(customer: str, hours: int, action: str) -> BalanceObservation:
    return BalanceObservation(
        run_id="r",
        observed_at=at(hours),
        customer_id=customer,
        subscription_id="sub",
        currency="usd",
        stripe_credit_minor=500,
        open_usage_minor=0,
        expected_minor=500,
        moesif_minor=0,
        difference_minor=500,
        action=action,
        reason=f"{action} reason",
    )


def period(customer: str, hours: int, **fields) -> UsagePeriod:
    return UsagePeriod(
        stream_key=f"stream-{customer}",
        period_start=T0,
        period_end=T0 + timedelta(days=30),
        kind="meter_sum",
        customer_id=customer,
        subscription_id="sub",
        subscription_item_id="si",
        stripe_target="api_calls",
        openmeter_meter="api_requests",
        subject=customer,
        status="final",
        target=10,
        reported_total=10,
        created_at=at(0),
        updated_at=at(hours),
        **fields,
    )


def webhook(event_id: str, hours: int, state: str) -> WebhookEvent:
    return WebhookEvent(
        event_id=event_id,
        type="payment_intent.succeeded",
        customer_id="cus_hook",
        work="balances",
        state=state,
        attempts=8,
        next_attempt_at=at(hours),
        error="Moesif unreachable" if state == "failed" else None,
        payload="{}",
        received_at=at(hours),
    )


@pytest.fixture
def ledger(database_url: str) -> Iterator[Engine]:
    """A ledger with one item of each kind, and some that need no one."""
    engine = make_engine(database_url)
    upgrade(engine)
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                moesif("pi_unknown", 1, outcome_unknown=True),
                moesif("pi_held", 2, state="held", error="paid in EUR"),
                moesif("pi_invoice", 3, attention="paid invoice in_1: an invoice payment, not a top-up"),
                moesif("pi_fine", 4),
                # drift: left uncorrected since hour 5; settled again; an unsettled correction
                observation("cus_drift", 4, "in_sync"),
                observation("cus_drift", 5, "over_limit"),
                observation("cus_drift", 6, "report"),
                observation("cus_settled", 5, "report"),
                observation("cus_settled", 6, "in_sync"),
                observation("cus_unsettled", 7, "correct"),
                observation("cus_unsettled", 8, "unsettled"),
                period("cus_fine", 1),
                period("cus_failing", 9, last_error="OpenMeter unreachable"),
                period("cus_rejected", 10, last_error="rejected by Stripe: meter_event_customer_not_found: gone"),
                webhook("evt_given_up", 11, "failed"),
                webhook("evt_done", 1, "done"),
            ]
        )
        late = period("cus_late", 1, late_total=14)
        session.add(late)
        session.flush()
        for hours in (12, 13):
            session.add(
                LateDrift(
                    period_id=late.id,
                    observed_at=at(hours),
                    reported_total=10,
                    observed_total=14,
                    reason="r",
                    run_id="r",
                )
            )
    yield engine
    engine.dispose()


def test_one_item_of_each_kind_with_when_it_started(ledger):
    engine = ledger
    found = {(i.job, i.reason, i.customer, i.key, i.since) for i in items_needing_attention(engine)}
    assert found == {
        ("balance_reconcile", "outcome_unknown", "cus_pi_unknown", "pi_unknown", at(1)),
        ("balance_reconcile", "held", "cus_pi_held", "pi_held", at(2)),
        ("balance_reconcile", "invoice_payment", "cus_pi_invoice", "pi_invoice", at(3)),
        ("balance_reconcile", "uncorrected_drift", "cus_drift", "balance usd", at(5)),
        ("balance_reconcile", "uncorrected_drift", "cus_unsettled", "balance usd", at(8)),
        ("usage_sync", "failed", "cus_failing", "api_calls period 2026-03-01", at(9)),
        ("usage_sync", "rejected_by_stripe", "cus_rejected", "api_calls period 2026-03-01", at(10)),
        ("usage_sync", "late_drift", "cus_late", "api_calls period 2026-03-01", at(12)),
        ("webhooks", "given_up", "cus_hook", "evt_given_up", at(11)),
    }
    lines = [i.line() for i in items_needing_attention(engine)]
    assert "not forwarded to Moesif, held for a person: cus_pi_held pi_held: paid in EUR" in lines
    assert "failing: cus_failing api_calls period 2026-03-01: OpenMeter unreachable" in lines
    assert any(
        line.startswith("balance drift left uncorrected: cus_drift balance usd: report: +5.00 USD") for line in lines
    )


def test_the_gauges_count_per_job_and_reason_and_age_the_oldest(ledger):
    engine = ledger
    summary = {(c.job, c.reason): (c.count, c.oldest) for c in attention_summary(engine)}
    assert summary[("balance_reconcile", "uncorrected_drift")] == (2, at(5))
    assert summary[("usage_sync", "late_drift")] == (1, at(12))
    registry = CollectorRegistry()
    registry.register(AttentionCollector(engine, lambda: NOW, lambda: ["usage_sync", "balance_reconcile", "plan_sync"]))
    text = generate_latest(registry).decode()
    assert 'reconciler_items_needing_attention{job="balance_reconcile",reason="held"} 1.0' in text
    assert 'reconciler_items_needing_attention{job="balance_reconcile",reason="uncorrected_drift"} 2.0' in text
    assert 'reconciler_items_needing_attention{job="webhooks",reason="given_up"} 1.0' in text
    age = (NOW - at(1)).total_seconds()
    assert f'reconciler_oldest_item_needing_attention_seconds{{job="balance_reconcile"}} {age}' in text
    assert 'reconciler_oldest_item_needing_attention_seconds{job="plan_sync"} 0.0' in text


def test_resolved_items_disappear(ledger):
    engine = ledger
    with Session(engine) as session, session.begin():  # what `balances resolve` and later cycles change
        t = MoesifTransaction
        session.execute(update(t).values(outcome_unknown=False, attention=None, state="sent"))
        session.execute(update(UsagePeriod).values(last_error=None))
        session.execute(update(WebhookEvent).values(state="done"))
        session.add_all([observation("cus_drift", 20, "correct"), observation("cus_unsettled", 20, "in_sync")])
    assert [(i.reason, i.customer) for i in items_needing_attention(engine)] == [("late_drift", "cus_late")]
    registry = CollectorRegistry()
    registry.register(AttentionCollector(engine, lambda: NOW, lambda: ["balance_reconcile"]))
    text = generate_latest(registry).decode()
    assert 'reconciler_oldest_item_needing_attention_seconds{job="balance_reconcile"} 0.0' in text
    assert 'job="balance_reconcile",reason=' not in text
