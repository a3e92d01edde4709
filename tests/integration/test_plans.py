"""Plan sync end to end: Stripe fake and the fake app over real HTTP, ledger on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from sqlalchemy import text

from reconciler.clock import utc_now
from reconciler.config import parse_config
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.plan_ledger import PlanLedger
from reconciler.ledger.runs import RunLog
from reconciler.logs import configure_logging
from reconciler.plans.job import PlanSync
from reconciler.results import RunStatus
from reconciler.upstream.app_api import EntitlementsGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler_sandbox.app_fake import SYNC_PATH, FakeApp
from reconciler_sandbox.httpserver import LoopbackServer
from tests.conftest import OPENMETER_TOKEN, STRIPE_KEY

APP_KEY = "app_secret_key_123"


@pytest.fixture(scope="session")
def _app_server() -> Iterator[tuple[FakeApp, LoopbackServer]]:
    fake = FakeApp(api_key=APP_KEY)
    with LoopbackServer(fake) as server:
        yield fake, server


class PlanHarness:
    def __init__(self, stripe, stripe_url, app, app_url, database_url):
        self.stripe, self.app = stripe, app
        self.engine = make_engine(database_url)
        upgrade(self.engine)
        self.config = parse_config(
            {
                "database": {"url": database_url},
                "stripe": {"api_key": STRIPE_KEY, "api_base": stripe_url},
                "openmeter": {"url": "http://127.0.0.1:9", "token": OPENMETER_TOKEN},
                "plans": {
                    "enabled": True,
                    "sync_url": f"{app_url}{SYNC_PATH}",
                    "api_key": APP_KEY,
                    "price_to_plan": {"price_starter": "starter", "price_pro": "pro"},
                    "rank": ["starter", "pro"],
                    "default_plan": "free",
                    "max_retries": 2,
                },
            }
        )
        self.sync = PlanSync(
            self.config,
            StripeGateway(self.config.stripe),
            EntitlementsGateway(self.config.plans),
            PlanLedger(self.engine, utc_now),
            RunLog(self.engine, utc_now),
        )
        for price in ("price_starter", "price_pro"):
            stripe.add_price(id=price, usage_type="licensed")

    def customer(self, customer="cus_p", price="price_pro", status="active", user="user_1") -> dict:
        self.stripe.add_customer(id=customer)
        now = int(utc_now().timestamp())
        return self.stripe.add_subscription(
            customer,
            [price],
            status=status,
            metadata={"user_id": user},
            current_period_start=now - 86400,
            current_period_end=now + 86400 * 29,
        )

    def set_price(self, subscription: dict, price: str) -> None:
        self.stripe.set_item_price(subscription["items"]["data"][0]["id"], price)

    def cycle(self, **kwargs):
        return self.sync.run_cycle(**kwargs)


@pytest.fixture
def ph(stripe_fake, _stripe_server, _app_server, database_url):
    app, server = _app_server
    app.reset()
    harness = PlanHarness(stripe_fake, _stripe_server[1].url, app, server.url, database_url)
    yield harness
    harness.sync.close()
    harness.engine.dispose()


def updates(ph) -> list[tuple[str, str, str]]:
    return [(u["userId"], u["plan"], u["status"]) for u in ph.app.updates]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda ph, s: ph.set_price(s, "price_pro"), ("user_1", "pro", "active")),  # upgrade
        (lambda ph, s: ph.stripe.update_subscription(s["id"], cancel_at_period_end=True), None),  # still active
        (lambda ph, s: ph.stripe.update_subscription(s["id"], status="canceled"), ("user_1", "free", "canceled")),
        (lambda ph, s: ph.stripe.update_subscription(s["id"], status="past_due"), ("user_1", "starter", "past_due")),
    ],
    ids=["upgrade", "cancel-at-period-end", "cancel-now", "past-due"],
)
def test_each_change_sends_one_correct_update_and_then_nothing(ph, change, expected):
    subscription = ph.customer(price="price_starter")
    ph.cycle()
    assert updates(ph) == [("user_1", "starter", "active")]
    change(ph, subscription)
    ph.cycle()
    ph.cycle()
    assert updates(ph)[1:] == ([expected] if expected else [])


def test_downgrade_and_trial(ph):
    pro = ph.customer(price="price_pro")
    ph.customer("cus_trial", price="price_starter", status="trialing", user="user_2")
    ph.cycle()
    ph.set_price(pro, "price_starter")
    ph.cycle()
    ph.cycle()  # nothing changed since: nothing sent
    assert sorted(updates(ph)) == sorted(
        [("user_1", "pro", "active"), ("user_2", "starter", "active"), ("user_1", "starter", "active")]
    )


def test_a_lost_or_reordered_webhook_is_corrected_from_stripes_current_state(ph):
    subscription = ph.customer(price="price_starter")
    ph.cycle(customers=frozenset({"cus_p"}))
    ph.set_price(subscription, "price_pro")  # its webhook is lost...
    ph.stripe.update_subscription(subscription["id"], status="past_due")  # ...and the next arrives first
    ph.cycle(customers=frozenset({"cus_p"}))  # the later event's work
    ph.cycle(customers=frozenset({"cus_p"}))  # the earlier event, delivered late: nothing new
    assert updates(ph) == [("user_1", "starter", "active"), ("user_1", "pro", "past_due")]
    assert ph.app.users["user_1"] == {"plan": "pro", "status": "past_due"}


def test_an_unmapped_price_skips_that_customer_only(ph):
    ph.stripe.add_price(id="price_mystery", usage_type="licensed")
    ph.customer("cus_odd", price="price_mystery", user="user_odd")
    ph.customer()
    result = ph.cycle()
    assert updates(ph) == [("user_1", "pro", "active")]
    assert [(line.customer_id, line.action) for line in result.lines if line.action == "skipped"] == [
        ("cus_odd", "skipped")
    ]
    assert "price_mystery" in next(line.reason for line in result.lines if line.customer_id == "cus_odd")


def test_a_listing_stripe_refuses_fails_the_run_and_sends_nothing(ph):
    ph.customer()
    ph.stripe.inject_fault("GET", "/v1/subscriptions", 500, times=10)
    result = ph.cycle()
    assert result.status is RunStatus.FAILED  # it could not list its work: not "partial"
    assert result.failures and result.failures[0].startswith("*: ")
    assert updates(ph) == []
    with ph.engine.connect() as connection:
        assert connection.execute(text("select status from runs where job = 'plan_sync'")).scalar_one() == "failed"


def test_app_500_then_200_is_acknowledged_exactly_once_and_the_key_is_never_logged(ph, capsys):
    configure_logging("DEBUG", "json", ph.config.secret_values())
    try:
        ph.customer()
        ph.app.inject_fault("POST", SYNC_PATH, 500, body={"detail": f"boom {APP_KEY}"})
        first = ph.cycle()
        second = ph.cycle()
    finally:
        structlog.reset_defaults()
    assert [line.action for line in first.lines] == ["sent"] and [line.action for line in second.lines] == ["unchanged"]
    assert updates(ph) == [("user_1", "pro", "active")]
    assert [r.headers["x-internal-api-key"] for r in ph.app.requests] == [APP_KEY, APP_KEY]
    captured = capsys.readouterr()
    assert APP_KEY not in captured.out + captured.err
    with ph.engine.connect() as connection:
        assert connection.execute(text("select plan, status from plan_states")).all() == [("pro", "active")]


def test_dry_run_sends_and_writes_nothing_and_full_resends_everything_once(ph):
    ph.customer()
    ph.customer("cus_2", price="price_starter", user="user_2")
    dry = ph.cycle(dry_run=True)
    assert [line.action for line in dry.lines] == ["would send", "would send"] and ph.app.updates == []
    with ph.engine.connect() as connection:
        assert connection.execute(text("select count(*) from plan_states")).scalar() == 0
        assert connection.execute(text("select count(*) from runs")).scalar() == 0
    ph.cycle()
    ph.app.users.clear()  # the app lost its data
    ph.cycle(full=True)
    assert len(ph.app.updates) == 4 and ph.app.users == {
        "user_1": {"plan": "pro", "status": "active"},
        "user_2": {"plan": "starter", "status": "active"},
    }
    ph.cycle()
    assert len(ph.app.updates) == 4
