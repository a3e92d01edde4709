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
from reconciler_sandbox.bench.measure import (
    Conditions,
    CycleMeasurement,
    apply_conditions,
    fresh_product,
    product_cycle,
)
from reconciler_sandbox.httpserver import FakeService
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
    cold_floor_seconds: float
    changed_floor_seconds: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cold_floor_ratio"] = round(self.cold.wall_seconds / self.cold_floor_seconds, 3)
        return data


def moesif_floor_seconds(requests: int, conditions: Conditions) -> float:
    return requests / (conditions.moesif_per_minute / 60)


def _config(sandbox: Sandbox, database: Path, conditions: Conditions) -> dict[str, Any]:
    raw = sandbox.config_dict(f"sqlite:///{database}")
    # One budget for every Stripe call, as the fake enforces here: Stripe's own structure (per endpoint, live meter
    # events apart: upstream/stripe_budget.py) is not benchmarked yet.
    raw["stripe"].update(
        limits="sandbox",
        max_requests_per_second=conditions.stripe_per_second,
        max_requests_per_second_per_endpoint=conditions.stripe_per_second,
    )
    raw["moesif"]["max_requests_per_minute"] = conditions.moesif_per_minute
    raw["balances"] = {"enabled": True, "stripe_source": "customer_balance", "auto_correct": False}
    raw["logging"] = {"level": "INFO", "format": "json"}
    return raw


def run_balance_size(customers: int, conditions: Conditions, workdir: Path) -> BalanceSizeResult:
    now = datetime.now(UTC)
    sandbox = Sandbox.start()
    try:
        apply_conditions(sandbox.stripe, conditions.stripe_latency, conditions.stripe_per_second)
        apply_conditions(sandbox.moesif, conditions.moesif_latency, conditions.moesif_per_minute / 60, window=60.0)
        seed_stripe(sandbox.stripe, customers, now)
        seed_balances(sandbox.stripe, sandbox.moesif, customers)

        config_path, log_path = fresh_product(
            workdir, f"bench-balances-{customers}", lambda db: _config(sandbox, db, conditions)
        )
        fakes: dict[str, FakeService] = {"stripe": sandbox.stripe, "moesif": sandbox.moesif}

        cold = product_cycle(config_path, log_path, fakes, "reconcile-balances")
        warm = product_cycle(config_path, log_path, fakes, "reconcile-balances")
        topped_up = top_up_some(sandbox.stripe, customers, TOP_UP_EVERY, now)
        changed = product_cycle(config_path, log_path, fakes, "reconcile-balances")
        return BalanceSizeResult(
            customers=customers,
            topped_up=topped_up,
            conditions=conditions,
            cold=cold,
            warm=warm,
            changed=changed,
            cold_floor_seconds=round(moesif_floor_seconds(customers, conditions), 3),
            changed_floor_seconds=round(moesif_floor_seconds(2 * topped_up, conditions), 3),  # a read and a POST
        )
    finally:
        sandbox.stop()
