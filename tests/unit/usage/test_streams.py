"""Building streams from Stripe's metered items, and refusing what set semantics cannot cover."""

from datetime import UTC, datetime, timedelta

from reconciler.config import UsageConfig
from reconciler.usage.model import BillingPeriod, Meter, MeteredItem, StreamKind
from reconciler.usage.streams import build_work

NOW = datetime(2026, 3, 15, tzinfo=UTC)
PERIOD = BillingPeriod(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
USAGE = UsageConfig(
    meters=[
        {"stripe": "api_calls", "openmeter": "api_requests"},
        {"stripe": "tokens", "openmeter": "tokens", "rounding": "floor"},
        {"stripe": "seats", "openmeter": "seats"},
        {"stripe": "logins", "openmeter": "logins"},
        {"stripe": "price_legacy", "openmeter": "api_requests"},
    ]
)


def meter(id_, name, formula="sum", status="active", window=None):
    return Meter(id_, name, formula, status, window, "stripe_customer_id", "value")


METERS = {
    m.id: m
    for m in [
        meter("mtr_sum", "api_calls"),
        meter("mtr_last", "tokens", "last"),
        meter("mtr_count", "logins", "count"),
        meter("mtr_off", "seats", status="inactive"),
        meter("mtr_hourly", "storage", window="hour"),
        meter("mtr_unmapped", "unmapped_event"),
    ]
}


def item(
    item_id,
    meter_id,
    *,
    customer="cus_1",
    status="active",
    price="price_x",
    period=PERIOD,
    ended_at=None,
    metadata=None,
):
    return MeteredItem(
        item_id=item_id,
        subscription_id=f"sub_{item_id}",
        subscription_status=status,
        customer_id=customer,
        price_id=price,
        meter_id=meter_id,
        period=period,
        ended_at=ended_at,
        customer_metadata=metadata,
    )


def test_sum_last_and_legacy_items_become_streams():
    work, refusals = build_work(
        [item("si_1", "mtr_sum"), item("si_2", "mtr_last"), item("si_3", None, price="price_legacy")],
        METERS,
        USAGE,
        NOW,
    )
    assert refusals == []
    kinds = {sp.stream.item_id: (sp.stream.kind, sp.stream.openmeter_meter, sp.stream.rounding) for sp in work}
    assert kinds == {
        "si_1": (StreamKind.METER_SUM, "api_requests", "ceil"),
        "si_2": (StreamKind.METER_LAST, "tokens", "floor"),
        "si_3": (StreamKind.LEGACY, "api_requests", "ceil"),
    }
    assert work[0].stream.key == "meter:mtr_sum:cus_1"
    assert work[2].stream.key == "legacy:si_3"


def test_count_inactive_preaggregated_and_unknown_meters_are_refused_with_their_names():
    config = UsageConfig(meters=[*USAGE.meters, {"stripe": "storage", "openmeter": "storage"}])
    _, refusals = build_work(
        [item("si_c", "mtr_count"), item("si_i", "mtr_off"), item("si_h", "mtr_hourly"), item("si_g", "mtr_gone")],
        METERS,
        config,
        NOW,
    )
    reasons = {r.item_id: r.reason for r in refusals}
    assert "count" in reasons["si_c"] and "logins" in reasons["si_c"]
    assert "inactive" in reasons["si_i"] and "seats" in reasons["si_i"]
    assert "pre-aggregated" in reasons["si_h"] and "storage" in reasons["si_h"]
    assert "mtr_gone" in reasons["si_g"]
    assert not any(r.unmapped for r in refusals)


def test_unmapped_meter_is_skipped_not_failed():
    work, refusals = build_work([item("si_u", "mtr_unmapped")], METERS, USAGE, NOW)
    assert work == []
    assert [(r.unmapped, r.stripe_target) for r in refusals] == [(True, "unmapped_event")]
    assert "usage.meters" in refusals[0].reason


def test_two_items_of_one_customer_on_one_meter_are_refused():
    work, refusals = build_work(
        [item("si_a", "mtr_sum"), item("si_b", "mtr_sum"), item("si_other", "mtr_sum", customer="cus_2")],
        METERS,
        USAGE,
        NOW,
    )
    assert [sp.stream.customer_id for sp in work] == ["cus_2"]
    assert {r.item_id for r in refusals} == {"si_a", "si_b"}
    assert "si_a" in refusals[0].reason and "si_b" in refusals[0].reason


def test_canceled_subscription_ends_its_last_period_at_ended_at_within_lookback():
    ended = datetime(2026, 3, 10, 8, 30, tzinfo=UTC)
    work, _ = build_work([item("si_1", "mtr_sum", status="canceled", ended_at=ended)], METERS, USAGE, NOW)
    assert [(sp.period.end, sp.is_current) for sp in work] == [(ended, False)]


def test_canceled_long_ago_and_incomplete_subscriptions_are_out_of_scope():
    old = BillingPeriod(NOW - timedelta(days=90), NOW - timedelta(days=60))
    work, refusals = build_work(
        [
            item("si_1", "mtr_sum", status="canceled", period=old, ended_at=old.end),
            item("si_2", "mtr_sum", customer="cus_2", status="incomplete_expired"),
        ],
        METERS,
        USAGE,
        NOW,
    )
    assert (work, refusals) == ([], [])


def test_subject_from_customer_metadata():
    config = UsageConfig(subject="metadata:om_subject", meters=USAGE.meters)
    work, refusals = build_work(
        [
            item("si_1", "mtr_sum", metadata={"om_subject": "tenant-42"}),
            item("si_2", "mtr_sum", customer="cus_2", metadata={}),
        ],
        METERS,
        config,
        NOW,
    )
    assert [sp.stream.subject for sp in work] == ["tenant-42"]
    assert refusals[0].customer_id == "cus_2" and "om_subject" in refusals[0].reason


def test_a_subscription_status_stripe_adds_later_is_refused_by_name_not_silently_skipped():
    work, refusals = build_work(
        [item("si_new", "mtr_sum", status="some_future_status"), item("si_paused", "mtr_sum", status="paused")],
        METERS,
        USAGE,
        NOW,
    )
    assert work == []
    assert [(r.item_id, r.reason) for r in refusals] == [
        ("si_new", "subscription status 'some_future_status' is unknown to reconciler: not billed")
    ]
