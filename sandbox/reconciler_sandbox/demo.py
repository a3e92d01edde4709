"""`reconciler demo`: the product working end to end in one command, on the built-in sandbox.

It starts the Stripe, OpenMeter and Moesif fakes on loopback, seeds three customers (a `sum` meter, a `last`
meter and a legacy metered price, each with prepaid credit), and runs against a temporary SQLite ledger:
three usage sync cycles (the period-to-date totals, then only what changed, then nothing at all), two
balance cycles (a lost top-up forwarded and a drift corrected, then everything in sync), and two plan syncs
(every user's plan, then only a downgrade).
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from rich.console import Console

from reconciler.app import build_app
from reconciler.balances.render import balance_table
from reconciler.clock import utc_now
from reconciler.config import parse_config
from reconciler.ledger.database import make_engine, upgrade
from reconciler.logs import configure_logging
from reconciler.output import table
from reconciler.usage.job import CycleResult
from reconciler_sandbox.seed import seed_sandbox
from reconciler_sandbox.server import Sandbox


def run_demo(console: Console) -> int:
    sandbox = Sandbox.start()
    try:
        with tempfile.TemporaryDirectory(prefix="reconciler-demo-") as tmp:
            return _demo(console, sandbox, Path(tmp) / "ledger.db")
    finally:
        sandbox.stop()


def _demo(console: Console, sandbox: Sandbox, database: Path) -> int:
    configure_logging("WARNING", "console")
    config = parse_config(sandbox.config_dict(f"sqlite:///{database}", plans=True))
    engine = make_engine(config.database.url)
    upgrade(engine)
    engine.dispose()
    seeded = seed_sandbox(sandbox.stripe, sandbox.openmeter, sandbox.moesif, utc_now())
    console.print(
        f"[bold]Sandbox[/bold]: Stripe at {sandbox.stripe_server.url}, OpenMeter at {sandbox.openmeter_server.url}, "
        f"ledger {database}\nBilling period {seeded['period_start']:%Y-%m-%d %H:%M} → "
        f"{seeded['period_end']:%Y-%m-%d %H:%M} UTC for {', '.join(seeded['customers'])}\n"
    )
    app = build_app(config)
    try:
        steps = [
            ("Cycle 1: report each customer's period-to-date total", None),
            (
                "Cycle 2: a late batch of usage arrived; sum meters get the difference, the others the new total",
                _late_batch,
            ),
            ("Cycle 3: nothing changed; Stripe is not called at all", None),
        ]
        failed = False
        for title, before in steps:
            if before:
                before(sandbox)
            sent_before = _sent_count(sandbox)
            result = app.usage_sync.run_cycle()
            failed |= not result.ok
            console.print(f"[bold]{title}[/bold]")
            _print_cycle(console, result, sandbox, sent_before)
        console.print("Every total above equals OpenMeter's, however often the cycle runs: that is set semantics.\n")

        _moesif_burns_usage(sandbox, seeded)
        assert app.balance_sync is not None
        for title in (
            "Balance cycle 1: globex's lost top-up is forwarded, acme's paid $49 plan invoice is left alone (Stripe's "
            "InvoicePayments say it paid a bill); Moesif lost $20 of acme's credit, so it is corrected",
            "Balance cycle 2: they agree; nothing is sent, and Moesif is not even asked about unchanged initech",
        ):
            balance = app.balance_sync.run_cycle()
            failed |= bool(balance.failed)
            console.print(f"[bold]{title}[/bold]")
            balance_table(balance, console)
            console.print()
        _print_invoice_payments(console, sandbox)

        assert app.plan_sync is not None
        for title, before in (
            ("Plan sync 1: the app learns each user's plan from Stripe", None),
            ("Plan sync 2: acme downgraded from pro to starter in Stripe; only that change is sent", _downgrade),
        ):
            if before:
                before(sandbox)
            sent_before = len(sandbox.app.updates)
            plans = app.plan_sync.run_cycle()
            failed |= bool(plans.failed)
            console.print(f"[bold]{title}[/bold]")
            for update in sandbox.app.updates[sent_before:]:
                console.print(f"  POST {update}", markup=False)
            console.print(", ".join(f"{k} {v}" for k, v in plans.summary().items()) + "\n", markup=False)
    finally:
        app.close()
    return 1 if failed else 0


def _print_invoice_payments(console: Console, sandbox: Sandbox) -> None:
    """Each invoice payment the sandbox holds, and whether it reached Moesif (it must not)."""
    sent = {json.loads(r.body)["transaction_id"] for r in sandbox.moesif.requests if r.method == "POST"}
    for payment in sandbox.stripe.invoice_payments.values():
        paid_with = payment["payment"]["payment_intent"]
        fate = "credited to Moesif (wrong!)" if paid_with in sent else "not forwarded: a bill paid, not a top-up"
        console.print(f"invoice {payment['invoice']} paid by {paid_with}: {fate}\n", markup=False)


def _downgrade(sandbox: Sandbox) -> None:
    stripe = sandbox.stripe
    for item_id, item in list(stripe.subscription_items.items()):
        subscription = stripe.subscriptions[item["subscription"]]
        if subscription["customer"] == "cus_sandbox_acme" and item["price"] == "price_sandbox_pro":
            stripe.set_item_price(item_id, "price_sandbox_starter")


def _moesif_burns_usage(sandbox: Sandbox, seeded: dict) -> None:
    """Moesif burns prepaid credit as usage arrives (Stripe only applies it at invoice time); and, to show
    drift being found, Moesif loses $20 of acme's credit."""
    start, end = int(seeded["period_start"].timestamp()), int(seeded["period_end"].timestamp())
    stripe = sandbox.stripe
    for subscription in stripe.subscriptions.values():
        customer = subscription["customer"]
        items = [i for i in stripe.subscription_items.values() if i["subscription"] == subscription["id"]]
        prices = [stripe.prices[item["price"]] for item in items]
        if not any(price["recurring"]["usage_type"] == "metered" for price in prices):
            continue  # plan subscriptions: nothing for Moesif to burn
        cost = Decimal(0)
        for item, price in zip(items, prices, strict=True):
            meter_id = price["recurring"]["meter"]
            if meter_id:
                quantity = stripe.meter_total(customer, stripe.meters[meter_id]["event_name"], start, end)
            else:
                quantity = Decimal(stripe.usage_record_total(item["id"]))
            cost += quantity * Decimal(price["unit_amount"]) / 100
        lost = Decimal(20) if customer == "cus_sandbox_acme" else Decimal(0)
        sandbox.moesif.consume(subscription["id"], float(cost + lost))


def _late_batch(sandbox: Sandbox) -> None:
    now = utc_now()
    sandbox.openmeter.ingest("api_requests", "cus_sandbox_acme", now - timedelta(hours=5), 250)
    sandbox.openmeter.ingest("storage_gb", "cus_sandbox_globex", now - timedelta(hours=3), 42.2)
    for hours in (4, 5, 6):
        sandbox.openmeter.ingest("sms_sent", "cus_sandbox_initech", now - timedelta(hours=hours, minutes=10), 1)


def _sent_count(sandbox: Sandbox) -> int:
    return len(_writes(sandbox))


def _writes(sandbox: Sandbox) -> list:
    return [
        r
        for r in sandbox.stripe.requests
        if r.method == "POST" and ("meter_events" in r.path or "usage_records" in r.path)
    ]


def _print_cycle(console: Console, result: CycleResult, sandbox: Sandbox, sent_before: int) -> None:
    calls = table(None, "customer", "Stripe call", "sent", header_style="bold")
    for request in _writes(sandbox)[sent_before:]:
        params = request.params
        if "meter_events" in request.path:
            meter = next(m for m in sandbox.stripe.meters.values() if m["event_name"] == params["event_name"])
            formula = meter["default_aggregation"]["formula"]
            calls.add_row(
                params["payload"]["stripe_customer_id"],
                f"meter event ({formula}) {params['event_name']}",
                params["payload"]["value"],
            )
        else:
            item = sandbox.stripe.subscription_items[request.path.split("/")[3]]
            customer = sandbox.stripe.subscriptions[item["subscription"]]["customer"]
            calls.add_row(customer, "usage record, action=set", params["quantity"])
    if calls.row_count:
        console.print(calls)
    s = result.summary
    console.print(
        f"seen {s.seen}, reported {s.reported}, unchanged {s.unchanged}, unmapped {s.unmapped}, failed {s.failed}\n"
    )
