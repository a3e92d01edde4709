"""The read-back job: Stripe's summaries read back before each period's invoice closes, against the ledger.

Stripe validates meter events asynchronously and reports the ones it rejects only by sample, in thin error-report
events (https://docs.stripe.com/api/v2/core/events/event-types); its summaries are "an eventually consistent view"
(https://docs.stripe.com/api/billing/meter-event-summary). The sandbox rejects accepted events on request
(`reject_asynchronously`, with or without naming them in an error report) and lags its summaries
(`summary_lag_seconds`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import stripe
from freezegun import freeze_time

from reconciler.attention import items_needing_attention
from reconciler.clock import utc_now
from reconciler.results import RunStatus
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.verify import Verifier
from tests.conftest import STRIPE_KEY, Harness, ts
from tests.integration.test_usage_sync import PERIOD_END, PERIOD_START, posts, seed, stripe_total, use

AFTER_FINAL_SYNC = PERIOD_END + timedelta(minutes=31)  # usage.grace_period 30m; stripe.invoice_grace_period 1h
SUMMARY_LAG = timedelta(minutes=10)  # stripe.summary_lag's default


def summary_reads(h: Harness) -> int:
    return sum(1 for r in h.stripe.requests if r.method == "GET" and r.path.endswith("/event_summaries"))


def report_rejections(h: Harness) -> list[str]:
    """Stripe's error reports, as the webhook worker records them: each sample names an identifier."""
    identifiers = []
    for pushed in h.stripe.flush_meter_error_reports():
        event = h.stripe.v2_events[pushed["id"]]
        for error_type in event["data"]["reason"]["error_types"]:
            for sample in error_type["sample_errors"]:
                identifier = sample["request"]["identifier"]
                assert h.ledger.record_rejected_event(identifier, f"{error_type['code']}: {sample['error_message']}")
                identifiers.append(identifier)
    return identifiers


def another_writer_sends(h: Harness, identifier: str, at: datetime, value: str) -> None:
    """A meter event for cus_A from outside the reconciler (another integration, or a person fixing things)."""
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": h.stripe_url}, max_network_retries=0)
    client.v1.billing.meter_events.create(
        params={
            "event_name": "api_calls",
            "identifier": identifier,
            "timestamp": ts(at),
            "payload": {"stripe_customer_id": "cus_A", "value": value},
        }
    )


def identifiers_sent(h: Harness) -> list[str]:
    return [r.params["identifier"] for r in posts(h)]


def test_an_event_stripe_rejected_later_is_resent_under_a_new_identifier_before_the_invoice_closes(harness):
    h = harness
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    h.stripe.summary_lag_seconds = 120  # Stripe's summaries lag; stripe.summary_lag (10m) covers it
    h.stripe.reject_asynchronously(1)  # the final event: accepted (200), then rejected
    with freeze_time(AFTER_FINAL_SYNC) as clock:
        assert h.cycle().summary.reported == 1
        [rejected] = report_rejections(h)
        assert identifiers_sent(h) == [rejected]
        early = h.read_back.run_cycle()  # sooner than stripe.summary_lag after the send: not yet known, no call
        assert (early.not_yet, early.checked, summary_reads(h)) == (1, 0, 0)

        clock.tick(SUMMARY_LAG)
        found = h.read_back.run_cycle()
        assert [(line.finding, line.stripe, line.reported) for line in found.lines] == [("resending", "0", 7)]
        assert found.resent_customers == {"cus_A"} and summary_reads(h) == 1
        resend = h.cycle(customers=found.resent_customers, include_legacy=False)
        assert resend.summary.reported == 1
        [_, new_identifier] = identifiers_sent(h)
        assert new_identifier != rejected and posts(h)[-1].params["payload"]["value"] == "7"
        assert posts(h)[-1].params["timestamp"] == str(ts(PERIOD_END - timedelta(seconds=1)))
        assert h.rows("select state from usage_reports order by id") == [("rejected",), ("sent",)]

        clock.tick(SUMMARY_LAG)  # before period end + stripe.invoice_grace_period
        assert utc_now() < PERIOD_END + h.config.stripe.invoice_grace_period
        again = h.read_back.run_cycle()  # the resent period is final again: read back once more
        assert [line.finding for line in again.lines] == ["ok"] and summary_reads(h) == 2
        assert h.read_back.run_cycle().lines == [] and summary_reads(h) == 2  # once per period: done
    assert stripe_total(h) == 7
    assert items_needing_attention(h.engine) == []


def test_a_read_back_stopped_before_every_due_period_is_read_is_interrupted(harness):
    h = harness
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    stop = False
    h.read_back._stop_requested = lambda: stop  # what SIGTERM sets in the daemon
    with freeze_time(AFTER_FINAL_SYNC) as clock:
        h.cycle()
        clock.tick(SUMMARY_LAG)
        stop = True
        stopped = h.read_back.run_cycle()
        assert (stopped.status, stopped.checked, summary_reads(h)) == (RunStatus.INTERRUPTED, 0, 0)
        assert h.rows("select status from runs where job = 'usage_readback'") == [("interrupted",)]
        stop = False
        resumed = h.read_back.run_cycle()  # the next run reads what the stopped one left
        assert (resumed.status, [line.finding for line in resumed.lines]) == (RunStatus.SUCCEEDED, ["ok"])


def test_a_last_meter_rejected_final_event_is_sent_again_as_the_newest(harness):
    h = harness
    seed(h, formula="last")
    use(h, PERIOD_START + timedelta(days=2), 5)
    with freeze_time(PERIOD_START + timedelta(days=3)) as clock:
        h.cycle()  # a provisional event: 5, dated now
        use(h, PERIOD_START + timedelta(days=10), 4)
        clock.move_to(AFTER_FINAL_SYNC)  # the final event, 9, dated end - 1 s: rejected
        h.stripe.reject_asynchronously(1)
        h.cycle()
        report_rejections(h)
        clock.tick(SUMMARY_LAG)
        found = h.read_back.run_cycle()
        assert [(line.finding, line.stripe, line.reported) for line in found.lines] == [("resending", "5", 9)]
        h.cycle(customers=found.resent_customers, include_legacy=False)
    resent = posts(h)[-1].params
    assert (resent["timestamp"], resent["payload"]["value"]) == (str(ts(PERIOD_END - timedelta(seconds=1))), "9")
    assert stripe_total(h) == 9  # the newest event wins


def test_a_shortfall_no_error_report_explains_is_left_to_a_person_never_resent(harness):
    h = harness
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    h.stripe.reject_asynchronously(1, reported=False)  # rejected, and no error report names it
    with freeze_time(AFTER_FINAL_SYNC) as clock:
        h.cycle()
        assert report_rejections(h) == []
        clock.tick(SUMMARY_LAG)
        found = h.read_back.run_cycle()
        [line] = found.lines
        assert (line.finding, line.stripe, found.resent_customers, found.needs_a_person) == (
            "missing_in_stripe",
            "0",
            frozenset(),
            1,
        )
        assert "no error report names our events" in line.note
        assert len(posts(h)) == 1  # nothing resent: it could bill twice
        [item] = items_needing_attention(h.engine)
        assert (item.job, item.reason, item.customer) == ("usage_sync", "missing_in_stripe", "cus_A")
        verifier = Verifier(h.config, h.engine, h.stripe_gateway, OpenMeterGateway(h.config.openmeter), utc_now)
        assert [v.finding for v in verifier.run()] == ["missing_in_stripe"]  # `verify` exits 3 on it

        # A person fixes it in Stripe (here: sends the missing usage); `verify` then finds it agreeing and clears it.
        another_writer_sends(h, "fixed-by-hand", PERIOD_END - timedelta(minutes=5), "7")
        assert [v.finding for v in verifier.run()] == ["ok"]
    assert items_needing_attention(h.engine) == []


def test_an_error_report_after_the_invoice_finalized_is_left_to_a_person(harness):
    h = harness
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    h.stripe.reject_asynchronously(1)
    with freeze_time(AFTER_FINAL_SYNC) as clock:
        h.cycle()
        report_rejections(h)
        clock.move_to(PERIOD_END + timedelta(hours=2))  # the read-back ran too late (the service was down)
        [line] = h.read_back.run_cycle().lines
    assert line.finding == "missing_in_stripe" and "the invoice has finalized" in line.note
    assert len(posts(h)) == 1
    assert h.rows("select state from usage_reports") == [("rejected",)]


def test_stripe_holding_more_than_we_sent_is_another_writer_for_a_person(harness):
    h = harness
    seed(h)
    use(h, PERIOD_START + timedelta(days=2), 7)
    with freeze_time(AFTER_FINAL_SYNC) as clock:
        h.cycle()
        another_writer_sends(h, "someone-else-1", PERIOD_START + timedelta(days=4), "3")
        clock.tick(SUMMARY_LAG)
        found = h.read_back.run_cycle()
    assert [(line.finding, line.stripe) for line in found.lines] == [("foreign_usage", "10")]
    assert [item.reason for item in items_needing_attention(h.engine)] == ["foreign_usage"]
    assert [i for i in identifiers_sent(h) if i != "someone-else-1"] == identifiers_sent(h)[:1]  # nothing resent
