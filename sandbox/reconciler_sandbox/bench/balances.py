"""Benchmark the balance job: N customers with credit on Stripe and an agreeing Moesif balance, under Moesif's
500 requests/minute. Three cycles in a row, each in a child process:

- cold: every customer is new, so every Moesif balance is read (the budget is the floor: N / 500 minutes);
- warm: nothing changed, so Moesif is not asked at all and Stripe only for its listings;
- changed: every 100th customer bought credit, so Moesif hears of each top-up once and is read for those only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler_sandbox.bench.dataset import seed_balances, seed_stripe, top_up_some
from reconciler_sandbox.bench.floor import Shape
from reconciler_sandbox.bench.measure import (
    SUBSCRIPTIONS,
    Conditions,
    CycleMeasurement,
    Upstreams,
    apply_conditions,
    apply_stripe_conditions,
    fresh_product,
    product_cycle,
    stripe_config,
)
from reconciler_sandbox.server import Sandbox

TOP_UP_EVERY = 100  # the changed cycle: one customer in a hundred bought credit


@dataclass
class BalanceSizeResult:
    customers: int
    topped_up: int
    conditions: Conditions
    cold: CycleMeasurement
    warm: CycleMeasurement
    changed: CycleMeasurement

    @property
    def cold_floor_seconds(self) -> float:
        return self.cold.limits.floor.seconds

    @property
    def within_limits(self) -> bool:
        return all(c.limits.within_limits for c in (self.cold, self.warm, self.changed))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cold_floor_seconds"] = self.cold_floor_seconds
        data["changed_floor_seconds"] = self.changed.limits.floor.seconds
        data["cold_floor_ratio"] = round(self.cold.floor_ratio, 3)
        data["within_limits"] = self.within_limits
        return data


def balance_shape(conditions: Conditions) -> Shape:
    """A balance cycle: Stripe's subscriptions page after page, Moesif with the product's requests in flight."""
    return Shape(in_flight={"moesif": conditions.moesif_concurrency}, paged=[("stripe", SUBSCRIPTIONS)])


def _config(sandbox: Sandbox, database: Path, conditions: Conditions) -> dict[str, Any]:
    raw = sandbox.config_dict(f"sqlite:///{database}")
    raw["stripe"].update(stripe_config(conditions))
    raw["moesif"]["max_requests_per_minute"] = conditions.moesif_per_minute
    raw["moesif"]["max_concurrency"] = conditions.moesif_concurrency
    raw["balances"] = {"enabled": True, "stripe_source": "customer_balance", "auto_correct": False}
    raw["logging"] = {"level": "INFO", "format": "json"}
    return raw


def run_balance_size(customers: int, conditions: Conditions, workdir: Path) -> BalanceSizeResult:
    now = datetime.now(UTC)
    sandbox = Sandbox.start()
    try:
        apply_stripe_conditions(sandbox.stripe, conditions)
        apply_conditions(sandbox.moesif, conditions.moesif_latency, conditions.moesif_per_minute / 60, window=60.0)
        seed_stripe(sandbox.stripe, customers, now)
        seed_balances(sandbox.stripe, sandbox.moesif, customers)

        config_path, log_path = fresh_product(
            workdir, f"bench-balances-{customers}", lambda db: _config(sandbox, db, conditions)
        )
        upstreams = Upstreams({"stripe": sandbox.stripe, "moesif": sandbox.moesif}, conditions)
        shape = balance_shape(conditions)

        cold = product_cycle(config_path, log_path, upstreams, shape, "reconcile-balances")
        warm = product_cycle(config_path, log_path, upstreams, shape, "reconcile-balances")
        topped_up = top_up_some(sandbox.stripe, customers, TOP_UP_EVERY, now)
        changed = product_cycle(config_path, log_path, upstreams, shape, "reconcile-balances")
        return BalanceSizeResult(
            customers=customers,
            topped_up=topped_up,
            conditions=conditions,
            cold=cold,
            warm=warm,
            changed=changed,
        )
    finally:
        sandbox.stop()
