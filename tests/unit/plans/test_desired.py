"""Entitlements from subscriptions: the pure rules."""

from reconciler.config import PlansConfig
from reconciler.plans.desired import SubscriptionSnapshot, desired_entitlements

CONFIG = PlansConfig(
    enabled=True,
    sync_url="http://app/sync",
    price_to_plan={"price_starter": "starter", "price_pro": "pro"},
    rank=["starter", "pro"],
    default_plan="free",
)


def sub(status="active", prices=("price_pro",), created=1, customer="cus_1", user="u1", id="sub_1"):
    return SubscriptionSnapshot(id, customer, status, created, tuple(prices), {"user_id": user} if user else {}, {})


def desired(*subs, config=CONFIG):
    entitlements, problems = desired_entitlements(subs, config)
    return [(e.user_id, e.plan, e.status) for e in entitlements], [(p.customer_id, p.reason) for p in problems]


def test_active_trialing_and_past_due_map_to_the_apps_statuses():
    assert desired(sub("active"))[0] == [("u1", "pro", "active")]
    assert desired(sub("trialing"))[0] == [("u1", "pro", "active")]
    assert desired(sub("past_due"))[0] == [("u1", "pro", "past_due")]


def test_the_highest_ranked_live_plan_wins():
    both = desired(sub(prices=("price_starter",), id="sub_a"), sub(prices=("price_pro",), id="sub_b", created=2))
    assert both[0] == [("u1", "pro", "active")]


def test_ended_subscriptions_fall_back_to_the_default_plan_with_their_status():
    assert desired(sub("canceled"))[0] == [("u1", "free", "canceled")]
    assert desired(sub("unpaid"))[0] == [("u1", "free", "canceled")]


def test_an_unmapped_price_is_reported_not_guessed():
    entitlements, problems = desired(sub(prices=("price_mystery",)), sub(customer="cus_2", user="u2", id="s2"))
    assert entitlements == [("u2", "pro", "active")]
    assert problems[0][0] == "cus_1" and "price_mystery" in problems[0][1]


def test_customers_without_a_user_id_are_not_app_users():
    assert desired(sub(user=None)) == ([], [])


def test_user_id_from_customer_metadata_or_id():
    snapshot = SubscriptionSnapshot("s", "cus_9", "active", 1, ("price_pro",), {}, {"app_user": "u9"})
    by_metadata = CONFIG.model_copy(update={"user_id_from": "customer_metadata:app_user"})
    by_id = CONFIG.model_copy(update={"user_id_from": "customer_id"})
    assert desired(snapshot, config=by_metadata)[0] == [("u9", "pro", "active")]
    assert desired(snapshot, config=by_id)[0] == [("cus_9", "pro", "active")]
