"""Our own small types for the usage job. The upstream adapters return these; the core only sees these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    """A half-open billing period `[start, end)` as Stripe reports it (aware UTC datetimes)."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class UsageWindow:
    """The part of a period sent to OpenMeter: `[start, end)`, both on window boundaries."""

    start: datetime
    end: datetime

    @property
    def is_empty(self) -> bool:
        return self.start >= self.end


@dataclass(frozen=True)
class UsageRow:
    """One row of an OpenMeter query: a subject's usage over one window, or why that value cannot be billed."""

    subject: str
    window_start: datetime
    window_end: datetime
    value: Decimal | Exception


@dataclass(frozen=True)
class Meter:
    """A Stripe billing meter."""

    id: str
    event_name: str
    formula: str  # sum | count | last
    status: str  # active | inactive
    event_time_window: str | None  # hour | day | None
    customer_key: str
    value_key: str


@dataclass(frozen=True)
class KnownMeter:
    """An OpenMeter meter as listed: its id (what queries name it by) and aggregation (SUM, COUNT, MAX, ...)."""

    id: str
    aggregation: str


@dataclass(frozen=True)
class CustomerCredit:
    """A Stripe customer balance as credit: minor units (Stripe stores credit as a negative balance), and the
    balance's currency (None until the customer has one)."""

    minor: int
    currency: str | None


@dataclass(frozen=True)
class MeteredItem:
    """A subscription item on a metered price, with the billing period it is in now."""

    item_id: str
    subscription_id: str
    subscription_status: str
    customer_id: str
    price_id: str
    meter_id: str | None  # None: a legacy metered price (usage records)
    period: BillingPeriod
    ended_at: datetime | None = None  # set once the subscription has ended (canceled)
    customer_metadata: dict[str, str] | None = None  # present when the listing expanded the customer
    customer_credit: CustomerCredit | None = None  # likewise
    subscription_created: datetime | None = None
    currency: str = "usd"
    unit_amount: Decimal | None = None  # minor units per unit; None when the price is not simple per-unit
    interval: str = "month"  # price.recurring.interval: day | week | month | year
    interval_count: int = 1
    billing_cycle_anchor: datetime | None = None
    started_at: datetime | None = None  # the subscription's start_date


class StreamKind(StrEnum):
    """How Stripe aggregates what we send for one stream, which decides what we send."""

    METER_LAST = "last"  # send the period-to-date total; the newest event wins
    METER_SUM = "sum"  # send the signed difference against what the ledger says is reported
    LEGACY = "legacy"  # usage record with action=set at one fixed timestamp per period


@dataclass(frozen=True, slots=True)
class Stream:
    """One quantity Stripe holds per period, and where its usage comes from.

    Meter events belong to (customer, meter), not to an item, so a meter stream is keyed by both; a legacy
    usage record belongs to one subscription item.
    """

    kind: StreamKind
    customer_id: str
    subscription_id: str
    item_id: str
    stripe_target: str  # meter event_name, or legacy price id
    openmeter_meter: str
    subject: str
    rounding: str
    meter: Meter | None = None
    unit_amount: str | None = None  # the price per unit in minor units (decimal string), for amounts at stake
    currency: str | None = None

    @property
    def key(self) -> str:
        if self.meter is not None:
            return f"meter:{self.meter.id}:{self.customer_id}"
        return f"legacy:{self.item_id}"


@dataclass(frozen=True, slots=True)
class StreamPeriod:
    """One unit of work: a stream in one billing period."""

    stream: Stream
    period: BillingPeriod
    is_current: bool  # the item's current period per Stripe (legacy records can only go there)


@dataclass(frozen=True)
class Refusal:
    """A metered item we will not report, and why (config or Stripe setup the user must fix)."""

    customer_id: str
    item_id: str
    stripe_target: str
    reason: str
    unmapped: bool = False  # no entry in usage.meters: skipped, not a failure
    # What it costs, where known: the item's period and price, and (a mapped item whose OpenMeter subject is known)
    # what to measure, so that `report` can put a figure on the usage nobody bills.
    period: BillingPeriod | None = None
    unit_amount: str | None = None
    currency: str | None = None
    openmeter_meter: str | None = None
    subject: str | None = None
    rounding: str | None = None


@dataclass(frozen=True)
class Intent:
    """A report written to the ledger before it is sent to Stripe."""

    id: int
    identifier: str
    kind: StreamKind
    customer_id: str
    item_id: str
    meter: Meter | None
    quantity: int
    total_after: int
    event_timestamp: datetime
    final: bool
    created_at: datetime
    attempts: int = 0  # earlier sends whose outcome was unknown
    key_number: int = 0  # which idempotency key it is sent under, as the ledger stores it
    attempted_at: datetime | None = None  # when its latest resend may have left; None: only sent at created_at

    @property
    def last_sent_at(self) -> datetime:
        """When the latest send that may have landed left: Stripe's summary may not show it until summary_lag later."""
        return self.attempted_at or self.created_at

    @property
    def idempotency_key(self) -> str:
        """Key 0 is the one every intent was first sent under. A fresh one (`-1`, `-2`, ...) follows each 5xx answer:
        Stripe saved that answer to the key in use and replays it to every resend with it. The meter event
        identifier stays the same, so Stripe still counts the event once. (Identifiers end in `:<hex nonce>`, never in
        `-n`, so a fresh key never equals another intent's first.)"""
        first = f"reconciler-{self.identifier}"
        return first if self.key_number == 0 else f"{first}-{self.key_number}"


@dataclass
class CycleSummary:
    """Counts for one cycle; printed by the CLI and stored on the run row."""

    seen: int = 0
    reported: int = 0
    unchanged: int = 0
    unmapped: int = 0
    failed: int = 0
    finalized: int = 0
    late_drift: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, other: CycleSummary) -> None:
        """Count `other`'s items in this summary too (one item's counts, synced in another thread)."""
        for name in self.as_dict():
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "reported": self.reported,
            "unchanged": self.unchanged,
            "unmapped": self.unmapped,
            "failed": self.failed,
            "finalized": self.finalized,
            "late_drift": self.late_drift,
        }


# -- what the ledger stores and loads ---------------------------------------------------------------------


class IntentState:
    """The state of a report (and of a Moesif transaction): what the ledger stores, and what recovery reads."""

    PENDING = "pending"  # written, maybe sent: resend with the same identifier before anything new
    SENT = "sent"  # Stripe accepted it
    FAILED = "failed"  # Stripe refused it; it was not applied
    REJECTED = "rejected"  # Stripe accepted it, then rejected it asynchronously (an error report; its summary agrees)
    HELD = "held"  # Moesif transactions: money the job will not forward (e.g. another currency); a person decides


@dataclass(frozen=True)
class StreamEvent:
    """A report of a stream as the usage ledger's `stream_events_between` lists it."""

    report_id: int
    state: str
    quantity: int
    last_sent_at: datetime  # its latest send (or resend) that may have landed, or when Stripe accepted it


@dataclass(frozen=True)
class RecordedPeriod:
    """A stream period as the ledger holds it (a `usage_periods` row): what the cycle rebuilds a period Stripe no
    longer lists from, and what the read-back and `verify` read back."""

    id: int
    stream_key: str
    kind: str  # a StreamKind value
    customer_id: str
    subscription_id: str
    subscription_item_id: str
    stripe_target: str
    meter_id: str | None
    openmeter_meter: str
    subject: str
    period_start: datetime
    period_end: datetime
    reported_total: int
    next_sequence: int
    unit_amount: str | None
    currency: str | None


@dataclass(frozen=True)
class SentEvent:
    """A meter event Stripe accepted from us (and has not rejected since), as the ledger recorded it."""

    period_id: int
    timestamp: datetime
    value: int
    sent_at: datetime | None


class ContendedError(Exception):
    """Another process wrote the same intent first; this one backs off for the cycle."""


# -- sharing the work between replicas (reconciler.ledger.coordination) ----------------------------------


class LeaseLostError(Exception):
    """This replica's lease on a work item lapsed and another replica holds it now."""


@dataclass(frozen=True)
class Fence:
    """Proof of a live lease on a work item, checked inside every ledger transaction that writes for the item
    (reconciler.ledger.coordination.check_fence)."""

    item_id: int
    token: int
    owner: str
    clock: Callable[[], datetime]
    lease_ttl: timedelta


@dataclass(frozen=True)
class Claim:
    """A work item claimed under a lease: its payload (a stream period, reconciler.usage.codec) and its fence."""

    item_id: int
    payload: str
    fence: Fence
