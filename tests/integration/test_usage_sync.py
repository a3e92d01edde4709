"""The usage sync end to end: real SDKs over real HTTP against the sandbox fakes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import socket
from datetime import timedelta
from decimal import Decimal

import pytest
import stripe
import structlog
from freezegun import freeze_time
from sqlalchemy import text

from reconciler.config import parse_config
from reconciler.logs import configure_logging
from reconciler.upstream.errors import OutcomeUnknownError, UpstreamError
from reconciler.upstream.stripe_api import StripeGateway
from tests.conftest import STRIPE_KEY, Harness, ts, utc

PERIOD_START = utc(2026, 3, 1, 13, 45)
PERIOD_END = utc(2026, 4, 1, 13, 45)
MID = utc(2026, 3, 10, 12, 30)


def seed(
    h: Harness,
    *,
    customer: str = "cus_A",
    event_name: str = "api_calls",
    formula: str = "sum",
    om_meter: str = "api_requests",
    legacy: bool = False,
    status: str = "active",
    event_time_window: str | None = None,
    start=PERIOD_START,
    end=PERIOD_END,
) -> dict:
    """A customer with one metered subscription item; returns the item."""
    if customer not in h.stripe.customers:
        h.stripe.add_customer(id=customer)
    if legacy:
        price = h.stripe.add_price(id=event_name)
    else:
        meter = next((m for m in h.stripe.meters.values() if m["event_name"] == event_name), None)
        meter = meter or h.stripe.add_meter(
            event_name, formula=formula, status=status, event_time_window=event_time_window
        )
        price = h.stripe.add_price(meter=meter["id"])
    if om_meter not in h.openmeter.meters:
        h.openmeter.add_meter(om_meter)
    subscription = h.stripe.add_subscription(
        customer, [price["id"]], current_period_start=ts(start), current_period_end=ts(end)
    )
    return subscription["items"]["data"][0]


def use(h: Harness, at, value, *, customer: str = "cus_A", meter: str = "api_requests") -> None:
    h.openmeter.ingest(meter, customer, at, value)


def stripe_total(
    h: Harness, customer: str = "cus_A", event_name: str = "api_calls", start=PERIOD_START, end=PERIOD_END
) -> Decimal:
    return h.stripe.meter_total(customer, event_name, ts(start), ts(end))


def posts(h: Harness, prefix: str = "/v1/billing/meter_events") -> list:
    return [r for r in h.stripe.requests if r.method == "POST" and r.path.startswith(prefix)]


def test_last_meter_sends_the_total_then_nothing_then_the_new_total(harness):
    h = harness
    seed(h, formula="last")
    use(h, utc(2026, 3, 2), 7)
    use(h, utc(2026, 3, 5), 3.2)
    with freeze_time(MID) as clock:
        first = h.cycle()
        assert (first.summary.reported, first.summary.failed) == (1, 0)
        assert [p.params["payload"]["value"] for p in posts(h)] == ["11"]  # 10.2 rounded up
        assert stripe_total(h) == 11

        clock.tick(timedelta(minutes=15))
        second = h.cycle()
        assert (second.summary.reported, second.summary.unchanged) == (0, 1)
        assert len(posts(h)) == 1  # no Stripe call at all for an unchanged total

        use(h, utc(2026, 3, 10, 11), 5)
        clock.tick(timedelta(minutes=15))
        h.cycle()
        assert [p.params["payload"]["value"] for p in posts(h)] == ["11", "16"]
        assert stripe_total(h) == 16
        timestamps = [int(p.params["timestamp"]) for p in posts(h)]
        assert timestamps == sorted(timestamps) and len(set(timestamps)) == 2


def test_sum_meter_matches_openmeter_through_increase_decrease_and_repeated_totals(harness):
    h = harness
    seed(h, formula="sum")
    deltas = [10, 2, -2, 2, 0, -12, 5]  # totals 10, 12, 10, 12, 12, 0, 5
    with freeze_time(MID) as clock:
        for i, delta in enumerate(deltas):
            if delta:
                use(h, utc(2026, 3, 2, i), delta)
            result = h.cycle()
            assert result.summary.failed == 0, result.summary.failures
            assert stripe_total(h) == sum(deltas[: i + 1])
            clock.tick(timedelta(minutes=15))
    identifiers = [p.params["identifier"] for p in posts(h)]
    assert len(identifiers) == 6  # one per change; the unchanged cycle sent nothing
    assert len(set(identifiers)) == len(identifiers)  # 10 -> 12 -> 10 -> 12 never reuses an identifier
    values = [int(p.params["payload"]["value"]) for p in posts(h)]
    assert values == [10, 2, -2, 2, -12, 5]


def test_legacy_price_uses_usage_records_with_action_set_and_the_pinned_version(harness):
    h = harness
    item = seed(h, legacy=True, event_name="price_legacy")
    use(h, utc(2026, 3, 2), 4)
    with freeze_time(MID) as clock:
        h.cycle()
        use(h, utc(2026, 3, 3), 3)
        clock.tick(timedelta(minutes=15))
        h.cycle()
        clock.tick(timedelta(minutes=15))
        h.cycle()  # unchanged: no call
    records = posts(h, f"/v1/subscription_items/{item['id']}/usage_records")
    assert [r.params["quantity"] for r in records] == ["4", "7"]
    assert {r.params["action"] for r in records} == {"set"}
    assert {r.params["timestamp"] for r in records} == {str(ts(PERIOD_START) + 1)}
    assert {r.headers["stripe-version"] for r in records} == {"2025-02-24.acacia"}
    assert all(r.headers.get("idempotency-key") for r in records)
    assert h.stripe.usage_record_total(item["id"]) == 7  # set, not increment
    # Everything else uses the pinned current version.
    others = [r for r in h.stripe.requests if "usage_records" not in r.path]
    assert {r.headers["stripe-version"] for r in others} == {"2026-10-28.endive"}


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["never-arrived", "arrived-answer-lost"])
def test_a_pending_legacy_record_of_a_rolled_over_period_is_settled_from_stripes_summary(harness, stripe_applied_it):
    """Found by the fault simulation: after the rollover Stripe refuses records for the old period, so resending
    fails for sure; its usage record summary says whether the lost attempt landed."""
    h = harness
    item = seed(h, legacy=True, event_name="price_legacy")
    use(h, utc(2026, 3, 2), 4)
    h.stripe.inject_fault(
        "POST", f"/v1/subscription_items/{item['id']}/usage_records", 500, times=3, after_apply=stripe_applied_it
    )
    with freeze_time(PERIOD_END - timedelta(minutes=30)) as clock:
        assert h.cycle().summary.failed == 1  # outcome unknown: pending
        clock.move_to(PERIOD_END + timedelta(minutes=5))
        h.stripe.set_item_period(item["id"], ts(PERIOD_END), ts(utc(2026, 5, 1, 13, 45)))
        result = h.cycle()
    assert result.summary.failed == 0, result.summary.failures
    rows = h.rows("select reported_total, status from usage_periods order by period_start")
    assert (rows[0].reported_total, rows[0].status) == (4 if stripe_applied_it else 0, "final")
    late = h.rows("select reported_total, observed_total from late_drift")
    assert [tuple(r) for r in late] == ([] if stripe_applied_it else [(0, 4)])
    assert len(posts(h, f"/v1/subscription_items/{item['id']}/usage_records")) == 3  # nothing after the rollover


class ProcessKilled(BaseException):
    """Stands in for SIGKILL: nothing after it in the process runs, not even `except Exception`."""


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["killed-before-send", "killed-after-send"])
def test_crash_between_intent_and_stripe_answer_never_double_counts(harness, stripe_applied_it):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    real_send = h.stripe_gateway.send_meter_event

    def dying_send(intent, renew_key):
        if stripe_applied_it:
            real_send(intent, renew_key)
        raise ProcessKilled

    with freeze_time(MID) as clock:
        h.stripe_gateway.send_meter_event = dying_send
        with pytest.raises(ProcessKilled):
            h.cycle()
        assert [r.state for r in h.rows("select state from usage_reports")] == ["pending"]

        h.configure()  # a fresh process: new gateways, same database
        clock.tick(timedelta(minutes=15))
        use(h, utc(2026, 3, 3), 5)
        result = h.cycle()
        assert result.summary.failed == 0, result.summary.failures
    assert stripe_total(h) == 15
    assert len(h.stripe.meter_events) == 2  # the +10 once (resent with its identifier), then +5
    assert [r.state for r in h.rows("select state from usage_reports order by sequence")] == ["sent", "sent"]


def test_lost_response_is_resent_with_the_same_identifier_and_counted_once(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    # Stripe applies the event, but every answer in this cycle is lost (3 attempts = 1 + max_network_retries).
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 500, times=3, after_apply=True)
    with freeze_time(MID) as clock:
        first = h.cycle()
        assert first.summary.failed == 1
        clock.tick(timedelta(minutes=15))
        second = h.cycle()
        assert second.summary.failed == 0
    assert stripe_total(h) == 10
    sent = {p.params["identifier"] for p in posts(h)}
    assert len(sent) == 1  # every attempt, across both cycles, carried the same identifier


def keys_sent(h: Harness, prefix: str = "/v1/billing/meter_events") -> list[str]:
    return [p.headers["idempotency-key"] for p in posts(h, prefix)]


def states_and_key_numbers(h: Harness) -> list[tuple[str, int]]:
    return [tuple(r) for r in h.rows("select state, idempotency_key_number from usage_reports order by sequence")]


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["failed-before-applying", "applied-then-failed"])
def test_a_500_answer_is_resent_under_a_fresh_key_and_counted_once(harness, stripe_applied_it):
    """Stripe saves a 500 to the idempotency key and replays it to every retry with that key
    (https://docs.stripe.com/api/idempotent_requests): a resend under the same key could only fetch that 500 until
    the 23-hour settle path, past the invoice for usage near a period end. A fresh key with the same identifier gets
    through, and the identifier still deduplicates the event."""
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 500, after_apply=stripe_applied_it)
    with freeze_time(MID):
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (1, 0), result.summary.failures
    assert stripe_total(h) == 10 and len(h.stripe.meter_events) == 1
    [identifier] = {p.params["identifier"] for p in posts(h)}
    assert keys_sent(h) == [f"reconciler-{identifier}", f"reconciler-{identifier}-1"]
    assert states_and_key_numbers(h) == [("sent", 1)]


def test_a_5xx_replayed_to_a_resend_after_a_timeout_is_followed_at_once_by_a_fresh_key(harness):
    """Stripe applied the event and saved a 504 to its key, but the answer came after our timeout: the next cycle's
    resend (same key: no answer was seen) gets the saved 504 back. Stripe tried nothing then, so the fresh key is
    tried at once, without spending a retry (there are none here)."""
    h = harness
    h.configure(stripe={"max_network_retries": 0, "timeout_seconds": 0.3})
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 504, after_apply=True, delay_seconds=1.0)
    with freeze_time(MID) as clock:
        assert h.cycle().summary.failed == 1
        assert states_and_key_numbers(h) == [("pending", 0)]  # no answer: the key is kept
        clock.tick(timedelta(minutes=15))
        result = h.cycle()
    assert result.summary.failed == 0, result.summary.failures
    first = keys_sent(h)[0]
    assert keys_sent(h) == [first, first, f"{first}-1"]
    assert stripe_total(h) == 10 and len(h.stripe.meter_events) == 1
    assert states_and_key_numbers(h) == [("sent", 1)]


def test_a_fresh_key_is_committed_before_the_resend_that_uses_it(harness):
    """Every attempt of a cycle is answered 500 (legacy usage records: `set` is idempotent by value, so a fresh key
    is safe even though Stripe applied them): the ledger already holds the key the next resend goes under."""
    h = harness
    item = seed(h, legacy=True, event_name="price_legacy")
    records = f"/v1/subscription_items/{item['id']}/usage_records"
    use(h, utc(2026, 3, 2), 4)
    h.stripe.inject_fault("POST", records, 500, times=3, after_apply=True)  # 3 attempts = 1 + max_network_retries
    with freeze_time(MID) as clock:
        assert h.cycle().summary.failed == 1
        assert states_and_key_numbers(h) == [("pending", 3)]
        h.configure()  # a fresh process: the key comes from the ledger
        clock.tick(timedelta(minutes=15))
        assert h.cycle().summary.failed == 0
    keys = keys_sent(h, records)
    assert keys[1:] == [f"{keys[0]}-{n}" for n in (1, 2, 3)] and len(set(keys)) == 4
    assert h.stripe.usage_record_total(item["id"]) == 4
    assert [r.state for r in h.rows("select state from usage_reports")] == ["sent"]


def test_a_success_whose_body_cannot_be_read_is_an_unknown_outcome_not_a_refusal(harness):
    """Found by the fault simulation: a 200 with a truncated body was taken as "refused, not applied", so the next
    cycle sent the difference again under a new identifier and Stripe counted it twice."""
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    h.stripe.inject_fault(
        "POST", "/v1/billing/meter_events", 200, body=b'{"object": "billing.meter_ev', times=3, after_apply=True
    )
    with freeze_time(MID) as clock:
        assert h.cycle().summary.failed == 1
        clock.tick(timedelta(minutes=15))
        assert h.cycle().summary.failed == 0
    assert stripe_total(h) == 10
    assert len({p.params["identifier"] for p in posts(h)}) == 1


def test_rate_limit_and_server_errors_are_retried_within_the_cycle(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 3)
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 429, headers={"Retry-After": "0"})
    meter_id = h.openmeter.meters["api_requests"]["id"]
    unavailable = h.openmeter.inject_fault("POST", f"/api/v1/meters/{meter_id}/query", 503)
    with freeze_time(MID):
        result = h.cycle()
    assert unavailable.hits == 1
    assert (result.summary.reported, result.summary.failed) == (1, 0)
    assert stripe_total(h) == 3


def test_bad_meters_are_reported_clearly_while_other_customers_sync(harness):
    h = harness
    seed(h, customer="cus_good", formula="sum")
    seed(h, customer="cus_count", event_name="logins", formula="count", om_meter="logins")
    seed(h, customer="cus_off", event_name="seats", status="inactive", om_meter="seats")
    seed(h, customer="cus_hourly", event_name="storage", event_time_window="hour", om_meter="storage")
    seed(h, customer="cus_unmapped", event_name="not_in_config", om_meter="other")
    h.configure(
        usage={
            "meters": [
                {"stripe": "api_calls", "openmeter": "api_requests"},
                {"stripe": "logins", "openmeter": "logins"},
                {"stripe": "seats", "openmeter": "seats"},
                {"stripe": "storage", "openmeter": "storage"},
            ]
        }
    )
    use(h, utc(2026, 3, 2), 4, customer="cus_good")
    with freeze_time(MID):
        result = h.cycle()
    summary = result.summary
    assert (summary.reported, summary.failed, summary.unmapped) == (1, 3, 1)
    assert stripe_total(h, customer="cus_good") == 4
    failures = "\n".join(summary.failures)
    assert "cus_count" in failures and "'logins'" in failures and "count" in failures
    assert "cus_off" in failures and "inactive" in failures
    assert "cus_hourly" in failures and "pre-aggregated" in failures


def test_unknown_openmeter_meter_fails_that_customer_only(harness):
    h = harness
    seed(h, customer="cus_good", formula="sum")
    seed(h, customer="cus_bad", event_name="tokens", om_meter="tokens")
    del h.openmeter.meters["tokens"]
    use(h, utc(2026, 3, 2), 2, customer="cus_good")
    with freeze_time(MID):
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (1, 1)
    assert "tokens" in result.summary.failures[0] and "not found" in result.summary.failures[0]
    assert h.rows("select last_error from usage_periods where customer_id = 'cus_bad'") == []  # nothing written
    assert stripe_total(h, customer="cus_good") == 2


def test_openmeter_meters_are_listed_once_and_a_meter_made_again_under_its_slug_is_never_summed_wrongly(harness):
    """The meters' ids and aggregations are kept between cycles, and queries name a meter by id: a meter deleted
    and made again as MAX under the same slug is not summed window by window with the old SUM's plan."""
    h = harness
    seed(h, formula="last")
    use(h, utc(2026, 3, 2), 4)
    use(h, utc(2026, 3, 5), 9)

    def listings() -> int:
        count = sum(1 for r in h.openmeter.requests if r.path == "/api/v1/meters")
        h.openmeter.requests.clear()
        return count

    with freeze_time(MID) as clock:
        assert h.cycle().summary.reported == 1
        assert (stripe_total(h), listings()) == (13, 1)  # SUM: 4 + 9
        clock.tick(timedelta(hours=1))
        h.configure()  # a new process: the listing is kept in the ledger
        assert h.cycle().summary.unchanged == 1
        assert listings() == 0

        h.openmeter.add_meter("api_requests", aggregation="MAX")  # deleted and made again: a new id
        clock.tick(timedelta(hours=1))
        refused = h.cycle()
        assert refused.summary.failed == 1 and "not found" in refused.summary.failures[0]
        assert stripe_total(h) == 13  # nothing sent on the old plan
        clock.tick(timedelta(hours=1))
        relisted = h.cycle()
    assert relisted.summary.reported == 1 and listings() == 1
    assert stripe_total(h) == 9  # MAX over the period, a `last` meter now holding 9


def test_a_dry_run_lists_meters_but_keeps_nothing_and_each_cycle_reads_the_cache_afresh(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 4)

    def listings() -> int:
        count = sum(1 for r in h.openmeter.requests if r.path == "/api/v1/meters")
        h.openmeter.requests.clear()
        return count

    kept = "select slug from openmeter_meters"
    with freeze_time(MID):
        assert h.cycle(dry_run=True).plan and listings() == 1
        assert h.rows(kept) == []
        h.cycle(dry_run=True)
        assert listings() == 1  # nothing was kept, so the next dry run lists again
        h.cycle()
        assert [tuple(row) for row in h.rows(kept)] == [("api_requests",)] and listings() == 1
        h.cycle()
        assert listings() == 0


def test_empty_window_sends_nothing_and_never_queries_equal_bounds(harness):
    h = harness
    seed(h, formula="sum")
    with freeze_time(PERIOD_START + timedelta(minutes=10)):  # 13:55, window [13:00, 13:00)
        result = h.cycle()
    assert result.summary.failed == 0
    assert [r for r in h.openmeter.requests if r.path.endswith("/query")] == []
    assert posts(h) == []


def test_provisional_then_final_after_grace_then_late_drift(harness):
    h = harness
    item = seed(h, formula="sum")
    use(h, utc(2026, 3, 5), 10)
    with freeze_time(MID) as clock:
        h.cycle()
        assert stripe_total(h) == 10

        # The period ends; Stripe rolls the item over to the next period.
        next_end = utc(2026, 5, 1, 13, 45)
        clock.move_to(PERIOD_END + timedelta(minutes=10))
        h.stripe.set_item_period(item["id"], ts(PERIOD_END), ts(next_end))
        use(h, utc(2026, 4, 1, 12, 30), 2)  # inside the last full window of the old period
        result = h.cycle()
        assert result.summary.finalized == 0
        statuses = [row[0] for row in h.rows("select status from usage_periods order by period_start")]
        assert statuses == ["provisional", "provisional"]  # the ended period and the new one
        assert stripe_total(h) == 12

        clock.move_to(PERIOD_END + timedelta(minutes=31))
        use(h, utc(2026, 4, 1, 12, 40), 1)
        result = h.cycle()
        assert result.summary.finalized == 1
        assert stripe_total(h) == 13
        final_event = posts(h)[-1]
        assert int(final_event.params["timestamp"]) == ts(PERIOD_END) - 1

        clock.move_to(PERIOD_END + timedelta(hours=3))
        use(h, utc(2026, 4, 1, 12, 50), 4)  # arrives after the period is final
        result = h.cycle()
        assert result.summary.late_drift == 1
        clock.tick(timedelta(minutes=15))
        assert h.cycle().summary.late_drift == 0  # recorded once per new value
    assert stripe_total(h) == 13  # never sent into the closed period
    drift = h.rows("select reported_total, observed_total from late_drift")
    assert [tuple(row) for row in drift] == [(13, 17)]


def test_two_items_on_one_meter_refuse_that_customer(harness):
    h = harness
    seed(h, customer="cus_twice")
    seed(h, customer="cus_twice")
    seed(h, customer="cus_once")
    use(h, utc(2026, 3, 2), 1, customer="cus_once")
    with freeze_time(MID):
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (1, 2)
    assert all("cus_twice" in f for f in result.summary.failures)


def test_dry_run_writes_nothing_anywhere(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    with freeze_time(MID):
        result = h.cycle(dry_run=True)
    assert [(p.decision.action.value, p.decision.quantity) for p in result.plan] == [("report", 10)]
    assert posts(h) == []
    assert h.stripe.meter_events == []
    for table in ("usage_periods", "usage_reports", "runs", "late_drift"):
        assert h.rows(f"select count(*) from {table}")[0][0] == 0


def test_customer_filter_syncs_only_that_customer(harness):
    h = harness
    seed(h, customer="cus_A")
    seed(h, customer="cus_B")
    use(h, utc(2026, 3, 2), 1, customer="cus_A")
    use(h, utc(2026, 3, 2), 2, customer="cus_B")
    with freeze_time(MID):
        result = h.cycle(customers=frozenset({"cus_B"}))
    assert result.summary.seen == 1
    assert stripe_total(h, customer="cus_B") == 2
    assert stripe_total(h, customer="cus_A") == 0


def answer_lost(real_send, *, applied: bool):
    """A meter event send whose answer never comes back: Stripe applied it, or it never arrived."""

    def unanswered(intent, renew_key):
        if applied:
            real_send(intent, renew_key)
        raise OutcomeUnknownError("stripe", "connection failed")

    return unanswered


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["never-arrived", "arrived-answer-lost"])
def test_an_old_pending_sum_intent_is_settled_from_stripes_summary_of_its_minute(harness, stripe_applied_it):
    """Past Stripe's 24-hour identifier window a resend could bill twice; Stripe's own aggregate for the minute the
    event was dated in tells whether it landed."""
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    unanswered = answer_lost(h.stripe_gateway.send_meter_event, applied=stripe_applied_it)

    with freeze_time(MID) as clock:
        h.stripe_gateway.send_meter_event = unanswered
        h.cycle()
        h.configure()
        clock.tick(timedelta(hours=25))
        result = h.cycle()
    assert result.summary.failed == 0, result.summary.failures
    assert stripe_total(h) == 10
    states = [r.state for r in h.rows("select state from usage_reports order by sequence")]
    assert states == (["sent"] if stripe_applied_it else ["failed", "sent"])


def test_an_old_pending_sum_intent_stripes_summary_cannot_settle_is_left_for_a_person(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)

    def unreachable(intent, renew_key):
        raise OutcomeUnknownError("stripe", "connection failed")

    with freeze_time(MID) as clock:
        h.stripe_gateway.send_meter_event = unreachable
        h.cycle()  # the intent is dated MID
        h.configure()
        clock.tick(timedelta(hours=25))
        # Someone else sent an event for the customer in the same minute: Stripe's summary no longer tells.
        stripe.StripeClient(STRIPE_KEY, base_addresses={"api": h.stripe_url}).v1.billing.meter_events.create(
            params={
                "event_name": "api_calls",
                "payload": {"stripe_customer_id": "cus_A", "value": "3"},
                "timestamp": ts(MID),
            }
        )
        result = h.cycle()
    assert result.summary.failed == 1
    assert "does not settle it" in result.summary.failures[0]
    assert [r.state for r in h.rows("select state from usage_reports")] == ["pending"]


def test_an_unchanged_cycle_writes_nothing_to_the_ledger(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 3)
    with freeze_time(MID) as clock:
        h.cycle()
        before = [tuple(r) for r in h.rows("select id, updated_at, target from usage_periods")]
        clock.tick(timedelta(minutes=15))
        h.cycle()
    assert [tuple(r) for r in h.rows("select id, updated_at, target from usage_periods")] == before


def test_the_cycle_names_the_next_final_sync_deadline(harness):
    h = harness
    seed(h, formula="sum")
    seed(h, customer="cus_L", legacy=True, event_name="price_legacy")
    with freeze_time(MID):
        result = h.cycle()
    # The legacy item's last sync (5 min before its end) comes before the meter's (30 min after its end).
    assert result.next_final_sync == PERIOD_END - timedelta(minutes=5)


def test_a_warm_cycle_counts_plans_and_schedules_its_unchanged_items_as_the_first_did(harness):
    """A warm cycle settles its unchanged items where their batch is measured, without a worker each
    (reconciler.usage.job.UsageSync._settle_quiet): they are still counted, listed in a dry run's plan, and still
    name the next final sync."""
    from reconciler.usage.decide import Action

    h = harness
    seed(h, formula="sum")
    seed(h, customer="cus_L", legacy=True, event_name="price_legacy")
    use(h, utc(2026, 3, 2), 3)
    use(h, utc(2026, 3, 2), 4, customer="cus_L")
    with freeze_time(MID):
        first = h.cycle()
    with freeze_time(MID + timedelta(minutes=15)):
        warm = h.cycle()
        planned = h.cycle(dry_run=True)
    assert (first.summary.reported, warm.summary.seen, warm.summary.unchanged, warm.summary.reported) == (2, 2, 2, 0)
    assert warm.next_final_sync == first.next_final_sync == PERIOD_END - timedelta(minutes=5)
    assert sorted((p.work.stream.customer_id, p.decision.action, p.reported_total) for p in planned.plan) == [
        ("cus_A", Action.UNCHANGED, 3),
        ("cus_L", Action.UNCHANGED, 4),
    ]


def test_an_intent_decided_on_a_stale_read_is_refused(harness):
    """Two replicas syncing one stream at once: the one that read the period before the other's report
    must not send a difference computed from the stale total."""
    from reconciler.usage.decide import Action, Decision
    from reconciler.usage.model import BillingPeriod, ContendedError, Meter, Stream, StreamKind, StreamPeriod

    h = harness
    meter = Meter("mtr_1", "api_calls", "sum", "active", None, "stripe_customer_id", "value")
    stream = Stream(StreamKind.METER_SUM, "cus_A", "sub_1", "si_1", "api_calls", "api_requests", "cus_A", "ceil", meter)
    work = StreamPeriod(stream, BillingPeriod(PERIOD_START, PERIOD_END), is_current=True)
    report = Decision(Action.REPORT, "report difference", 10, quantity=10, timestamp=MID)
    with freeze_time(MID):
        stale = h.ledger.state(work)  # replica A reads ...
        fresh = h.ledger.record_intent(work, report, "run-b", based_on=h.ledger.state(work))  # ... B reports
        with pytest.raises(ContendedError):
            h.ledger.record_intent(work, report, "run-a", based_on=stale)  # A's +10 would count twice
    assert [r.identifier for r in h.rows("select identifier from usage_reports")] == [fresh.identifier]


def test_an_intent_is_refused_while_another_process_has_one_in_flight_or_just_sent_it(harness):
    from reconciler.usage.decide import Action, Decision
    from reconciler.usage.model import BillingPeriod, ContendedError, Meter, Stream, StreamKind, StreamPeriod

    h = harness
    meter = Meter("mtr_1", "api_calls", "sum", "active", None, "stripe_customer_id", "value")
    stream = Stream(StreamKind.METER_SUM, "cus_A", "sub_1", "si_1", "api_calls", "api_requests", "cus_A", "ceil", meter)
    work = StreamPeriod(stream, BillingPeriod(PERIOD_START, PERIOD_END), is_current=True)
    report = Decision(Action.REPORT, "report difference", 5, quantity=5, timestamp=MID)
    with freeze_time(MID):
        a_intent = h.ledger.record_intent(work, report, "run-a", based_on=h.ledger.state(work))
        b_state = h.ledger.state(work)  # B reads while A's +5 is in flight
        with pytest.raises(ContendedError):
            h.ledger.record_intent(work, report, "run-b", based_on=b_state)
        h.ledger.mark_sent(a_intent)  # A's +5 lands; B's read is now stale
        with pytest.raises(ContendedError):
            h.ledger.record_intent(work, report, "run-b", based_on=b_state)
    assert h.rows("select count(*) from usage_reports")[0][0] == 1


def test_a_refused_resend_of_a_maybe_applied_difference_stays_pending(harness):
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    # Stripe applies the +10 but every answer is lost; then resends are refused (say, a rotated key).
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 500, times=3, after_apply=True)
    with freeze_time(MID) as clock:
        h.cycle()
        h.stripe.inject_fault("POST", "/v1/billing/meter_events", 401)  # permanent: not retried
        clock.tick(timedelta(minutes=15))
        refused = h.cycle()
        assert refused.summary.failed == 1 and "earlier attempt's outcome was unknown" in refused.summary.failures[0]
        assert [r.state for r in h.rows("select state from usage_reports")] == ["pending"]  # no new intent
        clock.tick(timedelta(minutes=15))
        assert h.cycle().summary.failed == 0  # the resend goes through once Stripe accepts requests again
    assert stripe_total(h) == 10


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["never-arrived", "arrived-answer-lost"])
def test_a_pending_intent_is_not_resent_after_the_invoice_finalized(harness, stripe_applied_it):
    """Stripe would take the event but never bill it. Whether the lost attempt landed is read from Stripe's summary
    (found by the fault simulation: it used to be assumed lost, so the ledger disagreed with Stripe)."""
    h = harness
    item = seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    unanswered = answer_lost(h.stripe_gateway.send_meter_event, applied=stripe_applied_it)

    with freeze_time(PERIOD_END - timedelta(hours=1)) as clock:
        h.stripe_gateway.send_meter_event = unanswered
        h.cycle()
        h.configure()
        clock.move_to(PERIOD_END + timedelta(hours=2))  # past period end + invoice grace (1 h)
        h.stripe.set_item_period(item["id"], ts(PERIOD_END), ts(PERIOD_END + timedelta(days=30)))
        result = h.cycle()
    assert len(h.stripe.meter_events) == (1 if stripe_applied_it else 0)  # never sent into a finalized invoice
    assert result.summary.late_drift == (0 if stripe_applied_it else 1)
    assert [r.state for r in h.rows("select state from usage_reports")] == ["sent" if stripe_applied_it else "failed"]
    assert h.rows("select reported_total from usage_periods order by period_start")[0][0] == stripe_total(h)


def forget_ledger(h: Harness) -> None:
    """The ledger lost, as after a restore from an old backup or a database made afresh."""
    with h.engine.begin() as connection:
        for table in ("late_drift", "usage_reports", "usage_periods"):
            connection.execute(text(f"delete from {table}"))


def sent_reports_agree_with_stripe(h: Harness) -> bool:
    """Every report the ledger marks sent is an event Stripe holds under its identifier with its quantity."""
    held = {event.identifier: event.value for event in h.stripe.meter_events}
    sent = h.rows("select identifier, quantity from usage_reports where state = 'sent'")
    return all(held.get(row.identifier) == row.quantity for row in sent)


def test_a_fresh_ledger_never_sends_an_identifier_an_earlier_ledger_sent(harness):
    """Stripe keeps identifiers "within a rolling period of at least 24 hours"
    (https://docs.stripe.com/api/billing/meter-event/create). A ledger that forgot what it sent numbers its intents
    from 1 again: each identifier's random nonce keeps them apart from the earlier ledger's events, which carry
    other quantities (they used to collide, the duplicate was taken for our event, and the usage was lost)."""
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    with freeze_time(MID) as clock:
        assert h.cycle().summary.failed == 0
        forget_ledger(h)
        use(h, utc(2026, 3, 3), 4)
        clock.tick(timedelta(minutes=15))
        result = h.cycle()
    assert (result.summary.reported, result.summary.failed) == (1, 0), result.summary.failures
    first, second = (event.identifier for event in h.stripe.meter_events)
    assert first != second
    assert [event.value for event in h.stripe.meter_events] == [10, 14]  # Stripe took the fresh ledger's event
    assert sent_reports_agree_with_stripe(h)


IDENTIFIER = re.compile(r"^(meter:mtr_\w+:cus_\w+:\d+|rcn:[0-9a-f]{40}):(?P<sequence>\d+):[0-9a-f]{12}$")


@pytest.mark.parametrize("customer", ["cus_A", "cus_" + "x" * 80], ids=["readable", "hashed-past-100-chars"])
def test_an_identifier_is_stored_with_its_intent_kept_while_it_is_pending_and_within_stripes_100_chars(
    harness, customer
):
    h = harness
    seed(h, formula="sum", customer=customer)
    use(h, utc(2026, 3, 2), 10, customer=customer)
    h.stripe.inject_fault("POST", "/v1/billing/meter_events", 503, times=6)  # two cycles' worth of attempts
    with freeze_time(MID) as clock:
        for _ in range(2):
            assert h.cycle().summary.failed == 1
            clock.tick(timedelta(minutes=15))
        [stored] = h.rows("select identifier, state from usage_reports")
        assert stored.state == "pending"
        assert h.cycle().summary.failed == 0
    assert {p.params["identifier"] for p in posts(h)} == {stored.identifier}  # every resend carried the stored one
    assert len(stored.identifier) <= 100
    match = IDENTIFIER.match(stored.identifier)
    assert match and match["sequence"] == "1", stored.identifier  # readable parts, then a 12-hex nonce
    assert [e.identifier for e in h.stripe.meter_events] == [stored.identifier]


def test_a_duplicate_answer_to_an_intents_first_send_is_settled_from_stripes_summary_not_taken_as_sent(harness):
    """Stripe refuses an event whose identifier it holds, whatever the held event's quantity, so the refusal of a
    first send says nothing about ours. (A resend's refusal does: the event it holds is our earlier attempt.)"""
    h = harness
    seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    real_send = h.stripe_gateway.send_meter_event
    other_writer = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": h.stripe_url})

    def identifier_taken_first(intent, renew_key):
        # Stands in for a ledger restored from a backup, or identifiers from before they had nonces: an event with
        # the identifier and another quantity, dated a day earlier, already exists at Stripe.
        h.stripe_gateway.send_meter_event = real_send
        other_writer.v1.billing.meter_events.create(
            params={
                "event_name": "api_calls",
                "payload": {"stripe_customer_id": "cus_A", "value": "3"},
                "identifier": intent.identifier,
                "timestamp": ts(MID - timedelta(days=1)),
            }
        )
        real_send(intent, renew_key)

    h.stripe_gateway.send_meter_event = identifier_taken_first
    with freeze_time(MID) as clock:
        refused = h.cycle()
        assert refused.summary.failed == 1 and "settled at a later cycle" in refused.summary.failures[0]
        assert [tuple(r) for r in h.rows("select state, attempts from usage_reports")] == [("pending", 0)]
        clock.tick(timedelta(minutes=15))
        settled = h.cycle()  # Stripe's summary of the intent's minute shows it never landed: decided afresh
    assert settled.summary.failed == 0, settled.summary.failures
    assert [r.state for r in h.rows("select state from usage_reports order by sequence")] == ["failed", "sent"]
    assert [event.value for event in h.stripe.meter_events] == [3, 10]
    assert sent_reports_agree_with_stripe(h)


@pytest.mark.parametrize("stripe_applied_it", [False, True], ids=["never-arrived", "arrived-answer-lost"])
def test_a_pending_intent_is_settled_from_stripes_summary_only_once_the_summary_lag_has_passed(
    harness, stripe_applied_it
):
    """Stripe aggregates meter events asynchronously and documents no bound
    (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api). A final report sent 6 minutes
    before the settle path reads the summary is not yet in it (the sandbox lags 8 minutes, stripe.summary_lag is
    10): reading its absence as "never landed" would leave the ledger short of what Stripe bills."""
    h = harness
    h.stripe.summary_lag_seconds = 8 * 60
    item = seed(h, formula="sum")
    use(h, utc(2026, 3, 2), 10)
    unanswered = answer_lost(h.stripe_gateway.send_meter_event, applied=stripe_applied_it)

    with freeze_time(MID) as clock:
        h.cycle()
        use(h, utc(2026, 3, 20), 5)
        clock.move_to(PERIOD_END + timedelta(minutes=55))  # the final sync, 5 minutes before the invoice finalizes
        h.stripe.set_item_period(item["id"], ts(PERIOD_END), ts(PERIOD_END + timedelta(days=30)))
        h.stripe_gateway.send_meter_event = unanswered
        assert h.cycle().summary.failed == 1  # outcome unknown: pending
        h.configure()
        clock.tick(timedelta(minutes=6))  # the invoice has finalized: settled from the summary, not resent
        waiting = h.cycle()
        assert waiting.summary.failed == 1 and "may not show it before" in waiting.summary.failures[0]
        assert [r.state for r in h.rows("select state from usage_reports order by sequence")] == ["sent", "pending"]
        clock.tick(timedelta(minutes=5))
        settled = h.cycle()
    assert settled.summary.failed == 0, settled.summary.failures
    assert [r.state for r in h.rows("select state from usage_reports order by sequence")] == [
        "sent",
        "sent" if stripe_applied_it else "failed",
    ]
    assert h.rows("select reported_total from usage_periods order by period_start")[0][0] == stripe_total(h)
    assert stripe_total(h) == (15 if stripe_applied_it else 10)


def test_the_proxy_of_the_environment_is_used_for_stripe_though_read_only_once(sandbox, monkeypatch):
    """The proxy settings are read once per client (requests would read the whole environment twice per request),
    and still decide where the requests go: through HTTP_PROXY, unless NO_PROXY names Stripe's host."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as probe:  # a port nobody listens on: a proxy there refuses every connection
        probe.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"
    sandbox.stripe.add_meter("proxied_calls")
    raw = sandbox.config_dict("sqlite://", meters=[])
    raw["stripe"]["max_network_retries"] = 0
    config = parse_config(raw)

    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    through_the_proxy = StripeGateway(config.stripe)
    with pytest.raises(UpstreamError, match=r"(?i)proxy|connect"):
        through_the_proxy.list_meters()
    through_the_proxy.close()

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = StripeGateway(config.stripe)
    assert [m.event_name for m in direct.list_meters().values()] == ["proxied_calls"]  # fetched past the proxy
    direct.close()


def test_every_line_the_workers_log_carries_the_cycles_run_id(harness, capsys):
    """The pipeline's workers (measuring and syncing threads) run in the cycle's context: an item's lines name the run
    they belong to, as the cycle's own lines do."""
    h = harness
    saved = structlog.get_config()
    for index in range(12):
        seed(h, customer=f"cus_{index:02d}")
        use(h, MID - timedelta(days=1), index + 1, customer=f"cus_{index:02d}")
    h.configure(stripe={"max_concurrency": 4})
    configure_logging("DEBUG", "json")
    try:
        with freeze_time(MID):
            result = h.cycle()
    finally:
        structlog.configure(**saved)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    reporting = {line["customer"] for line in lines if line["event"] == "reporting"}
    assert result.summary.reported == 12 and reporting == {f"cus_{i:02d}" for i in range(12)}
    assert {line.get("run_id") for line in lines} == {result.run_id}
