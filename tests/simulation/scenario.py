"""One seed -> one scenario: customers, subscriptions, usage, money, the clock's steps and the faults.

Pure: `generate(seed)` draws everything from `random.Random(seed)` and touches nothing, so the same seed is the
same scenario on every machine. The world (world.py) plays it against the sandbox fakes and the real product.
"""

from __future__ import annotations

import calendar
import itertools
import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

# Stripe meter event_name / legacy price id -> OpenMeter meter, as the simulation's config maps them.
METERS = {
    "sum": ("api_calls", "api_requests", "SUM", "sum"),
    "last": ("storage_gb", "storage_gb", "MAX", "last"),
    "legacy": ("price_legacy_sms", "sms_sent", "COUNT", None),
}
ROUNDING = "ceil"
GRACE = timedelta(minutes=30)  # usage.grace_period
INVOICE_GRACE = timedelta(hours=1)  # stripe.invoice_grace_period
SETTLE_DELAY = timedelta(minutes=10)  # balances.settle_delay

# Faults injected into one step, drawn per step.
STEP_FAULTS = (
    "stripe_429_retry_after",
    "stripe_429_should_retry",
    "stripe_429_bare",
    "stripe_5xx",
    "stripe_timeout",
    "stripe_dropped_after_apply",
    "stripe_lost_response",
    "stripe_malformed_json",
    "openmeter_5xx",
    "openmeter_timeout",
    "openmeter_malformed_json",
    "moesif_5xx",
    "moesif_5xx_after_apply",
    "moesif_429",
    "moesif_malformed_json",
    "crash_before_send",
    "crash_after_send",
    "crash_waiting_on_moesif_budget",  # a Moesif transaction recorded, its request not yet let out by the budget
    "crash_mid_transaction",
    "db_connection_lost",
)
# Faults the scenario itself holds (its usage, its webhooks, its Moesif) or that come with a backfill.
SCENARIO_FAULTS = (
    "openmeter_late_event",
    "openmeter_subject_missing",
    "moesif_slow_visibility",
    "stripe_summary_lag",
    "moesif_no_dedupe",
    "webhook_duplicate",
    "webhook_out_of_order",
    "webhook_lost",
    "crash_mid_backfill",
    "invoice_payment",  # a subscription invoice paid by card: a PaymentIntent that is no top-up
    "invoice_refund",
    "stripe_async_rejection",  # a meter event accepted, then rejected, and named in an error report
    "stripe_async_rejection_unreported",  # the same, named in no error report: only the read-back finds it
)
# Every fault class the harness knows; coverage is counted against this list.
FAULT_CLASSES = STEP_FAULTS + SCENARIO_FAULTS


@dataclass(frozen=True)
class ItemPlan:
    kind: str  # sum | last | legacy
    unit_amount: int  # cents per unit


@dataclass(frozen=True)
class SubscriptionPlan:
    id: str
    customer: str
    items: tuple[ItemPlan, ...]
    interval: str  # month | year
    anchor: datetime  # the first period's start; later periods follow it month by month
    status: str  # active | trialing
    cancel_at: datetime | None
    price_change_at: datetime | None  # the first item moves to another price on the same meter


@dataclass(frozen=True)
class UsageEvent:
    kind: str
    customer: str
    at: datetime  # the event's own time
    ingest_at: datetime  # when OpenMeter receives it (later than `at` for a late event)
    value: Decimal


@dataclass(frozen=True)
class TopUp:
    id: str
    customer: str
    at: datetime
    amount_minor: int
    refund_at: datetime | None
    currency: str = "usd"  # another than the customer's (usd) cannot be forwarded: held for a person


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # which request, statement or write it hits, in words
    nth: int = 1  # for crashes and lost connections: which matching write or statement


@dataclass(frozen=True)
class Step:
    at: datetime
    jobs: tuple[str, ...]  # usage | balance | webhooks | backfill
    faults: tuple[Fault, ...]


@dataclass
class Scenario:
    seed: int
    start: datetime
    subscriptions: list[SubscriptionPlan]
    usage: list[UsageEvent]
    top_ups: list[TopUp]
    steps: list[Step]
    credit_minor: dict[str, int]  # opening prepaid credit per customer
    moesif_dedupes: bool
    product_trusts_dedupe: bool
    moesif_visibility_delay: timedelta
    webhooks: dict[str, str] = field(default_factory=dict)  # delivery mode per event kind
    # Each period's invoice charges this plan fee, and whatever the prepaid credit does not cover, by card: a
    # succeeded PaymentIntent that is an invoice payment, never a top-up. 0: no card payments.
    plan_fee_minor: int = 0
    invoice_refunds: bool = False  # some card-paid invoices are partly refunded (never a Moesif debit)
    summary_lag: timedelta = timedelta(minutes=10)  # the product's stripe.summary_lag
    stripe_summary_lag: timedelta = timedelta(0)  # how long the sandbox's summaries really lag: at most summary_lag
    # Before these steps' jobs, the next valid meter event is set to be rejected asynchronously (step index ->
    # whether an error report names it).
    async_rejections: dict[int, bool] = field(default_factory=dict)
    # stripe.meter_events: one seed in four reports meter events through the v2 meter event stream (chosen from the
    # seed alone, so every other choice, and every seed's replay, is as before).
    meter_events: str = "v1"

    @property
    def customers(self) -> list[str]:
        return sorted({s.customer for s in self.subscriptions})

    def describe(self) -> str:
        lines = [f"seed {self.seed}: start {self.start.isoformat()}"]
        for s in self.subscriptions:
            extra = []
            if s.cancel_at:
                extra.append(f"canceled {s.cancel_at.isoformat()}")
            if s.price_change_at:
                extra.append(f"price change {s.price_change_at.isoformat()}")
            kinds = "+".join(i.kind for i in s.items)
            when = f"{s.interval}ly from {s.anchor.isoformat()}"
            lines.append(f"  {s.customer} {s.id}: {kinds} {when} {s.status} {' '.join(extra)}")
        lines.append(
            f"  moesif dedupes={self.moesif_dedupes} product trusts it={self.product_trusts_dedupe} "
            f"visibility delay={self.moesif_visibility_delay}"
        )
        lines.append(f"  webhooks: {self.webhooks}")
        lines.append(f"  plan fee {self.plan_fee_minor} minor units by card, invoice refunds={self.invoice_refunds}")
        lines.append(
            f"  stripe summaries lag {self.stripe_summary_lag} (product's stripe.summary_lag {self.summary_lag})"
        )
        lines.append(f"  stripe.meter_events: {self.meter_events}")
        for number, reported in sorted(self.async_rejections.items()):
            lines.append(f"  step {number}: the next meter event rejected later, {'' if reported else 'not '}reported")
        for number, step in enumerate(self.steps):
            if step.faults:
                faults = ", ".join(f"{f.kind}({f.target}, #{f.nth})" for f in step.faults)
                lines.append(f"  step {number} at {step.at.isoformat()} {'+'.join(step.jobs)}: {faults}")
        return "\n".join(lines)


def add_months(instant: datetime, months: int) -> datetime:
    """`instant` moved by whole months, the day clamped to the month's length (Jan 31 + 1 month = Feb 28)."""
    month_index = instant.month - 1 + months
    year, month = instant.year + month_index // 12, month_index % 12 + 1
    day = min(instant.day, calendar.monthrange(year, month)[1])
    return instant.replace(year=year, month=month, day=day)


def plan_period(plan: SubscriptionPlan, k: int) -> tuple[datetime, datetime]:
    """The plan's k-th billing period (k = 0 starts at its anchor), before any cancellation."""
    months = 12 if plan.interval == "year" else 1
    return add_months(plan.anchor, k * months), add_months(plan.anchor, (k + 1) * months)


def periods_of(plan: SubscriptionPlan, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
    """The plan's billing periods overlapping `[since, until)`, the last cut short at a cancellation."""
    periods = []
    for k in itertools.count():
        start, end = plan_period(plan, k)
        if start >= until or (plan.cancel_at and start >= plan.cancel_at):
            return periods
        if plan.cancel_at and plan.cancel_at < end:
            end = plan.cancel_at
        if end > since:
            periods.append((start, end))


def generate(seed: int) -> Scenario:
    rng = random.Random(seed)
    start = datetime(2026, 1, 5, tzinfo=UTC) + timedelta(days=rng.randrange(0, 300), hours=rng.randrange(24))
    span = timedelta(days=rng.choice([2, 8, 14, 30]))
    end = start + span

    subscriptions = []
    for number in range(rng.randint(2, 4)):
        customer = f"cus_sim{number}"
        kinds = rng.choice([("sum",), ("last",), ("legacy",), ("sum", "last"), ("sum",), ("sum", "legacy")])
        # Legacy prices are monthly in the simulation's config, so yearly subscriptions carry meter prices only.
        interval = "year" if rng.random() < 0.15 and "legacy" not in kinds else "month"
        anchor = (start - timedelta(days=rng.uniform(0, 27))).replace(microsecond=0)
        cancel_at = start + span * rng.uniform(0.2, 0.9) if rng.random() < 0.2 else None
        change_at = start + span * rng.uniform(0.1, 0.9) if rng.random() < 0.2 else None
        subscriptions.append(
            SubscriptionPlan(
                id=f"sub_sim{number}",
                customer=customer,
                items=tuple(ItemPlan(kind, rng.choice([1, 2, 5])) for kind in kinds),
                interval=interval,
                anchor=anchor,
                status="trialing" if rng.random() < 0.15 else "active",
                cancel_at=cancel_at.replace(microsecond=0) if cancel_at else None,
                price_change_at=change_at.replace(microsecond=0) if change_at else None,
            )
        )

    usage: list[UsageEvent] = []
    silent = subscriptions[-1].customer if rng.random() < 0.3 else None  # a subject OpenMeter never saw
    for plan in subscriptions:
        if plan.customer == silent:
            continue
        for item in plan.items:
            for _ in range(rng.randint(3, 25)):
                at = (start - timedelta(days=2) + (span + timedelta(days=2)) * rng.random()).replace(microsecond=0)
                ingest_at = at
                if rng.random() < 0.12:  # late: lands hours or days after it happened
                    ingest_at = at + timedelta(hours=rng.choice([1, 3, 30, 80]))
                value = Decimal(rng.choice([1, 2, 3, 10, 250])) + (Decimal("0.5") if rng.random() < 0.2 else 0)
                usage.append(UsageEvent(item.kind, plan.customer, at, ingest_at, value))

    top_ups = []
    for number in range(rng.randint(0, 4)):
        customer = rng.choice(subscriptions).customer
        at = (start + span * rng.random()).replace(microsecond=0)
        refund_at = at + timedelta(hours=rng.randint(1, 72)) if rng.random() < 0.25 else None
        top_ups.append(TopUp(f"pi_sim{number}", customer, at, rng.choice([500, 1000, 2500]), refund_at))
    # Drawn from a generator of their own, so that every other choice of a seed stays as it was before they existed.
    currencies = random.Random(f"top-up currencies {seed}")
    top_ups = [replace(t, currency="eur") if currencies.random() < 0.15 else t for t in top_ups]

    # When cycles run: every 15 minutes to 12 hours, plus a burst around period ends, where provisional totals
    # become final. (Gaps stay under 12 hours: a longer outage leaves a maybe-applied `sum` event past Stripe's
    # 24-hour identifier window, which the product hands to a person on purpose; README, Reliability.)
    times: set[datetime] = set()
    now = start
    while now < end:
        now += rng.choice([timedelta(minutes=30), *[timedelta(hours=12)] * 3])
        times.add(now.replace(microsecond=0))
    for plan in subscriptions:
        for _, period_end in periods_of(plan, start, end):
            if start < period_end < end and rng.random() < 0.7:
                times.update(period_end + timedelta(minutes=m) for m in (-10, 20, 45, 80))
    steps = []
    backfill_at = rng.randrange(len(times)) if rng.random() < 0.3 else None
    for number, at in enumerate(sorted(times)):
        jobs = ["usage", "webhooks"] + (["balance"] if rng.random() < 0.5 else [])
        rng.shuffle(jobs)
        faults = []
        if rng.random() < 0.4:
            for _ in range(rng.randint(1, 2)):
                kind = rng.choice(STEP_FAULTS)
                faults.append(Fault(kind, _target(kind, rng), nth=rng.randint(1, 12)))
        if number == backfill_at:
            jobs.append("backfill")
            if rng.random() < 0.6:
                faults.append(Fault("crash_mid_backfill", "a backfill write", nth=rng.randint(1, 20)))
        steps.append(Step(at.replace(microsecond=0), tuple(jobs), tuple(faults)))

    moesif_dedupes = rng.random() < 0.6
    invoices = random.Random(f"invoice payments {seed}")  # a generator of their own, as for currencies
    plan_fee_minor = invoices.choice([0, 900, 4900])
    # Stripe's summaries lag its events by an undocumented time, which the product's stripe.summary_lag must cover
    # (a generator of their own, like the currencies above).
    lag = random.Random(f"summary lag {seed}")
    summary_lag = timedelta(minutes=lag.choice([10, 10, 30]))
    stripe_summary_lag = timedelta(seconds=0 if lag.random() < 0.25 else lag.randint(1, summary_lag.seconds))
    # Meter events Stripe accepts and rejects later (a generator of its own). A read-back with time to resend
    # before the invoice closes needs a step between the final sync (after usage.grace_period, at the +45 min step)
    # plus stripe.summary_lag and the invoice's finalization (+60 min): added at +57 min, without jobs of chance.
    rejections = random.Random(f"async rejections {seed}")
    async_rejections: dict[int, bool] = {}
    if rejections.random() < 0.3:
        extra = {
            period_end + timedelta(minutes=57)
            for plan in subscriptions
            for _, period_end in periods_of(plan, start, end)
            if start < period_end < end
        }
        steps = sorted([*steps, *(Step(at, ("webhooks", "usage"), ()) for at in extra)], key=lambda step: step.at)
        for _ in range(rejections.randint(1, 2)):
            async_rejections[rejections.randrange(len(steps))] = rejections.random() < 0.6
    return Scenario(
        seed=seed,
        start=start.replace(microsecond=0),
        subscriptions=subscriptions,
        usage=sorted(usage, key=lambda e: (e.ingest_at, e.at)),
        top_ups=top_ups,
        steps=steps,
        credit_minor={plan.customer: rng.choice([0, 1000, 20000]) for plan in subscriptions},
        moesif_dedupes=moesif_dedupes,
        product_trusts_dedupe=moesif_dedupes and rng.random() < 0.5,
        moesif_visibility_delay=timedelta(minutes=rng.choice([0, 0, 2, 8])),
        webhooks={
            kind: rng.choice(["delivered", "duplicate", "out_of_order", "lost"]) for kind in ("period", "top_up")
        },
        plan_fee_minor=plan_fee_minor,
        invoice_refunds=invoices.random() < 0.5,
        summary_lag=summary_lag,
        stripe_summary_lag=stripe_summary_lag,
        async_rejections=async_rejections,
        meter_events="v2_stream" if seed % 4 == 3 else "v1",
    )


def _target(kind: str, rng: random.Random) -> str:
    if kind.startswith("stripe"):
        return rng.choice(["POST /v1/billing/meter_events", "GET /v1/subscriptions", "POST /v1/subscription_items"])
    if kind.startswith("openmeter"):
        return "* /api/v1/meters"  # the meters' listing (GET) and the usage queries (POST) alike
    if kind.startswith("moesif"):
        return rng.choice(["POST /v1/~/billing/reports/balance_transactions", "GET /v1/search/~/subscriptions"])
    if kind in ("crash_before_send", "crash_after_send"):
        return rng.choice(["stripe", "moesif"])
    if kind == "crash_waiting_on_moesif_budget":
        return "a Moesif balance transaction"
    return "a ledger statement"
