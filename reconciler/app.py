"""Wiring: build the engine, ledger, upstream gateways and jobs from one validated config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from sqlalchemy import Engine

from reconciler.balances.job import BalanceSync
from reconciler.clock import utc_now
from reconciler.config import Config
from reconciler.ledger.backfill_checkpoints import Checkpoints
from reconciler.ledger.balance_ledger import BalanceLedger
from reconciler.ledger.database import check_reachable, make_engine, require_migrated
from reconciler.ledger.listing import ListingLedger
from reconciler.ledger.meter_cache import MeterCache
from reconciler.ledger.plan_ledger import PlanLedger
from reconciler.ledger.readback_ledger import ReadBackLedger, SentEventLog
from reconciler.ledger.runs import RunLog
from reconciler.ledger.unbilled import UnbilledLedger
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.plans.job import PlanSync
from reconciler.upstream.app_api import EntitlementsGateway
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.rate_limit import RateLimiter
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.upstream.stripe_budget import StripeBudget
from reconciler.usage.backfill import Backfill
from reconciler.usage.job import UsageSync
from reconciler.usage.readback import ReadBack, ReadBackResult
from reconciler.usage.stripe_view import StripeView


@dataclass
class App:
    config: Config
    engine: Engine
    stripe: StripeGateway  # for the webhook worker's reads of thin events
    usage_sync: UsageSync
    read_back: ReadBack
    balance_sync: BalanceSync | None  # None unless balances.enabled
    plan_sync: PlanSync | None  # None unless plans.enabled
    openmeter: OpenMeterGateway
    limiters: list[RateLimiter | StripeBudget]  # the request budgets of each upstream API
    owns_engine: bool = True  # False when built on the daemon's engine, which outlives its apps

    def share_budgets(self, replicas: int) -> None:
        """Live replicas split every upstream API's request budget."""
        for limiter in self.limiters:
            limiter.share(replicas)

    def read_back_and_resend(self, usage_lock: AbstractContextManager[object] | None = None) -> ReadBackResult:
        """A read-back cycle, then at once a usage cycle (under `usage_lock`, which keeps usage cycles apart) for the
        customers with a period reopened for a resend."""
        result = self.read_back.run_cycle()
        if result.resent_customers:
            with usage_lock or nullcontext():
                self.usage_sync.run_cycle(customers=result.resent_customers, include_legacy=False)
        return result

    def close(self) -> None:
        """Every HTTP client the app's jobs opened (Stripe, OpenMeter, Moesif, the app's API), and its engine if
        it owns it."""
        self.stripe.close()
        self.openmeter.close()
        if self.balance_sync is not None:
            self.balance_sync.close()
        if self.plan_sync is not None:
            self.plan_sync.close()
        if self.owns_engine:
            self.engine.dispose()


def open_database(config: Config) -> Engine:
    """An engine on the configured database, refusing one that cannot be reached or that `reconciler db upgrade`
    has not migrated."""
    engine = make_engine(config.database.url, pool_size=config.connections_needed())
    try:
        check_reachable(engine)
        require_migrated(engine)
    except Exception:
        engine.dispose()
        raise
    return engine


@contextmanager
def opened_app(config: Config) -> Iterator[App]:
    """The wired application for one command, closed afterwards."""
    app = build_app(config)
    try:
        yield app
    finally:
        app.close()


@contextmanager
def opened_ledger(config: Config, *, migrated: bool = True) -> Iterator[Engine]:
    """The ledger's engine (refused unless reachable and, unless told otherwise, migrated), disposed of afterwards."""
    engine = open_database(config) if migrated else make_engine(config.database.url)
    try:
        yield engine
    finally:
        engine.dispose()


def build_app(
    config: Config,
    stop_requested: Callable[[], bool] = lambda: False,
    *,
    engine: Engine | None = None,
    metrics: Metrics = NO_METRICS,
) -> App:
    """Everything a command needs, on `engine` if given (a reload keeps the daemon's), else a new one."""
    owns_engine = engine is None
    engine = engine or open_database(config)
    runs = RunLog(engine, utc_now)
    stripe = StripeGateway(config.stripe, metrics)
    openmeter = OpenMeterGateway(config.openmeter, metrics)
    limiters: list[RateLimiter | StripeBudget] = [stripe.budget, openmeter.limiter]
    usage_sync = UsageSync(
        config,
        stripe,
        openmeter,
        UsageLedger(engine, utc_now),
        runs,
        clock=utc_now,
        meter_cache=MeterCache(engine, utc_now),
        stop_requested=stop_requested,
        metrics=metrics,
        unbilled=UnbilledLedger(engine, utc_now),
        listings=ListingLedger(engine, utc_now),
    )
    read_back = ReadBack(
        config,
        StripeView(SentEventLog(engine), stripe),
        ReadBackLedger(engine, utc_now),
        runs,
        utc_now,
        stop_requested=stop_requested,
        metrics=metrics,
    )
    balance_sync = None
    if config.balances.enabled:
        assert config.moesif is not None  # guaranteed by Config.cross_field_problems
        moesif = MoesifGateway(config.moesif, metrics=metrics)
        limiters.append(moesif.limiter)
        balance_sync = BalanceSync(
            config,
            stripe,
            moesif,
            BalanceLedger(engine, utc_now),
            runs,
            clock=utc_now,
            stop_requested=stop_requested,
            metrics=metrics,
        )
    plan_sync = None
    if config.plans.enabled:
        plan_sync = PlanSync(
            config, stripe, EntitlementsGateway(config.plans, metrics), PlanLedger(engine, utc_now), runs
        )
    return App(
        config=config,
        engine=engine,
        stripe=stripe,
        usage_sync=usage_sync,
        read_back=read_back,
        balance_sync=balance_sync,
        plan_sync=plan_sync,
        openmeter=openmeter,
        limiters=limiters,
        owns_engine=owns_engine,
    )


def open_backfill(app: App) -> Backfill:
    """The backfill on a built app's usage job and ledger."""
    return Backfill(app.usage_sync, Checkpoints(app.engine, utc_now), RunLog(app.engine, utc_now))
