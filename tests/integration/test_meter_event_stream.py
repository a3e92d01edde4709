"""`stripe.meter_events: v2_stream`: the usage sync reports meter events through Stripe's v2 meter event stream, in
batches of up to 100, over real HTTP against the sandbox (the stream on a host of its own), on SQLite and PostgreSQL.

Stripe's documentation followed (and cited by the sandbox's contract tests, tests/sandbox/test_fidelity.py):
https://docs.stripe.com/api/v2/billing/meter-event-stream/create (≤ 100 events a request, identifiers unique within
24 hours, asynchronous validation, 401 billing_meter_event_session_expired),
https://docs.stripe.com/api/v2/billing/meter-event-stream/session/create (tokens valid 15 minutes),
https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api (high-throughput ingestion) and
https://docs.stripe.com/rate-limits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta

import pytest
from freezegun import freeze_time

from reconciler.attention import items_needing_attention
from reconciler.clock import utc_now
from reconciler_sandbox.httpserver import DROP_CONNECTION, LoopbackServer
from tests.conftest import Harness
from tests.integration.test_readback import SUMMARY_LAG, report_rejections, summary_reads
from tests.integration.test_usage_sync import (
    MID,
    PERIOD_END,
    PERIOD_START,
    ProcessKilled,
    posts,
    seed,
    stripe_total,
    use,
)

STREAM = "/v2/billing/meter_event_stream"
SESSION = "/v2/billing/meter_event_session"


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    """The harness with `stripe.meter_events: v2_stream`, the stream's host served on a port of its own."""
    with LoopbackServer(harness.stripe.meter_events_host()) as meter_events:
        harness.configure(stripe={"meter_events": "v2_stream", "meter_events_base": meter_events.url})
        yield harness


def batches(h: Harness) -> list[list[dict]]:
    """The events of every stream request that reached the fake (answered or not), in order."""
    return [r.params["events"] for r in h.stripe.requests if r.method == "POST" and r.path == STREAM]


def sessions(h: Harness) -> int:
    return sum(1 for r in h.stripe.requests if r.method == "POST" and r.path == SESSION)


def writes(h: Harness) -> int:
    return sum(1 for r in h.stripe.requests if r.method == "POST")


def seed_customers(h: Harness, n: int, *, formula: str = "sum") -> list[str]:
    customers = [f"cus_{i:04d}" for i in range(n)]
    for number, customer in enumerate(customers):
        seed(h, customer=customer, formula=formula)
        use(h, PERIOD_START + timedelta(days=1), number + 1, customer=customer)
    return customers


def test_a_cycle_of_n_reports_sends_ceil_n_over_100_batches_and_bills_every_total(h):
    customers = seed_customers(h, 230)
    with freeze_time(MID) as clock:
        first = h.cycle()
        assert (first.summary.reported, first.summary.failed) == (230, 0)
        assert [len(batch) for batch in batches(h)] == [100, 100, 30]  # full batches, the rest at the end
        assert writes(h) <= math.ceil(230 / 100) + 1  # the stream's requests and one session
        assert posts(h) == []  # nothing went to POST /v1/billing/meter_events
        assert all(stripe_total(h, customer) == number + 1 for number, customer in enumerate(customers))
        assert h.rows("select count(*) from usage_reports where state = 'sent'") == [(230,)]
        events = [event for batch in batches(h) for event in batch]
        assert len({event["identifier"] for event in events}) == 230
        [first_event] = [e for e in events if e["payload"]["stripe_customer_id"] == "cus_0000"]
        assert first_event["payload"] == {"stripe_customer_id": "cus_0000", "value": "1"}
        assert first_event["event_name"] == "api_calls" and first_event["timestamp"].endswith("Z")  # RFC 3339

        clock.tick(timedelta(minutes=15))
        for customer in customers[:3]:
            use(h, PERIOD_START + timedelta(days=2), 5, customer=customer)
        second = h.cycle()
        assert (second.summary.reported, second.summary.unchanged) == (3, 227)
        assert [len(batch) for batch in batches(h)][3:] == [3]
        assert sessions(h) == 2  # 15 minutes on, the first session had expired: a new one
    assert stripe_total(h, customers[0]) == 6 and stripe_total(h, customers[3]) == 4


def test_a_lost_answer_is_resent_with_the_same_identifiers_and_billed_once(h):
    seed_customers(h, 3)
    h.stripe.inject_fault("POST", STREAM, 500, after_apply=True)  # applied, then the answer is lost
    with freeze_time(MID):
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (3, 0)
    first, resent = batches(h)
    assert [e["identifier"] for e in resent] == [e["identifier"] for e in first]
    assert [stripe_total(h, f"cus_{i:04d}") for i in range(3)] == [1, 2, 3]  # once each


def test_a_batch_that_fails_through_every_retry_stays_pending_and_the_next_cycle_bills_it_once(h):
    seed_customers(h, 2)
    # Applied, then no answer to any of the 1 + stripe.max_network_retries (2) tries.
    h.stripe.inject_fault("POST", STREAM, DROP_CONNECTION, after_apply=True, times=3)
    with freeze_time(MID) as clock:
        failed = h.cycle()
        assert (failed.summary.reported, failed.summary.failed) == (0, 2)
        assert h.rows("select state, attempts from usage_reports order by id") == [("pending", 1), ("pending", 1)]
        assert len(batches(h)) == 3
        clock.tick(timedelta(minutes=15))
        recovered = h.cycle()  # each pending intent resent first, with its identifier
        assert recovered.summary.failed == 0
    sent = [[e["identifier"] for e in batch] for batch in batches(h)]
    assert sorted(sent[3] + sent[4]) == sorted(sent[0])  # resent alone (recovery decides on its outcome)
    assert h.rows("select state from usage_reports order by id") == [("sent",), ("sent",)]
    assert [stripe_total(h, "cus_0000"), stripe_total(h, "cus_0001")] == [1, 2]  # billed once


def test_the_session_is_renewed_before_its_15_minutes_run_out(h):
    (customer,) = seed_customers(h, 1)
    with freeze_time(MID) as clock:
        h.cycle()
        assert sessions(h) == 1
        clock.tick(timedelta(minutes=13, seconds=30))  # 90 s left: still used
        use(h, PERIOD_START + timedelta(days=2), 2, customer=customer)
        h.cycle()
        assert sessions(h) == 1
        clock.tick(timedelta(seconds=45))  # 45 s left: renewed before the batch leaves
        use(h, PERIOD_START + timedelta(days=3), 4, customer=customer)
        h.cycle()
        assert sessions(h) == 2
    statuses = [r for r in h.stripe.requests if r.path == STREAM]
    assert len(statuses) == 3  # no try was refused for an expired token
    assert stripe_total(h, customer) == 7


def test_a_token_stripe_expired_early_is_replaced_and_the_batch_resent(h):
    (customer,) = seed_customers(h, 1)
    with freeze_time(MID) as clock:
        h.cycle()
        h.stripe.expire_meter_event_sessions()  # the docs promise 15 minutes; a revoked token must not stop billing
        clock.tick(timedelta(minutes=1))
        use(h, PERIOD_START + timedelta(days=2), 2, customer=customer)
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (1, 0)
    assert sessions(h) == 2 and len(batches(h)) == 3  # refused once (401), resent under the new token
    assert stripe_total(h, customer) == 3


def test_a_rejected_event_gets_no_synchronous_error_and_is_found_by_the_error_report_and_the_read_back(h):
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    h.stripe.summary_lag_seconds = 120
    h.stripe.reject_asynchronously(1)  # the final event: accepted (200), then rejected
    with freeze_time(PERIOD_END + timedelta(minutes=31)) as clock:
        result = h.cycle()
        assert (result.summary.reported, result.summary.failed) == (1, 0)  # no synchronous error
        [sent] = [e["identifier"] for batch in batches(h) for e in batch]
        assert report_rejections(h) == [sent]  # the thin error event names our identifier
        clock.tick(SUMMARY_LAG)
        found = h.read_back.run_cycle()
        assert [(line.finding, line.stripe, line.reported) for line in found.lines] == [("resending", "0", 7)]
        resend = h.cycle(customers=found.resent_customers, include_legacy=False)
        assert resend.summary.reported == 1 and summary_reads(h) == 1
        [_, [again]] = batches(h)
        assert again["identifier"] != sent and again["payload"]["value"] == "7"  # a new intent, through the stream
        assert utc_now() < PERIOD_END + h.config.stripe.invoice_grace_period
    assert stripe_total(h) == 7
    assert items_needing_attention(h.engine) == []


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["killed-before-send", "killed-after-send"])
def test_a_crash_with_a_batch_unmarked_resends_its_identifiers_and_a_duplicate_is_no_error(h, stripe_applied_it):
    """Killed before the batch's outcome was recorded: its intents stay pending and the next process resends them
    with their identifiers. Stripe may already hold them: the stream answers 200 all the same (no synchronous
    duplicate error, unlike v1's 400) and counts each once."""
    seed_customers(h, 2)
    real_send = h.stripe_gateway.send_meter_event_batch

    def dying_send(intents):
        if stripe_applied_it:
            real_send(intents)
        raise ProcessKilled

    with freeze_time(MID) as clock:
        h.stripe_gateway.send_meter_event_batch = dying_send  # type: ignore[method-assign]
        with pytest.raises(ProcessKilled):
            h.cycle()
        assert h.rows("select state from usage_reports") == [("pending",), ("pending",)]
        h.configure(stripe={"meter_events": "v2_stream", "meter_events_base": h.config.stripe.meter_events_base})
        clock.tick(timedelta(minutes=15))
        result = h.cycle()
        assert (result.summary.failed, result.summary.reported) == (0, 0), result.summary.failures
    assert h.rows("select state from usage_reports order by id") == [("sent",), ("sent",)]
    assert [stripe_total(h, "cus_0000"), stripe_total(h, "cus_0001")] == [1, 2]
    assert len(h.stripe.meter_events) == 2


def test_legacy_usage_records_keep_their_v1_path(h):
    seed(h, event_name="price_legacy", legacy=True)
    seed(h, customer="cus_B")
    use(h, PERIOD_START + timedelta(days=2), 4)
    use(h, PERIOD_START + timedelta(days=2), 6, customer="cus_B")
    with freeze_time(MID):
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (2, 0)
    legacy = [r for r in h.stripe.requests if r.method == "POST" and r.path.endswith("/usage_records")]
    assert [r.params["quantity"] for r in legacy] == ["4"]
    assert [[e["payload"]["stripe_customer_id"] for e in batch] for batch in batches(h)] == [["cus_B"]]
    assert stripe_total(h, "cus_B") == 6
