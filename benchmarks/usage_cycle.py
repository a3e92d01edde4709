"""Benchmark: one usage sync cycle over N customers against the local sandbox (SQLite ledger).

    python benchmarks/usage_cycle.py --customers 1000 [--stripe-rps 20]

Prints wall time, upstream requests, requests per second and peak memory (RSS) for a first cycle (every
customer reported) and a second one (nothing changed: no Stripe writes). The sandbox answers in well under a
millisecond, so this measures the reconciler's own cost plus the request budget, not network latency.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from reconciler.app import build_app
from reconciler.clock import utc_now
from reconciler.config import parse_config
from reconciler.ledger.database import make_engine, upgrade
from reconciler.logs import configure_logging
from reconciler.sandbox.server import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--stripe-rps", type=float, default=1000, help="every Stripe budget (global and per endpoint)")
    args = parser.parse_args()
    configure_logging("ERROR", "console")
    sandbox = Sandbox.start()
    now = utc_now()
    meter = sandbox.stripe.add_meter("api_calls", formula="sum")
    price = sandbox.stripe.add_price(meter=meter["id"])
    sandbox.openmeter.add_meter("api_requests")
    period = {
        "current_period_start": int((now - timedelta(days=5)).timestamp()),
        "current_period_end": int((now + timedelta(days=25)).timestamp()),
    }
    for i in range(args.customers):
        customer = f"cus_bench_{i:06d}"
        sandbox.stripe.add_customer(id=customer)
        sandbox.stripe.add_subscription(customer, [price["id"]], **period)
        sandbox.openmeter.ingest("api_requests", customer, now - timedelta(days=1), i + 1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = sandbox.config_dict(
            f"sqlite:///{Path(tmp) / 'ledger.db'}", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}]
        )
        raw["balances"]["enabled"] = False
        raw["stripe"]["max_requests_per_second"] = args.stripe_rps
        raw["stripe"]["max_requests_per_second_per_endpoint"] = args.stripe_rps
        raw["openmeter"]["max_requests_per_second"] = 1000
        config = parse_config(raw)
        engine = make_engine(config.database.url)
        upgrade(engine)
        app = build_app(config, engine=engine)
        for label in ("first cycle (all reported)", "second cycle (unchanged)"):
            requests_before = len(sandbox.stripe.requests) + len(sandbox.openmeter.requests)
            started = time.perf_counter()
            result = app.usage_sync.run_cycle()
            elapsed = time.perf_counter() - started
            requests = len(sandbox.stripe.requests) + len(sandbox.openmeter.requests) - requests_before
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{label}: {args.customers} customers, {elapsed:.2f} s, {requests} requests "
                f"({requests / elapsed:.0f}/s), {args.customers / elapsed:.0f} customers/s, "
                f"reported {result.summary.reported}, failed {result.summary.failed}, peak RSS {peak_mb:.0f} MiB"
            )
        app.close()
    sandbox.stop()


if __name__ == "__main__":
    main()
