"""What must hold after every run, checked against the fakes' own state and an oracle computed from the scenario
(never from the product's code): the billed quantity of each period, each top-up credited once, the ledger
agreeing with what the fakes hold, nothing left pending, and no secret in any log line."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from reconciler.balances.drift import UNCORRECTED
from reconciler.ledger.schema import LateDrift, UsagePeriod
from reconciler.usage.readback import NEEDS_A_PERSON as READBACK_NEEDS_A_PERSON
from tests.simulation.scenario import GRACE, INVOICE_GRACE, METERS, Scenario, SubscriptionPlan, periods_of
from tests.simulation.world import SECRETS, World


def check(world: World) -> list[str]:
    problems = list(world.problems)
    engine = create_engine(world.database_url)
    try:
        with engine.connect() as connection:
            ledger = Ledger(connection)
            problems += _usage(world, ledger)
            problems += _money(world, ledger)
            problems += _nothing_left_pending(ledger)
    finally:
        engine.dispose()
    problems += _no_secrets(world.log.getvalue())
    return problems


class Ledger:
    def __init__(self, connection):
        self.connection = connection
        self.session = Session(connection)

    def rows(self, sql: str, **params) -> list:
        return list(self.connection.execute(text(sql), params))

    def period(self, stream_key: str, start: datetime) -> UsagePeriod | None:
        return self.session.scalars(
            select(UsagePeriod).where(UsagePeriod.stream_key == stream_key, UsagePeriod.period_start == start)
        ).first()

    def latest_drift(self, period: UsagePeriod | None) -> tuple[int, int] | None:
        if period is None:
            return None
        drift = self.session.scalars(
            select(LateDrift).where(LateDrift.period_id == period.id).order_by(LateDrift.id.desc())
        ).first()
        return (drift.reported_total, drift.observed_total) if drift else None

    def identifiers(self, period: UsagePeriod | None) -> set[str]:
        if period is None:
            return set()
        return {row[0] for row in self.rows("select identifier from usage_reports where period_id = :p", p=period.id)}


def _hour_floor(instant: datetime) -> datetime:
    return instant.replace(minute=0, second=0, microsecond=0)


def expected_total(scenario: Scenario, kind: str, customer: str, start: datetime, end: datetime, now: datetime) -> int:
    """OpenMeter's total over the period's hour-rounded window as of `now`, rounded up, from the scenario."""
    values = [
        e.value
        for e in scenario.usage
        if e.kind == kind
        and e.customer == customer
        and _hour_floor(start) <= e.at < _hour_floor(end)
        and e.ingest_at <= now
    ]
    aggregation = METERS[kind][2]
    if aggregation == "COUNT":
        total = Decimal(len(values))
    elif aggregation == "MAX":
        total = max(values, default=Decimal(0))
    else:
        total = sum(values, Decimal(0))
    return math.ceil(total)


def _usage(world: World, ledger: Ledger) -> list[str]:
    scenario, stripe = world.scenario, world.fakes.stripe
    problems = []
    # A `sum` event accepted twice is billed twice. (A `last` event resent after Stripe forgot its identifier sets
    # the same total again: harmless, and allowed.)
    identifiers = Counter(e.identifier for e in stripe.meter_events if e.event_name == METERS["sum"][0])
    rejected_identifiers = {e.identifier for e in stripe.rejected_meter_events}
    problems += [f"sum meter event {i} accepted {n} times" for i, n in identifiers.items() if n > 1]
    for plan in scenario.subscriptions:
        for position, item in enumerate(plan.items):
            for start, end in periods_of(plan, scenario.start, world.now):
                expected = expected_total(scenario, item.kind, plan.customer, start, min(end, world.now), world.now)
                stream = stream_key(world, plan, position)
                billed = world.billed(plan, position, start, end)
                where = f"{plan.customer} {item.kind} period {start.isoformat()}..{end.isoformat()}"
                period = ledger.period(stream, start)
                # Stripe rejected one of our events after accepting it: until the invoice closes the read-back may
                # still find and resend it; after that it must have been resent, or a person told.
                rejected = bool(ledger.identifiers(period) & rejected_identifiers)
                finding = period.read_back_finding if period is not None else None
                told = finding in READBACK_NEEDS_A_PERSON
                if told and not rejected:
                    problems.append(f"{where}: read-back said {finding} though Stripe rejected none of our events")
                excused = told or (rejected and end + INVOICE_GRACE > world.now)
                if billed != expected and not excused:
                    closed = end + GRACE <= world.now
                    if not (closed and ledger.latest_drift(period) == (billed, expected)):
                        problems.append(f"{where}: Stripe bills {billed}, OpenMeter measured {expected}, no late drift")
                if period is not None and period.reported_total != billed and not excused:
                    problems.append(f"{where}: ledger says {period.reported_total} reported, Stripe holds {billed}")
                if period is None and billed:
                    problems.append(f"{where}: Stripe holds {billed} the ledger has no period for")
                long_closed = end + GRACE + INVOICE_GRACE + timedelta(minutes=30) < world.now
                if period is not None and long_closed and period.status != "final":
                    problems.append(f"{where}: still {period.status} long after its grace period")
    return problems


def stream_key(world: World, plan: SubscriptionPlan, position: int) -> str:
    kind = plan.items[position].kind
    return f"legacy:{world.item_ids[plan.id][position]}" if kind == "legacy" else f"meter:mtr_{kind}:{plan.customer}"


def _money(world: World, ledger: Ledger) -> list[str]:
    scenario, moesif, stripe = world.scenario, world.fakes.moesif, world.fakes.stripe
    problems = []
    applied = Counter(t["transaction_id"] for t in moesif.transactions if t["applied"])
    problems += [f"moesif transaction {i} applied {n} times" for i, n in applied.items() if n > 1]
    unknown = {row[0] for row in ledger.rows("select transaction_id from moesif_transactions where outcome_unknown")}
    posted = {r.params.get("transaction_id") for r in moesif.requests if r.method == "POST"}
    # "Outcome unknown" is for a request that left; one that never did (the process died first) must be sent.
    problems += [f"{i} flagged as outcome unknown, but no request for it ever left" for i in sorted(unknown - posted)]
    held = {row[0] for row in ledger.rows("select transaction_id from moesif_transactions where state = 'held'")}
    # An invoice payment settles a bill: crediting it (or debiting its refund) in Moesif is never right.
    paid_invoices = {p["payment"]["payment_intent"] for p in stripe.invoice_payments.values()}
    invoice_refunds = {r["id"] for r in stripe.refunds.values() if r["payment_intent"] in paid_invoices}
    problems += [f"invoice payment {i} was sent to Moesif" for i in sorted(posted & (paid_invoices | invoice_refunds))]
    for top_up in scenario.top_ups:
        for transaction_id, due in ((top_up.id, top_up.at), (f"re_{top_up.id}", top_up.refund_at)):
            if due is None or due > world.now:
                continue
            if top_up.currency != "usd":  # Moesif counts usd: this money must wait for a person, never be sent
                if applied[transaction_id] or transaction_id not in held:
                    problems.append(f"{transaction_id} in {top_up.currency}: applied or not held for a person")
                continue
            if applied[transaction_id] == 0 and transaction_id not in unknown:
                problems.append(f"{transaction_id} ({top_up.customer}) never reached Moesif and nobody was told")
            if applied[transaction_id] == 0 and scenario.product_trusts_dedupe:
                problems.append(f"{transaction_id} ({top_up.customer}) not applied though resending was safe")
    for plan in scenario.subscriptions:
        credit = stripe.credit_available(plan.customer)
        open_usage = 0
        for position in range(len(plan.items)):
            for start, end in periods_of(plan, scenario.start, world.now):
                if end > world.now - INVOICE_GRACE:
                    period = ledger.period(stream_key(world, plan, position), start)
                    open_usage += (period.reported_total if period else 0) * world.unit_amount(plan, position)
        expected = Decimal(credit - open_usage) / 100
        balance = Decimal(str(moesif.balance(plan.id)))
        last = ledger.rows(
            "select action from balance_observations where customer_id = :c order by id desc limit 1", c=plan.customer
        )
        told_a_person = bool(last) and last[0][0] in UNCORRECTED
        if abs(balance - expected) > Decimal("0.01") and not told_a_person:
            problems.append(
                f"{plan.customer}: Moesif balance {balance}, Stripe credit minus open usage {expected} "
                f"(credit {credit}, open usage {open_usage})"
            )
    return problems


def _nothing_left_pending(ledger: Ledger) -> list[str]:
    problems = []
    for table, condition in (
        ("usage_reports", "state = 'pending'"),
        ("moesif_transactions", "state = 'pending'"),
        ("webhook_events", "state = 'pending' and attempts > 0"),
        ("work_items", "state <> 'done'"),
    ):
        count = ledger.rows(f"select count(*) from {table} where {condition}")[0][0]
        if count:
            problems.append(f"{count} rows of {table} left with {condition}")
    return problems


def _no_secrets(log: str) -> list[str]:
    return [f"a secret ({secret[:6]}…) reached the log" for secret in SECRETS if secret in log]
