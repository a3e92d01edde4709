"""Wiring: build the engine, ledger, upstream gateways and jobs from one validated config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from reconciler.balances.job import BalanceSync
from reconciler.clock import utc_now
from reconciler.config import Config
from reconciler.ledger.balance_ledger import BalanceLedger
from reconciler.ledger.database import make_engine, require_migrated
from reconciler.ledger.runs import RunLog
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.usage.job import UsageSync


@dataclass
class App:
    config: Config
    engine: Engine
    usage_sync: UsageSync
    balance_sync: BalanceSync | None  # None unless balances.enabled

    def close(self) -> None:
        if self.balance_sync is not None:
            self.balance_sync.close()
        self.engine.dispose()


def build_app(config: Config, stop_requested: Callable[[], bool] = lambda: False) -> App:
    """Everything a command needs. Refuses a database that `reconciler db upgrade` has not migrated."""
    engine = make_engine(config.database.url)
    try:
        require_migrated(engine)
    except Exception:
        engine.dispose()
        raise
    ledger = UsageLedger(engine, utc_now)
    usage_sync = UsageSync(
        config,
        StripeGateway(config.stripe),
        OpenMeterGateway(config.openmeter),
        ledger,
        RunLog(engine, utc_now),
        clock=utc_now,
        stop_requested=stop_requested,
    )
    balance_sync = None
    if config.balances.enabled:
        assert config.moesif is not None  # guaranteed by Config.cross_field_problems
        balance_sync = BalanceSync(
            config,
            StripeGateway(config.stripe),
            MoesifGateway(config.moesif),
            BalanceLedger(engine, utc_now),
            RunLog(engine, utc_now),
            clock=utc_now,
            stop_requested=stop_requested,
        )
    return App(config=config, engine=engine, usage_sync=usage_sync, balance_sync=balance_sync)
