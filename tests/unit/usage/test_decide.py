"""The decision core: what to send for one stream period, given the ledger and the measured total."""

from datetime import UTC, datetime, timedelta

import pytest

from reconciler.usage.decide import NEW_PERIOD, Action, LedgerState, Timing, decide, final_sync_due_at
from reconciler.usage.model import BillingPeriod, Meter, Stream, StreamKind, StreamPeriod


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


PERIOD = BillingPeriod(utc(2026, 3, 1), utc(2026, 4, 1))
TIMING = Timing(
    grace_period=timedelta(minutes=30),
    invoice_grace_period=timedelta(hours=1),
    legacy_final_sync_before=timedelta(minutes=5),
)
MID_PERIOD = utc(2026, 3, 15, 12)


def work(kind: StreamKind, *, is_current: bool = True) -> StreamPeriod:
    meter = None
    if kind is not StreamKind.LEGACY:
        meter = Meter("mtr_1", "api_calls", kind.value, "active", None, "stripe_customer_id", "value")
    stream = Stream(
        kind=kind,
        customer_id="cus_1",
        subscription_id="sub_1",
        item_id="si_1",
        stripe_target="api_calls",
        openmeter_meter="api_requests",
        subject="cus_1",
        rounding="ceil",
        meter=meter,
    )
    return StreamPeriod(stream, PERIOD, is_current=is_current)


def state(
    reported: int, *, final: bool = False, last_event_at: datetime | None = None, late_total: int | None = None
) -> LedgerState:
    return LedgerState(is_final=final, reported_total=reported, last_event_at=last_event_at, late_total=late_total)


def test_last_meter_sends_the_total():
    decision = decide(work(StreamKind.METER_LAST), state(10), 15, MID_PERIOD, TIMING)
    assert (decision.action, decision.quantity, decision.final) == (Action.REPORT, 15, False)
    assert decision.timestamp == MID_PERIOD


def test_sum_meter_sends_the_signed_difference():
    up = decide(work(StreamKind.METER_SUM), state(10), 15, MID_PERIOD, TIMING)
    down = decide(work(StreamKind.METER_SUM), state(15), 12, MID_PERIOD, TIMING)
    assert (up.action, up.quantity) == (Action.REPORT, 5)
    assert (down.action, down.quantity) == (Action.REPORT, -3)


def test_legacy_sends_the_total_at_the_fixed_timestamp():
    decision = decide(work(StreamKind.LEGACY), state(10), 15, MID_PERIOD, TIMING)
    assert (decision.action, decision.quantity) == (Action.REPORT, 15)
    assert decision.timestamp == utc(2026, 3, 1, 0, 0, 1)


@pytest.mark.parametrize("kind", list(StreamKind))
def test_unchanged_total_sends_nothing(kind):
    decision = decide(work(kind), state(15), 15, MID_PERIOD, TIMING)
    assert decision.action is Action.UNCHANGED
    assert decision.quantity is None


def test_new_period_with_no_usage_sends_nothing():
    assert decide(work(StreamKind.METER_SUM), NEW_PERIOD, 0, MID_PERIOD, TIMING).action is Action.UNCHANGED


def test_between_period_end_and_grace_reports_stay_provisional():
    now = PERIOD.end + timedelta(minutes=10)
    decision = decide(work(StreamKind.METER_LAST), state(10), 12, now, TIMING)
    assert (decision.action, decision.final) == (Action.REPORT, False)
    assert decision.timestamp == PERIOD.end - timedelta(seconds=120)


def test_after_grace_the_final_report_is_dated_one_second_before_the_end():
    now = PERIOD.end + timedelta(minutes=31)
    decision = decide(
        work(StreamKind.METER_SUM), state(10, last_event_at=PERIOD.end - timedelta(seconds=120)), 12, now, TIMING
    )
    assert (decision.action, decision.quantity, decision.final) == (Action.REPORT, 2, True)
    assert decision.timestamp == PERIOD.end - timedelta(seconds=1)


def test_after_grace_an_unchanged_total_is_finalized_without_a_call():
    decision = decide(work(StreamKind.METER_SUM), state(10), 10, PERIOD.end + timedelta(minutes=31), TIMING)
    assert (decision.action, decision.final, decision.quantity) == (Action.FINALIZE, True, None)


def test_a_change_after_final_is_late_drift_not_a_report():
    decision = decide(work(StreamKind.METER_SUM), state(10, final=True), 13, PERIOD.end + timedelta(hours=5), TIMING)
    assert decision.action is Action.LATE_DRIFT
    assert decision.quantity is None


def test_late_drift_is_recorded_once_per_new_value():
    later = PERIOD.end + timedelta(hours=6)
    seen = state(10, final=True, late_total=13)
    assert decide(work(StreamKind.METER_SUM), seen, 13, later, TIMING).action is Action.UNCHANGED
    assert decide(work(StreamKind.METER_SUM), seen, 14, later, TIMING).action is Action.LATE_DRIFT


def test_meter_period_past_invoice_finalization_is_closed_as_late_drift():
    decision = decide(work(StreamKind.METER_SUM), state(10), 12, PERIOD.end + timedelta(hours=2), TIMING)
    assert (decision.action, decision.final) == (Action.LATE_DRIFT, True)


def test_legacy_final_sync_runs_shortly_before_period_end():
    now = PERIOD.end - timedelta(minutes=4)
    decision = decide(work(StreamKind.LEGACY), state(10), 12, now, TIMING)
    assert (decision.action, decision.final) == (Action.REPORT, True)


def test_legacy_period_after_rollover_cannot_be_written():
    decision = decide(
        work(StreamKind.LEGACY, is_current=False), state(10), 12, PERIOD.end + timedelta(minutes=1), TIMING
    )
    assert (decision.action, decision.final) == (Action.LATE_DRIFT, True)


def test_legacy_negative_total_fails_clearly():
    decision = decide(work(StreamKind.LEGACY), state(0), -2, MID_PERIOD, TIMING)
    assert decision.action is Action.FAIL
    assert "negative" in decision.reason


def test_a_meter_event_that_cannot_be_dated_fails_instead_of_going_out_of_order():
    decision = decide(work(StreamKind.METER_LAST), state(10, last_event_at=MID_PERIOD), 12, MID_PERIOD, TIMING)
    assert decision.action is Action.FAIL
    assert "timestamp" in decision.reason


def test_final_sync_deadlines():
    assert final_sync_due_at(work(StreamKind.METER_SUM), state(1), TIMING) == PERIOD.end + timedelta(minutes=30)
    assert final_sync_due_at(work(StreamKind.LEGACY), state(1), TIMING) == PERIOD.end - timedelta(minutes=5)
    assert final_sync_due_at(work(StreamKind.LEGACY, is_current=False), state(1), TIMING) is None
    assert final_sync_due_at(work(StreamKind.METER_LAST), state(1, final=True), TIMING) is None
