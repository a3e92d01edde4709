"""The balance job end to end: Stripe and Moesif fakes over real HTTP, ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import structlog
from freezegun import freeze_time
from sqlalchemy import text

from reconciler.balances.job import BalanceSync
from reconciler.clock import utc_now
from reconciler.config import parse_config
from reconciler.ledger.balance_ledger import BalanceLedger
from reconciler.ledger.balance_lock import BalanceJobBusyError, balance_job_lock
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.runs import RunLog
from reconciler.logs import configure_logging
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.upstream.stripe_api import StripeGateway
from tests.conftest import MOESIF_TOKEN, OPENMETER_TOKEN, STRIPE_KEY, ts, utc
from tests.integration.helpers import (
    command_env,
    command_line,
    customer_with_usage,
    reconciler,
    wait_until,
    write_config,
)

NOW = utc(2026, 3, 10, 12, 0)
PERIOD = (utc(2026, 3, 1), utc(2026, 4, 1))


class BalanceHarness:
    def __init__(self, stripe, stripe_url, moesif, moesif_url, database_url):
        self.stripe, self.moesif = stripe, moesif
        self.stripe_url, self.moesif_url, self.database_url = stripe_url, moesif_url, database_url
        self.engine = make_engine(database_url)
        upgrade(self.engine)
        self.configure()

    def configure(
        self, token: str = MOESIF_TOKEN, *, moesif_dedupes: bool = False, moesif_concurrency: int = 4, **balances: Any
    ) -> None:
        settings = {
            "enabled": True,
            "stripe_source": "credit_grants",
            "auto_correct": True,
            "max_auto_correction": {"usd": 100, "jpy": 10000},
            "settle_delay": "10m",
            **balances,
        }
        self.config = parse_config(
            {
                "database": {"url": self.database_url},
                "stripe": {"api_key": STRIPE_KEY, "api_base": self.stripe_url, "max_network_retries": 2},
                "openmeter": {"url": "http://127.0.0.1:9", "token": OPENMETER_TOKEN},
                "moesif": {
                    "url": self.moesif_url,
                    "management_token": token,
                    "max_retries": 2,
                    "max_requests_per_minute": 500,
                    "deduplicates_transaction_ids": moesif_dedupes,
                    "max_concurrency": moesif_concurrency,
                },
                "balances": settings,
                "logging": {"level": "DEBUG", "format": "console"},
            }
        )
        self.gateway = MoesifGateway(self.config.moesif)
        self.sync = BalanceSync(
            self.config,
            StripeGateway(self.config.stripe),
            self.gateway,
            BalanceLedger(self.engine, utc_now),
            RunLog(self.engine, utc_now),
            clock=utc_now,
        )

    def cycle(self, **kwargs):
        return self.sync.run_cycle(**kwargs)

    def customer(self, customer="cus_M", *, currency="usd", moesif_balance=0.0, grant=None, subscription="sub_M"):
        """A customer with a metered subscription (what maps it to Moesif) and its Moesif subscription."""
        meter = next(iter(self.stripe.meters.values()), None) or self.stripe.add_meter("api_calls")
        price = self.stripe.add_price(meter=meter["id"], currency=currency, unit_amount=1)
        self.stripe.add_customer(id=customer, currency=currency)
        self.stripe.add_subscription(
            customer,
            [price["id"]],
            id=subscription,
            current_period_start=ts(PERIOD[0]),
            current_period_end=ts(PERIOD[1]),
            created=ts(PERIOD[0]) - 86400,
        )
        self.moesif.add_subscription(subscription, customer, currency=currency, current_balance=moesif_balance)
        if grant is not None:
            self.stripe.add_credit_grant(customer, grant, currency=currency, effective_at=ts(PERIOD[0]))

    def posts(self) -> list[dict]:
        return [
            json.loads(r.body)
            for r in self.moesif.requests
            if r.method == "POST" and r.path.endswith("/balance_transactions")
        ]

    def rows(self, sql: str) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql)))


@pytest.fixture
def bh(stripe_fake, moesif_fake, _stripe_server, _moesif_server, database_url):
    harness = BalanceHarness(stripe_fake, _stripe_server[1].url, moesif_fake, _moesif_server[1].url, database_url)
    yield harness
    harness.gateway.close()
    harness.engine.dispose()


def test_top_ups_post_currency_units_not_cents(bh):
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer("cus_usd", subscription="sub_usd")
    bh.customer("cus_jpy", currency="jpy", subscription="sub_jpy")
    bh.stripe.add_payment_intent("cus_usd", 2500, "usd", created=ts(NOW - timedelta(days=1)), id="pi_usd")
    bh.stripe.add_payment_intent("cus_jpy", 500, "jpy", created=ts(NOW - timedelta(days=1)), id="pi_jpy")
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 0, result.failures
    posts = {p["transaction_id"]: p for p in bh.posts()}
    assert posts["pi_usd"]["amount"] == 25.0 and isinstance(posts["pi_usd"]["amount"], float)
    assert posts["pi_jpy"]["amount"] == 500 and isinstance(posts["pi_jpy"]["amount"], int)
    assert {p["type"] for p in posts.values()} == {"credit"}
    assert (posts["pi_usd"]["company_id"], posts["pi_usd"]["subscription_id"]) == ("cus_usd", "sub_usd")
    assert bh.moesif.balance("sub_usd") == 25.0 and bh.moesif.balance("sub_jpy") == 500


def test_a_missed_top_up_is_forwarded_once_even_through_a_moesif_500(bh):
    bh.configure(stripe_source="none", auto_correct=False, moesif_dedupes=True)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=2)), id="pi_missed")
    bh.stripe.add_payment_intent("cus_M", 700, status="requires_payment_method", created=ts(NOW), id="pi_unpaid")
    bh.moesif.inject_fault("POST", "/v1/~/billing/reports/balance_transactions", 500)
    with freeze_time(NOW) as clock:
        first = bh.cycle()
        clock.tick(timedelta(minutes=5))
        second = bh.cycle()
    assert first.failed == 0 and second.failed == 0
    assert [p["transaction_id"] for p in bh.posts()] == ["pi_missed", "pi_missed"]  # the 500, then the retry
    assert bh.moesif.balance("sub_M") == 10.0
    assert second.customers[0].forwarded == []  # re-running forwards nothing more
    assert [tuple(r) for r in bh.rows("select transaction_id, state from moesif_transactions")] == [
        ("pi_missed", "sent")
    ]


def test_a_refund_becomes_one_debit_even_when_its_top_up_is_older_than_the_lookback(bh):
    bh.configure(stripe_source="none", auto_correct=False, topups={"lookback": "35d"})
    bh.customer(moesif_balance=40.0)
    bh.stripe.add_payment_intent("cus_M", 4000, created=ts(NOW - timedelta(days=90)), id="pi_old")
    bh.stripe.add_refund("pi_old", 1500, created=ts(NOW - timedelta(days=1)), id="re_1")
    with freeze_time(NOW) as clock:
        bh.cycle()
        clock.tick(timedelta(hours=1))
        bh.cycle()
    posts = bh.posts()
    assert [(p["transaction_id"], p["type"], p["amount"]) for p in posts] == [("re_1", "debit", 15.0)]
    assert bh.moesif.balance("sub_M") == 25.0


def test_a_refund_of_an_old_top_up_costs_one_lookup_per_cycle_and_an_unreadable_one_waits_alone(bh):
    bh.configure(stripe_source="none", auto_correct=False, topups={"lookback": "35d"})
    for name in ("a", "b", "c"):
        bh.customer(f"cus_{name}", moesif_balance=40.0, subscription=f"sub_{name}")
    bh.stripe.add_payment_intent("cus_b", 4000, created=ts(NOW - timedelta(days=90)), id="pi_old")
    bh.stripe.add_refund("pi_old", 1500, created=ts(NOW - timedelta(days=1)), id="re_1")
    bh.stripe.add_payment_intent("cus_c", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_new")
    bh.stripe.inject_fault("GET", "/v1/payment_intents/pi_old", 500, times=3)  # every attempt of one cycle
    with freeze_time(NOW) as clock:
        first = bh.cycle()
        assert [f.split(":")[0] for f in first.failures] == ["refund re_1"]
        assert [p["transaction_id"] for p in bh.posts()] == ["pi_new"]  # the rest went on
        bh.stripe.requests.clear()
        clock.tick(timedelta(hours=1))
        second = bh.cycle()
    assert second.failed == 0, second.failures
    lookups = [r for r in bh.stripe.requests if r.path == "/v1/payment_intents/pi_old"]
    assert len(lookups) == 1  # once for the cycle, not once per customer
    assert [(p["transaction_id"], p["company_id"], p["type"]) for p in bh.posts()] == [
        ("pi_new", "cus_c", "credit"),
        ("re_1", "cus_b", "debit"),
    ]


def test_while_a_refund_cannot_be_attributed_no_drift_is_corrected_so_it_is_never_debited_twice(bh):
    bh.configure(stripe_source="customer_balance", topups={"lookback": "35d"})  # auto_correct on
    bh.customer("cus_b", moesif_balance=40.0)
    bh.stripe.adjust_customer_balance("cus_b", -4000)
    bh.stripe.add_payment_intent("cus_b", 4000, created=ts(NOW - timedelta(days=90)), id="pi_old")
    bh.stripe.add_refund("pi_old", 1500, created=ts(NOW - timedelta(days=1)), id="re_1")
    bh.stripe.adjust_customer_balance("cus_b", 1500)  # the refund took its credit back on Stripe
    bh.stripe.inject_fault("GET", "/v1/payment_intents/pi_old", 500, times=3)
    with freeze_time(NOW) as clock:
        held = bh.cycle()
        assert (held.customers[0].action, held.customers[0].difference) == ("settling", Decimal("-15.00"))
        assert "refund could not be attributed" in held.customers[0].reason
        assert bh.posts() == []  # no correcting debit while the refund itself is unknown
        clock.tick(timedelta(hours=1))
        bh.cycle()  # the refund is forwarded: the one debit
        clock.tick(timedelta(hours=1))
        settled = bh.cycle()
    assert [(p["transaction_id"], p["type"], p["amount"]) for p in bh.posts()] == [("re_1", "debit", 15.0)]
    assert (settled.customers[0].action, bh.moesif.balance("sub_M")) == ("in_sync", 25.0)


def test_drift_within_tolerance_needs_no_action(bh):
    bh.customer(moesif_balance=49.995, grant=5000)
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.customers[0].action == "in_sync"
    assert bh.posts() == []
    assert [tuple(r) for r in bh.rows("select expected_minor, moesif_minor, action from balance_observations")] == [
        (5000, 5000, "in_sync")
    ]


@pytest.mark.parametrize(("moesif_balance", "direction", "amount"), [(42.0, "credit", 8.0), (61.5, "debit", 11.5)])
def test_drift_is_corrected_once_and_verified_after_moesif_shows_it(bh, moesif_balance, direction, amount):
    bh.customer(moesif_balance=moesif_balance, grant=5000)
    bh.moesif.visibility_delay_seconds = 300  # Moesif shows new transactions five minutes late
    with freeze_time(NOW) as clock:
        first = bh.cycle()
        assert first.customers[0].action == "correct"
        assert [(p["type"], p["amount"]) for p in bh.posts()] == [(direction, amount)]

        clock.tick(timedelta(minutes=2))  # not visible yet: no second correction
        assert bh.cycle().customers[0].action == "settling"
        assert len(bh.posts()) == 1

        clock.tick(timedelta(minutes=10))  # now it is
        third = bh.cycle()
    assert third.customers[0].action == "in_sync"
    assert len(bh.posts()) == 1
    assert bh.moesif.balance("sub_M") == 50.0
    verified = bh.rows("select verified_at from moesif_transactions where kind = 'correction'")
    assert verified[0][0] is not None


def test_drift_over_the_limit_or_in_an_unlisted_currency_is_reported_not_corrected(bh):
    bh.customer("cus_big", moesif_balance=0.0, grant=50000, subscription="sub_big")  # $500 off, limit $100
    bh.customer("cus_eur", currency="eur", moesif_balance=0.0, grant=1000, subscription="sub_eur")
    with freeze_time(NOW):
        result = bh.cycle()
    actions = {c.customer_id: (c.action, c.reason) for c in result.customers}
    assert actions["cus_big"][0] == "over_limit" and "max_auto_correction" in actions["cus_big"][1]
    assert actions["cus_eur"][0] == "over_limit" and "no balances.max_auto_correction entry" in actions["cus_eur"][1]
    assert bh.posts() == []
    assert result.uncorrected_drift == 2


def test_usage_moesif_burned_but_stripe_has_not_invoiced_is_not_drift(bh):
    bh.customer(moesif_balance=40.0, grant=5000)
    # The usage ledger says 1,000 units at 1 cent were reported in the open period: $10 Moesif already burned.
    with bh.engine.begin() as connection:
        connection.execute(
            text(
                "insert into usage_periods (stream_key, period_start, period_end, kind, customer_id, subscription_id,"
                " subscription_item_id, stripe_target, meter_id, openmeter_meter, subject, status, reported_total,"
                " next_sequence, failures, created_at, updated_at) values (:key, :start, :end, 'sum', 'cus_M', 'sub_M',"
                " 'si_1', 'api_calls', :meter, 'api_requests', 'cus_M', 'provisional', 1000, 2, 0, :start, :start)"
            ),
            {
                "key": "meter:x:cus_M",
                "start": PERIOD[0].replace(tzinfo=None),
                "end": PERIOD[1].replace(tzinfo=None),
                "meter": next(iter(bh.stripe.meters)),
            },
        )
    with freeze_time(NOW):
        result = bh.cycle()
    report = result.customers[0]
    assert (report.action, report.stripe_expected, report.moesif) == ("in_sync", Decimal("40.00"), Decimal("40.00"))


def test_customer_balance_source_reads_negative_balance_as_credit(bh):
    bh.configure(stripe_source="customer_balance")
    bh.customer(moesif_balance=20.0)
    bh.stripe.adjust_customer_balance("cus_M", -2000)
    with freeze_time(NOW):
        result = bh.cycle()
    assert (result.customers[0].action, result.customers[0].stripe_expected) == ("in_sync", Decimal("20.00"))


def test_unchanged_agreeing_customers_cost_no_moesif_read_until_the_full_sweep(bh):
    """Moesif is read for a customer only when Stripe's side moved, or the last read is a full sweep old; Stripe
    is read in listings, not per customer."""
    bh.configure(stripe_source="customer_balance", full_sweep_interval="24h")
    for name in ("a", "b", "c"):
        bh.customer(f"cus_{name}", moesif_balance=20.0, subscription=f"sub_{name}")
        bh.stripe.adjust_customer_balance(f"cus_{name}", -2000)

    def balance_reads() -> list[str]:
        reads = [r.path.rsplit("/", 1)[-1] for r in bh.moesif.requests if r.method == "GET"]
        bh.moesif.requests.clear()
        return sorted(reads)

    def per_customer_stripe_reads() -> list[str]:
        paths = [r.path for r in bh.stripe.requests if r.path.startswith("/v1/customers")]
        bh.stripe.requests.clear()
        return paths

    with freeze_time(NOW) as clock:
        first = bh.cycle()
        assert [c.action for c in first.customers] == ["in_sync"] * 3
        assert balance_reads() == ["sub_a", "sub_b", "sub_c"]
        assert per_customer_stripe_reads() == []  # the credit came with the subscription listing

        clock.tick(timedelta(hours=1))
        second = bh.cycle()
        assert balance_reads() == []
        assert [(c.action, c.moesif_reread, c.difference) for c in second.customers] == [
            ("in_sync", False, Decimal("0.00"))
        ] * 3
        assert second.summary()["moesif_not_reread"] == 3

        bh.stripe.adjust_customer_balance("cus_b", -500)  # Stripe credit moved: Moesif must be looked at
        bh.stripe.add_payment_intent("cus_c", 1000, created=ts(NOW), id="pi_c")  # a top-up to forward...
        bh.stripe.adjust_customer_balance("cus_c", -1000)  # ...credited on Stripe
        clock.tick(timedelta(hours=1))
        third = bh.cycle()
        assert balance_reads() == ["sub_b", "sub_c"]
        assert [c.action for c in third.customers] == ["in_sync", "correct", "in_sync"]

        bh.moesif.consume("sub_a", 3.0)  # Moesif moved on its own: only a full sweep can see it
        clock.tick(timedelta(hours=1))
        bh.cycle()
        assert balance_reads() == ["sub_b", "sub_c"]  # last read with a correction and a top-up in flight

        clock.tick(timedelta(hours=21))  # the first read of sub_a is now 24 hours old
        swept = bh.cycle()
    assert "sub_a" in balance_reads()
    assert (swept.customers[0].action, swept.customers[0].difference) == ("correct", Decimal("3.00"))
    assert len(bh.rows("select id from balance_observations where customer_id = 'cus_a'")) == 2


def test_a_comparison_made_while_our_transaction_was_invisible_is_no_baseline_for_skipping(bh):
    """Simulation seed 20036: a top-up forwarded but not yet visible in Moesif, and a comparison that agrees by
    coincidence. Once the top-up lands, the balances differ; Moesif must be read again to see it."""
    bh.configure(stripe_source="customer_balance")
    bh.customer(moesif_balance=20.0)
    bh.stripe.adjust_customer_balance("cus_M", -2000)
    bh.moesif.visibility_delay_seconds = 120
    with freeze_time(NOW) as clock:
        bh.cycle()  # observed, in sync
        bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW), id="pi_1")  # not credited on Stripe
        clock.tick(timedelta(hours=1))
        forwarded = bh.cycle()
        assert (forwarded.customers[0].forwarded, forwarded.customers[0].action) == (["credit 10.00 pi_1"], "in_sync")
        clock.tick(timedelta(minutes=15))  # landed, and past the settle delay
        after = bh.cycle()
    assert after.customers[0].moesif_reread
    assert (after.customers[0].action, after.customers[0].difference) == ("correct", Decimal("-10.00"))


@pytest.mark.parametrize("workers", [1, 2])
def test_customers_are_reconciled_side_by_side_and_reported_in_order(bh, workers):
    """With `moesif.max_concurrency` > 1 one customer's Moesif wait overlaps another's work: two balance reads
    meet at a barrier, which one thread alone could never reach."""
    bh.configure(stripe_source="customer_balance", moesif_concurrency=workers)
    for name in ("d", "a", "c", "b"):
        bh.customer(f"cus_{name}", moesif_balance=20.0, subscription=f"sub_{name}")
        bh.stripe.adjust_customer_balance(f"cus_{name}", -2000)
    both_waiting = threading.Barrier(2, timeout=2)
    read = bh.gateway.balance

    def read_when_another_is_reading(subscription_id):
        both_waiting.wait()
        return read(subscription_id)

    bh.gateway.balance = read_when_another_is_reading
    with freeze_time(NOW):
        result = bh.cycle()
    assert [c.customer_id for c in result.customers] == ["cus_a", "cus_b", "cus_c", "cus_d"]
    if workers == 1:
        assert all("BrokenBarrierError" in (c.error or "") for c in result.customers)
    else:
        assert result.failed == 0, result.failures
        assert [c.action for c in result.customers] == ["in_sync"] * 4


def test_dry_run_sends_and_writes_nothing(bh):
    bh.customer(moesif_balance=10.0, grant=5000)
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_1")
    with freeze_time(NOW):
        result = bh.cycle(dry_run=True)
    report = result.customers[0]
    assert report.forwarded == ["credit 10.00 pi_1"]
    assert report.action == "correct"
    assert bh.posts() == []
    for table in ("moesif_transactions", "balance_observations", "runs"):
        assert bh.rows(f"select count(*) from {table}")[0][0] == 0


@pytest.fixture
def product_logging():
    """Undo the product's logging setup after a test that configured it (it binds the stderr of that moment)."""
    yield configure_logging
    structlog.reset_defaults()


def test_a_bearer_prefixed_token_is_sent_once_and_never_logged(bh, product_logging, capsys):
    product_logging("DEBUG", "json", [MOESIF_TOKEN])  # inside the test: capsys swaps stderr after fixture setup
    bh.configure(token=f"Bearer {MOESIF_TOKEN}", stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_1")
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 0, result.failures
    assert {r.headers["authorization"] for r in bh.moesif.requests} == {f"Bearer {MOESIF_TOKEN}"}
    captured = capsys.readouterr()
    assert MOESIF_TOKEN not in captured.out + captured.err
    assert "moesif transaction sent" in captured.err


def test_moesif_429_with_retry_after_is_waited_out(bh):
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_1")
    bh.moesif.inject_fault("POST", "/v1/~/billing/reports/balance_transactions", 429, headers={"Retry-After": "1"})
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 0
    assert bh.moesif.balance("sub_M") == 10.0
    assert [tuple(r) for r in bh.rows("select state, outcome_unknown from moesif_transactions")] == [("sent", False)]


def test_a_lost_response_is_resent_with_the_same_id_and_flagged_when_moesif_deduplicates(bh):
    bh.configure(stripe_source="none", auto_correct=False, moesif_dedupes=True)
    bh.customer()
    bh.moesif.dedupe_transaction_ids = True
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_1")
    bh.moesif.inject_fault("POST", "/v1/~/billing/reports/balance_transactions", 503, after_apply=True)
    with freeze_time(NOW):
        result = bh.cycle()
    assert bh.moesif.balance("sub_M") == 10.0  # Moesif deduplicated the resend
    assert [p["transaction_id"] for p in bh.posts()] == ["pi_1", "pi_1"]
    assert any("outcome was unknown" in flag for flag in result.customers[0].flags)
    assert [tuple(r) for r in bh.rows("select state, outcome_unknown from moesif_transactions")] == [("sent", True)]


@pytest.mark.parametrize("applied", [True, False], ids=["lost-response", "refused-with-503"])
def test_an_unknown_outcome_is_never_resent_when_moesif_may_not_deduplicate(bh, applied):
    """The default: Moesif's handling of a repeated transaction_id is undocumented, so a POST that may have been
    applied is flagged, not resent; after the settle delay the comparison corrects it only if it never landed."""
    bh.customer(moesif_balance=0.0, grant=1000)
    bh.moesif.dedupe_transaction_ids = False
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_1")
    bh.moesif.inject_fault("POST", "/v1/~/billing/reports/balance_transactions", 503, after_apply=applied)
    with freeze_time(NOW) as clock:
        first = bh.cycle()
        assert any("not resent" in flag for flag in first.customers[0].flags)
        assert first.customers[0].action == ("in_sync" if applied else "settling")
        clock.tick(timedelta(minutes=15))
        later = bh.cycle()
    assert [p["transaction_id"] for p in bh.posts()][:1] == ["pi_1"]
    assert "pi_1" not in [p["transaction_id"] for p in bh.posts()][1:]
    assert bh.moesif.balance("sub_M") == 10.0  # credited once: by the top-up, or by the correction if it was lost
    assert later.customers[0].action == ("in_sync" if applied else "correct")
    top_up = bh.rows("select transaction_id, state, outcome_unknown from moesif_transactions order by id")[0]
    assert tuple(top_up) == ("pi_1", "sent", True)  # flagged for a person


def test_a_disputed_top_up_is_flagged_not_debited(bh):
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=2)), id="pi_1")
    with freeze_time(NOW) as clock:
        bh.cycle()
        bh.stripe.dispute_charge("pi_1")
        clock.tick(timedelta(hours=1))
        result = bh.cycle()
    assert [p["type"] for p in bh.posts()] == ["credit"]
    assert any("disputed" in flag for flag in result.customers[0].flags)


def test_one_failing_customer_does_not_stop_the_others(bh):
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer("cus_ok", subscription="sub_ok")
    bh.customer("cus_gone", subscription="sub_gone")
    bh.moesif.remove_subscription("sub_gone")
    for customer in ("cus_ok", "cus_gone"):
        bh.stripe.add_payment_intent(customer, 1000, created=ts(NOW - timedelta(hours=1)), id=f"pi_{customer}")
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 1 and "cus_gone" in result.failures[0]
    assert bh.moesif.balance("sub_ok") == 10.0


def test_a_correction_whose_outcome_is_unknown_blocks_another_until_it_settles(bh):
    bh.configure(moesif_dedupes=True)
    bh.customer(moesif_balance=42.0, grant=5000)
    bh.moesif.inject_fault("POST", "/v1/~/billing/reports/balance_transactions", 503, times=3)
    with freeze_time(NOW) as clock:
        first = bh.cycle()
        assert first.failed == 1  # the correction's outcome is unknown: it stays pending
        clock.tick(timedelta(minutes=2))
        second = bh.cycle()
    assert second.customers[0].action == "settling"
    assert len(bh.posts()) == 3  # the first cycle's attempts only; no second correction
    assert [tuple(r) for r in bh.rows("select kind, state from moesif_transactions")] == [("correction", "pending")]


def test_a_top_up_moesif_refused_is_forwarded_once_its_subscription_exists(bh):
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(hours=1)), id="pi_early")
    bh.moesif.remove_subscription("sub_M")  # Moesif has not heard of the subscription yet
    with freeze_time(NOW) as clock:
        assert bh.cycle().failed == 1
        bh.moesif.add_subscription("sub_M", "cus_M")
        clock.tick(timedelta(hours=1))
        assert bh.cycle().failed == 0
    assert bh.moesif.balance("sub_M") == 10.0
    assert [tuple(r) for r in bh.rows("select transaction_id, state from moesif_transactions")] == [
        ("pi_early", "sent")
    ]


def test_a_customer_whose_subscription_ended_still_gets_its_refund_forwarded(bh):
    """Found by the fault simulation: an ended subscription lost its Moesif account, so money moving after the
    cancellation (a refund, the last invoice) never reached Moesif."""
    bh.configure(stripe_source="none", auto_correct=False)
    bh.customer()
    bh.stripe.add_payment_intent("cus_M", 1000, created=ts(NOW - timedelta(days=2)), id="pi_1")
    with freeze_time(NOW) as clock:
        bh.cycle()
        bh.stripe.update_subscription("sub_M", status="canceled", ended_at=ts(NOW), canceled_at=ts(NOW))
        bh.stripe.add_refund("pi_1", created=ts(NOW + timedelta(hours=1)), id="re_1")
        clock.tick(timedelta(hours=2))
        result = bh.cycle()
    assert result.failed == 0, result.failures
    assert [(p["transaction_id"], p["type"]) for p in bh.posts()] == [("pi_1", "credit"), ("re_1", "debit")]
    assert bh.moesif.balance("sub_M") == 0.0


@pytest.mark.parametrize(
    "body",
    [b'{"balance": {"current_bal', {"balance": {}}, {"balance": {"current_balance": None}}, {"id": "sub_M"}],
    ids=["truncated", "no-current-balance", "null-balance", "no-balance-object"],
)
def test_an_unreadable_moesif_balance_is_an_error_never_a_zero_to_correct(bh, body):
    bh.customer(moesif_balance=10.0, grant=1000)
    bh.moesif.inject_fault("GET", "/v1/search/~/subscriptions/sub_M", 200, body=body, times=5)
    with freeze_time(NOW):
        result = bh.cycle()
    assert result.failed == 1
    assert "no readable balance" in result.failures[0] and "cus_M" in result.failures[0]
    assert bh.posts() == []  # nothing "corrected" from a balance nobody read


def test_a_top_up_recorded_while_waiting_on_the_moesif_budget_is_sent_after_the_process_is_killed(sandbox, tmp_path):
    """Killed while a recorded top-up waits for the client-side Moesif budget: no request for it ever left, so
    the next run must send it (before, it was taken as "outcome unknown", never sent: the money never arrived)."""
    customer_with_usage(sandbox, "cus_wait", value=0)
    subscription = next(s for s in sandbox.stripe.subscriptions.values() if s["customer"] == "cus_wait")
    sandbox.moesif.add_subscription(subscription["id"], "cus_wait", current_balance=0.0)
    for n, cents in enumerate([1000, 2000, 4000], start=1):
        sandbox.stripe.add_payment_intent("cus_wait", cents, id=f"pi_wait_{n}", created=ts(utc_now()) - 3600 + n)
    raw = sandbox.config_dict(f"sqlite:///{tmp_path / 'ledger.db'}")
    # One request a minute: the second top-up waits a minute for its slot, long enough to be killed waiting.
    raw["moesif"]["max_requests_per_minute"] = 1
    raw["balances"].update(stripe_source="none", auto_correct=False, settle_delay="0s")
    config = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(config)).returncode == 0
    ledger = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")

    def recorded() -> int:
        with ledger.connect() as connection:
            return connection.execute(text("select count(*) from moesif_transactions")).scalar_one()

    first = subprocess.Popen(command_line("reconcile-balances", "--config", str(config)), env=command_env())
    wait_until(lambda: recorded() == 2, what="the second top-up recorded, waiting for its Moesif slot")
    first.kill()
    first.wait()
    [sent_before_the_kill] = [t["transaction_id"] for t in sandbox.moesif.transactions]  # the second never left
    with ledger.connect() as connection:
        waiting = connection.execute(
            text("select transaction_id from moesif_transactions where transaction_id <> :sent"),
            {"sent": sent_before_the_kill},
        ).scalar_one()

    raw["moesif"]["max_requests_per_minute"] = 500
    write_config(config, raw)
    second = reconciler("reconcile-balances", "--config", str(config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{waiting} (recorded by an interrupted run, never sent)" in second.stdout
    assert sorted(t["transaction_id"] for t in sandbox.moesif.transactions) == ["pi_wait_1", "pi_wait_2", "pi_wait_3"]
    assert sandbox.moesif.balance(subscription["id"]) == 70.0  # each top-up credited exactly once
    with ledger.connect() as connection:
        rows = connection.execute(text("select transaction_id, state, outcome_unknown from moesif_transactions"))
        assert sorted(tuple(row) for row in rows) == [
            ("pi_wait_1", "sent", False),
            ("pi_wait_2", "sent", False),
            ("pi_wait_3", "sent", False),
        ]
    ledger.dispose()


def test_balance_cycles_share_the_job_lock_and_a_resolution_is_refused_while_one_runs(database_url):
    """`balances resolve` must not resend while a cycle compares that balance (it would correct the resend away)."""
    engine = make_engine(database_url)
    try:
        with (
            balance_job_lock(engine, exclusive=False),
            balance_job_lock(engine, exclusive=False),  # cycles side by side
            pytest.raises(BalanceJobBusyError, match="a balance cycle is running"),
            balance_job_lock(engine, exclusive=True),
        ):
            pass
        with balance_job_lock(engine, exclusive=True):  # released: free again
            waited = threading.Event()

            def cycle() -> None:
                with balance_job_lock(engine, exclusive=False):
                    waited.set()

            thread = threading.Thread(target=cycle)
            thread.start()
            assert not waited.wait(0.5)  # a cycle waits for the resolution
        thread.join(timeout=30)
        assert waited.is_set()
    finally:
        engine.dispose()
