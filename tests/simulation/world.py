"""Plays one scenario: the sandbox fakes over real HTTP, the real product on a real database, a frozen clock that
only the scenario (and the product's own sleeps) moves, and the scenario's faults.

A "crash" is `SimulatedCrash`, a BaseException the product's `except Exception` handlers cannot swallow: it
unwinds the job like a kill (open transactions roll back, nothing after the crash point runs), and the world
then builds a fresh product on the same database, as a restarted process would.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from unittest import mock

import psycopg
import structlog
from freezegun import freeze_time
from sqlalchemy import Engine, event, exc
from sqlalchemy.pool import Pool

from reconciler.app import App, build_app
from reconciler.clock import utc_now
from reconciler.config import Config, parse_config
from reconciler.ledger.backfill_checkpoints import Checkpoints
from reconciler.ledger.runs import RunLog
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.logs import configure_logging
from reconciler.metrics import NO_METRICS
from reconciler.upstream.errors import UpstreamError
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.upstream.rate_limit import RateLimiter
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.upstream.stripe_budget import StripeBudget
from reconciler.usage.backfill import Backfill, command_key
from reconciler.webhooks.inbox import WebhookInbox
from reconciler.webhooks.worker import WebhookWorker
from reconciler_sandbox.httpserver import DROP_CONNECTION, InjectedFault
from reconciler_sandbox.server import SANDBOX_MOESIF_TOKEN, SANDBOX_OPENMETER_TOKEN, SANDBOX_STRIPE_KEY, Sandbox
from tests.simulation.scenario import (
    GRACE,
    INVOICE_GRACE,
    METERS,
    ROUNDING,
    SETTLE_DELAY,
    Fault,
    Scenario,
    Step,
    SubscriptionPlan,
    periods_of,
    plan_period,
)

SECRETS = (SANDBOX_STRIPE_KEY, SANDBOX_OPENMETER_TOKEN, SANDBOX_MOESIF_TOKEN)
CLIENT_TIMEOUT = 0.25  # seconds, real time: a "timeout" fault holds its answer back longer than this
QUIET_CYCLES = 9  # fault-free cycles, 15 minutes apart, after the last step: every grace period runs out, and
# then more until a balance cycle sends nothing (at most as many again)


class SimulatedCrash(BaseException):
    """The process died here."""


def ts(instant: datetime) -> int:
    return int(instant.timestamp())


def reset_fakes(fakes: Sandbox) -> None:
    """The sandbox's fakes are started once per process (`Sandbox.start`) and reset for every seed."""
    fakes.stripe.reset()
    fakes.stripe.duplicate_identifier_response = "error"
    fakes.openmeter.reset()
    fakes.moesif.reset()


def simulation_config(fakes: Sandbox, database_url: str, scenario: Scenario) -> Config:
    """The sandbox's own config, with the simulation's meters, clients quick to time out and a scenario's choices."""
    meters = [
        {"stripe": stripe_target, "openmeter": om_meter, "rounding": ROUNDING}
        for stripe_target, om_meter, _, _ in METERS.values()
    ]
    raw = fakes.config_dict(database_url, meters)
    # One worker: the cycle runs in one thread, in order, so a seed replays exactly (fault order, clock ticks).
    raw["stripe"].update(
        max_network_retries=scenario.seed % 3,
        timeout_seconds=CLIENT_TIMEOUT,
        invoice_grace_period=f"{int(INVOICE_GRACE.total_seconds())}s",
        max_concurrency=1,
        summary_lag=f"{int(scenario.summary_lag.total_seconds())}s",
        meter_events=scenario.meter_events,
    )
    raw["openmeter"].update(max_retries=2, timeout_seconds=CLIENT_TIMEOUT, max_concurrency=1)
    raw["moesif"].update(
        max_retries=2,
        timeout_seconds=CLIENT_TIMEOUT,
        deduplicates_transaction_ids=scenario.product_trusts_dedupe,
        max_concurrency=1,
    )
    raw["balances"].update(max_auto_correction={"usd": 100000}, settle_delay=f"{int(SETTLE_DELAY.total_seconds())}s")
    raw["usage"].update(window_size="HOUR", grace_period=f"{int(GRACE.total_seconds())}s")
    raw["logging"] = {"level": "INFO", "format": "json"}
    return parse_config(raw)


class World:
    def __init__(self, scenario: Scenario, fakes: Sandbox, database_url: str):
        self.scenario = scenario
        self.fakes = fakes
        self.database_url = database_url
        self.config = simulation_config(fakes, database_url, scenario)
        self.hits: Counter[str] = Counter()  # fault classes that fired
        self.problems: list[str] = []  # what went wrong that no fault explains
        self.log = io.StringIO()
        self.app: App | None = None
        self.now: datetime = scenario.start
        self._applied: set[tuple[str, str]] = set()  # world changes already made (kind, id)
        self._period_index: dict[str, int] = {}  # subscription id -> which of its periods is current
        self.item_ids: dict[str, list[str]] = {}  # subscription id -> item ids, in plan order
        self._webhooks: list[dict[str, Any]] = []  # events Stripe would send, not yet delivered
        self._backfill_until: datetime | None = None  # set while a backfill is unfinished
        self._event_ids = itertools.count(1)
        self._crash: Callable[[str], None] = lambda point: None
        self._armed: list[tuple[Fault, InjectedFault]] = []  # this step's upstream faults
        self._in_backfill = False
        self._balance_at_rest = False
        self._step_faults: tuple[Fault, ...] = ()
        # The driver's own error, which SQLAlchemy wraps as it would a real lost connection.
        self._driver_error = (
            psycopg.OperationalError if database_url.startswith("postgresql") else sqlite3.OperationalError
        )

    # -- running ---------------------------------------------------------------------------------

    def run(self, then: Callable[[World], list[str]]) -> list[str]:
        """Play the scenario, then return `then(self)`, evaluated while the simulated clock still stands."""
        configure_logging("INFO", "json", SECRETS)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=self.log))
        with (
            freeze_time(self.scenario.start) as clock,
            mock.patch("time.sleep", lambda seconds: clock.tick(timedelta(seconds=max(0.0, seconds)))),
            # The budgets are tested on their own; here they would only move the frozen clock on by their waits.
            mock.patch.object(RateLimiter, "acquire", lambda limiter: 0.0),
            mock.patch.object(StripeBudget, "acquire", lambda budget, endpoint: 0.0),
            self._crash_points(),
        ):
            self._seed_upstreams()
            self.app = build_app(self.config)
            try:
                for number, step in enumerate(self.scenario.steps):
                    clock.move_to(step.at)
                    if number in self.scenario.async_rejections:
                        self.fakes.stripe.reject_asynchronously(reported=self.scenario.async_rejections[number])
                    self._play(step)
                for quiet in itertools.count(1):
                    clock.tick(timedelta(minutes=15))
                    self._play(Step(utc_now(), ("usage", "balance", "webhooks"), ()))
                    if quiet >= QUIET_CYCLES and (self._balance_at_rest or quiet >= 2 * QUIET_CYCLES):
                        break
                self.now = utc_now()
                for rejected in self.fakes.stripe.rejected_meter_events:
                    unreported = "_unreported" if rejected.unreported else ""
                    self.hits[f"stripe_async_rejection{unreported}"] += 1
            finally:
                self.app.close()
            return then(self)

    def _play(self, step: Step) -> None:
        self.now = step.at
        self._advance_upstreams(step.at)
        self._step_faults = step.faults
        self._arm(step.faults)
        try:
            jobs = list(step.jobs)
            if self._backfill_until is not None and "backfill" not in jobs:
                jobs.append("backfill")  # an interrupted backfill is run again until it finishes
            for job in jobs:
                self._run_job(job)
            self._run_job("readback")  # `run` reads back every few minutes: at every step here
        finally:
            for fake in (self.fakes.stripe, self.fakes.openmeter, self.fakes.moesif):
                fake.clear_faults()
            self._crash = lambda point: None
            for fault, injected in self._armed:
                self.hits[fault.kind] += injected.hits > 0  # counted only if a request actually met it
            self._armed = []

    def _run_job(self, job: str) -> None:
        assert self.app is not None
        try:
            if job == "usage":
                result = self.app.usage_sync.run_cycle()
                self._unexplained("usage", result.summary.failures)
            elif job == "balance":
                assert self.app.balance_sync is not None
                balances = self.app.balance_sync.run_cycle()
                self._unexplained("balance", balances.failures)
                # At rest: nothing was sent this cycle, so nothing is still on its way to Moesif.
                self._balance_at_rest = not any(customer.forwarded for customer in balances.customers)
            elif job == "webhooks":
                self._deliver_webhooks()
            elif job == "readback":
                found = self.app.read_back.run_cycle()
                self._unexplained("read-back", found.failures)
                if found.resent_customers:  # as the daemon does: a usage cycle for them at once
                    resent = self.app.usage_sync.run_cycle(customers=found.resent_customers, include_legacy=False)
                    self._unexplained("usage", resent.summary.failures)
            elif job == "backfill":
                # A backfill whose listing fails exits with the error (tested elsewhere); it is run again next step.
                with contextlib.suppress(UpstreamError):
                    self._backfill()
        except SimulatedCrash:
            self.app.close()
            self.app = build_app(self.config)  # a new process on the same database
        except exc.OperationalError as error:
            if "simulated connection loss" not in str(error):
                raise  # a real database error is a failure of the run

    def _unexplained(self, job: str, failures: list[str]) -> None:
        """Failures are expected under faults; a fault-free cycle must have none. (A read timeout there is a loaded
        machine, not the product: the invariants still hold it to account for what follows.)"""
        failures = [f for f in failures if "timed out" not in f]
        if failures and not self._step_faults:
            self.problems.append(f"{job} cycle at {utc_now().isoformat()} failed without a fault: {failures}")

    def _backfill(self) -> None:
        assert self.app is not None
        until = self._backfill_until = self._backfill_until or self.now
        since = self.scenario.start - timedelta(days=30)
        backfill = Backfill(
            self.app.usage_sync, Checkpoints(self.app.engine, utc_now), RunLog(self.app.engine, utc_now)
        )
        units = backfill.plan(since, until, frozenset(), frozenset())
        self._in_backfill = True
        try:
            backfill.run(units, command_key(since, until, frozenset(), frozenset()), dry_run=False)
        finally:
            self._in_backfill = False
        self._backfill_until = None

    def _deliver_webhooks(self) -> None:
        assert self.app is not None
        inbox = WebhookInbox(self.app.engine, utc_now)
        pending, self._webhooks = self._webhooks, []
        by_kind = {"period": [], "top_up": []}
        for body in pending:
            by_kind[body["_kind"]].append(body)
        # Meter events Stripe rejected asynchronously come as thin events, delivered like the period events (same
        # faults: a lost one leaves only the read-back to find the shortfall); the worker fetches each event's
        # details from the fake.
        by_kind["period"] += [{**thin, "_kind": "period"} for thin in self.fakes.stripe.flush_meter_error_reports()]
        for kind, events in by_kind.items():
            mode = self.scenario.webhooks[kind]
            if not events:
                continue
            if mode == "lost":
                self.hits["webhook_lost"] += len(events)
                continue
            if mode == "out_of_order":
                events.reverse()
                self.hits["webhook_out_of_order"] += len(events) > 1
            for body in events:
                payload = {k: v for k, v in body.items() if k != "_kind"}
                for _ in range(2 if mode == "duplicate" else 1):
                    inbox.record(payload, "{}")
                self.hits["webhook_duplicate"] += mode == "duplicate"
        worker = WebhookWorker(
            inbox, lambda: self.app, UsageLedger(self.app.engine, utc_now), threading.Lock(), NO_METRICS
        )
        worker.work_off()

    # -- the upstream world ----------------------------------------------------------------------

    def _seed_upstreams(self) -> None:
        stripe, openmeter, moesif = self.fakes.stripe, self.fakes.openmeter, self.fakes.moesif
        moesif.dedupe_transaction_ids = self.scenario.moesif_dedupes
        moesif.visibility_delay_seconds = self.scenario.moesif_visibility_delay.total_seconds()
        self.hits["moesif_no_dedupe"] += not self.scenario.moesif_dedupes
        self.hits["moesif_slow_visibility"] += bool(self.scenario.moesif_visibility_delay)
        stripe.summary_lag_seconds = self.scenario.stripe_summary_lag.total_seconds()
        self.hits["stripe_summary_lag"] += bool(self.scenario.stripe_summary_lag)
        for kind, (stripe_target, om_meter, aggregation, formula) in METERS.items():
            openmeter.add_meter(om_meter, aggregation=aggregation, value_property=None if kind == "legacy" else "$.v")
            if formula is None:
                stripe.add_price(id=stripe_target, unit_amount=5)
            else:
                meter = stripe.add_meter(stripe_target, formula=formula, id=f"mtr_{kind}")
                for unit_amount, interval in itertools.product((1, 2, 5), ("month", "year")):
                    stripe.add_price(
                        meter=meter["id"],
                        unit_amount=unit_amount,
                        interval=interval,
                        id=_price(kind, unit_amount, interval),
                    )
        for plan in self.scenario.subscriptions:
            stripe.add_customer(id=plan.customer)
            start, end = plan_period(plan, 0)
            prices = [
                METERS[item.kind][0] if item.kind == "legacy" else _price(item.kind, item.unit_amount, plan.interval)
                for item in plan.items
            ]
            subscription = stripe.add_subscription(
                plan.customer,
                prices,
                id=plan.id,
                status=plan.status,
                current_period_start=ts(start),
                current_period_end=ts(end),
            )
            stripe.update_subscription(plan.id, billing_cycle_anchor=ts(plan.anchor))
            self._period_index[plan.id] = 0
            self.item_ids[plan.id] = [item["id"] for item in subscription["items"]["data"]]
            credit = self.scenario.credit_minor[plan.customer]
            if credit:
                stripe.add_credit_grant(
                    plan.customer, credit, effective_at=ts(self.scenario.start - timedelta(days=40))
                )
            moesif.add_subscription(plan.id, plan.customer, current_balance=credit / 100)
        if self.scenario.customers and not any(e.customer == self.scenario.customers[-1] for e in self.scenario.usage):
            self.hits["openmeter_subject_missing"] += 1

    def _advance_upstreams(self, now: datetime) -> None:
        """Everything that happened upstream up to `now`: rollovers, cancellations, price changes, usage arriving
        at OpenMeter, top-ups and refunds; and the webhooks Stripe sends for them."""
        stripe, openmeter = self.fakes.stripe, self.fakes.openmeter
        for plan in self.scenario.subscriptions:
            self._advance_subscription(plan, now)
            self._invoice(plan, now)
        for position, usage in enumerate(self.scenario.usage):
            key = ("usage", str(position))  # by position: two identical events are two events
            if usage.ingest_at <= now and key not in self._applied:
                self._applied.add(key)
                meter = METERS[usage.kind][1]
                openmeter.ingest(meter, usage.customer, usage.at, None if usage.kind == "legacy" else usage.value)
                if usage.ingest_at - usage.at > GRACE:
                    self.hits["openmeter_late_event"] += 1
        for top_up in self.scenario.top_ups:
            if top_up.at <= now and ("top_up", top_up.id) not in self._applied:
                self._applied.add(("top_up", top_up.id))
                intent = stripe.add_payment_intent(
                    top_up.customer, top_up.amount_minor, top_up.currency, id=top_up.id, created=ts(top_up.at)
                )
                stripe.add_credit_grant(
                    top_up.customer,
                    top_up.amount_minor,
                    currency=top_up.currency,
                    id=f"cg_{top_up.id}",
                    effective_at=ts(top_up.at),
                )
                self._webhook("top_up", "payment_intent.succeeded", intent)
            if top_up.refund_at and top_up.refund_at <= now and ("refund", top_up.id) not in self._applied:
                self._applied.add(("refund", top_up.id))
                stripe.add_refund(top_up.id, created=ts(top_up.refund_at), id=f"re_{top_up.id}")
                stripe.void_credit_grant(f"cg_{top_up.id}")

    def billed(self, plan: SubscriptionPlan, position: int, start: datetime, end: datetime) -> Decimal:
        """What Stripe bills for one item's period: its meter's aggregate, or its legacy usage records."""
        item, stripe = plan.items[position], self.fakes.stripe
        if item.kind == "legacy":
            records = stripe.usage_records.get(self.item_ids[plan.id][position], {})
            return Decimal(sum(q for t, q in records.items() if ts(start) <= t < ts(end)))
        return stripe.meter_total(plan.customer, METERS[item.kind][0], ts(start), ts(end))

    def unit_amount(self, plan: SubscriptionPlan, position: int) -> int:
        """The item's price per unit in cents now (after any price change), as Stripe holds it."""
        stripe = self.fakes.stripe
        return int(stripe.prices[stripe.subscription_items[self.item_ids[plan.id][position]]["price"]]["unit_amount"])

    def _invoice(self, plan: SubscriptionPlan, now: datetime) -> None:
        """Stripe finalizes a period's invoice an invoice grace period after it ends; the prepaid credit pays for
        the metered usage first."""
        for start, end in periods_of(plan, self.scenario.start, now):
            if end + INVOICE_GRACE <= now and ("invoice", f"{plan.id}@{start}") not in self._applied:
                self._applied.add(("invoice", f"{plan.id}@{start}"))
                amount = sum(
                    self.billed(plan, position, start, end) * self.unit_amount(plan, position)
                    for position in range(len(plan.items))
                )
                covered = self.fakes.stripe.consume_credit(plan.customer, int(amount)) if amount else 0
                by_card = self.scenario.plan_fee_minor + int(amount) - covered
                if self.scenario.plan_fee_minor and by_card > 0:
                    self._pay_invoice(plan, by_card, now)

    def _pay_invoice(self, plan: SubscriptionPlan, amount_minor: int, now: datetime) -> None:
        """The invoice's card payment, with the webhook Stripe sends for any succeeded PaymentIntent; sometimes
        partly refunded."""
        stripe = self.fakes.stripe
        invoice = stripe.pay_invoice(
            plan.customer, [("price_plan_fee", amount_minor)], subscription=plan.id, created=ts(now)
        )
        self._webhook("top_up", "payment_intent.succeeded", stripe.payment_intents[invoice["payment_intent"]])
        self.hits["invoice_payment"] += 1
        if self.scenario.invoice_refunds and len(stripe.invoices) % 2:
            stripe.add_refund(invoice["payment_intent"], amount_minor // 2 or None, created=ts(now))
            self.hits["invoice_refund"] += 1

    def _advance_subscription(self, plan: SubscriptionPlan, now: datetime) -> None:
        stripe = self.fakes.stripe
        if ("canceled", plan.id) in self._applied:
            return
        start, end = plan_period(plan, self._period_index[plan.id])
        while True:
            if plan.cancel_at and plan.cancel_at <= now and plan.cancel_at < end:
                self._applied.add(("canceled", plan.id))
                ended = stripe.update_subscription(
                    plan.id, status="canceled", canceled_at=ts(plan.cancel_at), ended_at=ts(plan.cancel_at)
                )
                self._webhook("period", "customer.subscription.deleted", ended)
                return
            if end > now:
                break
            self._period_index[plan.id] += 1
            start, end = plan_period(plan, self._period_index[plan.id])
            updated = stripe.update_subscription(plan.id, current_period_start=ts(start), current_period_end=ts(end))
            self._webhook("period", "customer.subscription.updated", updated, {"current_period_start": ts(start)})
            self._webhook("period", "invoice.created", {"id": f"in_{plan.id}_{ts(start)}", "customer": plan.customer})
        first = plan.items[0]
        if plan.price_change_at and plan.price_change_at <= now and ("price", plan.id) not in self._applied:
            self._applied.add(("price", plan.id))
            if first.kind != "legacy":
                other = next(a for a in (1, 2, 5) if a != first.unit_amount)
                stripe.set_item_price(self.item_ids[plan.id][0], _price(first.kind, other, plan.interval))

    def _webhook(self, kind: str, type_: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        data: dict[str, Any] = {"object": obj}
        if previous is not None:
            data["previous_attributes"] = previous
        self._webhooks.append({"_kind": kind, "id": f"evt_sim{next(self._event_ids)}", "type": type_, "data": data})

    # -- faults ----------------------------------------------------------------------------------

    def _arm(self, faults: tuple[Fault, ...]) -> None:
        crashes: list[Fault] = []
        for fault in faults:
            if fault.kind.startswith(("crash", "db_")):
                crashes.append(fault)
            else:
                self._inject(fault)
        counters: Counter[str] = Counter()

        def crash(point: str) -> None:
            for fault in crashes:
                if _crash_point(fault) == point:
                    counters[point] += 1
                    if counters[point] == fault.nth:
                        self.hits[fault.kind] += 1
                        if fault.kind == "db_connection_lost":
                            raise self._driver_error("simulated connection loss")
                        raise SimulatedCrash(f"{fault.kind} at {point} #{fault.nth}")

        self._crash = crash

    def _inject(self, fault: Fault) -> None:
        method, path = fault.target.split(" ", 1)
        if path == "/v1/billing/meter_events" and self.scenario.meter_events == "v2_stream":
            path = "/v2/billing/meter_event_stream"  # the same fault, where this seed's meter events go
        fake = {"stripe": self.fakes.stripe, "openmeter": self.fakes.openmeter, "moesif": self.fakes.moesif}[
            fault.kind.split("_", 1)[0]
        ]
        times = 1 + fault.nth % 2
        kind = fault.kind.split("_", 1)[1]
        options: dict[str, Any] = {
            "429_retry_after": {"status": 429, "headers": {"Retry-After": "2"}},
            "429_should_retry": {"status": 429, "headers": {"Stripe-Should-Retry": "true"}},
            "429_bare": {"status": 429},
            "429": {"status": 429, "headers": {"Retry-After": "1"}},
            "5xx": {"status": 503 if fault.nth % 2 else 500},
            "5xx_after_apply": {"status": 502, "after_apply": True},
            "timeout": {"status": 504, "after_apply": True, "delay_seconds": CLIENT_TIMEOUT * 2},
            "dropped_after_apply": {"status": DROP_CONNECTION, "after_apply": True},
            "lost_response": {"status": 500, "after_apply": True},
            "malformed_json": {"status": 200, "after_apply": True, "body": b'{"object": "list", "data": [{"id'},
        }[kind]
        self._armed.append((fault, fake.inject_fault(method, path, times=times, **options)))

    @contextlib.contextmanager
    def _crash_points(self) -> Iterator[None]:
        """Crash points: just before and just after every upstream write, and at every ledger write."""
        world = self

        def around(real: Callable[..., Any], name: str) -> Callable[..., Any]:
            def wrapper(gateway: Any, *args: Any, **kwargs: Any) -> Any:
                world._crash(f"before {name}")
                outcome = real(gateway, *args, **kwargs)
                world._crash(f"after {name}")
                return outcome

            return wrapper

        def waiting_on_budget(real: Callable[..., Any]) -> Callable[..., Any]:
            # The limiter is switched off in the simulation (see `run`); a request that records its attempt once
            # the budget lets it go (`before_send`) can die here, before it is recorded and before it leaves.
            def wrapper(gateway: Any, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("before_send") is not None:
                    world._crash("waiting on the moesif budget")
                return real(gateway, *args, **kwargs)

            return wrapper

        def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
                world._crash("ledger write")
                if world._in_backfill:
                    world._crash("backfill ledger write")

        patches = [
            mock.patch.object(StripeGateway, "send_meter_event", around(StripeGateway.send_meter_event, "stripe")),
            mock.patch.object(StripeGateway, "send_usage_record", around(StripeGateway.send_usage_record, "stripe")),
            mock.patch.object(
                StripeGateway, "send_meter_event_batch", around(StripeGateway.send_meter_event_batch, "stripe")
            ),
            mock.patch.object(MoesifGateway, "post_transaction", around(MoesifGateway.post_transaction, "moesif")),
            mock.patch.object(MoesifGateway, "_request", waiting_on_budget(MoesifGateway._request)),
        ]
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            event.listen(Engine, "before_cursor_execute", on_statement)
            stack.callback(event.remove, Engine, "before_cursor_execute", on_statement)
            # A simulated crash kills the process, not the machine: SQLite need not wait for the disk.
            event.listen(Pool, "connect", _no_fsync)
            stack.callback(event.remove, Pool, "connect", _no_fsync)
            yield


def _no_fsync(connection: Any, record: Any) -> None:
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA synchronous=OFF")


def _price(kind: str, unit_amount: int, interval: str) -> str:
    return f"price_{kind}_{unit_amount}_{interval}"


def _crash_point(fault: Fault) -> str:
    if fault.kind == "crash_mid_backfill":
        return "backfill ledger write"
    if fault.kind == "crash_before_send":
        return f"before {fault.target}"
    if fault.kind == "crash_after_send":
        return f"after {fault.target}"
    if fault.kind == "crash_waiting_on_moesif_budget":
        return "waiting on the moesif budget"
    return "ledger write"
