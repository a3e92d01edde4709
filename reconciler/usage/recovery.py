"""Recovery: finishing an intent a crashed or failed cycle left pending, whose outcome at Stripe is unknown.

Rules, in order, for a pending intent of a stream period:

1. A legacy usage record of a period Stripe has rolled over from cannot be resent: Stripe's usage record summary
   says whether it landed (it holds the intent's total). A summary that does not hold it is trusted only once
   `stripe.summary_lag` has passed since the last send; before that, the intent waits for a later cycle.
2. A meter event of a period whose invoice has finalized (period end + `stripe.invoice_grace_period`) would be
   taken but never billed; a `sum` event older than Stripe's identifier window (`IDENTIFIER_SAFE_RESEND`) could be
   billed twice. Neither is resent: Stripe's meter summary of the one minute the event was dated in settles it
   (`landed_per_summary`), once that minute and the summary lag have passed; a summary that does not settle it
   leaves it to a person (PermanentError).
3. Anything else is resent with the same identifier and idempotency key.

A resend whose identifier Stripe already holds is settled by rule 2's summary too (`settle_from_meter_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol

import structlog

from reconciler.upstream.errors import OutcomeUnknownError, PermanentError
from reconciler.usage.model import Intent, IntentState, StreamEvent, StreamKind, StreamPeriod
from reconciler.usage.ports import UsageBook

log = structlog.get_logger(__name__)

# Stripe deduplicates meter event identifiers for "at least 24 hours". A pending `sum` intent older than this
# can no longer be resent safely: if the first attempt was applied, a resend would count it twice.
IDENTIFIER_SAFE_RESEND = timedelta(hours=23)


class StripeSummaries(Protocol):
    """What Stripe holds: a meter's aggregate for a customer over a window, a legacy item's usage in a period."""

    def meter_total(self, meter_id: str, customer: str, start: datetime, end: datetime) -> Decimal: ...
    def legacy_usage_total(self, item_id: str, period_start: datetime) -> int | None: ...


def landed_per_summary(intent: Intent, others: Sequence[StreamEvent], held: Decimal | int) -> bool | None:
    """Whether the intent landed, from Stripe's summary (`held`) of the minute its event was dated in, given our
    other events dated in that minute (failed ones left out); None when the summary cannot tell. Pure.

    A `sum` meter's summary holds the others plus the intent, or the others alone, and tells only when every
    other's outcome is known; a `last` meter's tells only when the intent is alone in its minute."""
    if intent.kind is StreamKind.METER_SUM:
        without = sum(event.quantity for event in others)
        with_it = without + intent.quantity
        knowable = all(event.state == IntentState.SENT for event in others)
    else:
        without, with_it, knowable = 0, intent.total_after, not others
    if knowable and held in (without, with_it) and without != with_it:
        return held == with_it
    return None


class Recovery:
    def __init__(
        self,
        stripe: StripeSummaries,
        clock: Callable[[], datetime],
        *,
        invoice_grace_period: timedelta,
        summary_lag: timedelta,
        send: Callable[[UsageBook, StreamPeriod, Intent], None],
    ):
        self._stripe = stripe
        self._clock = clock
        self._invoice_grace_period = invoice_grace_period
        self._summary_lag = summary_lag
        self._send = send  # the job's: sends the intent and records its outcome

    def resend_pending(self, ledger: UsageBook, work: StreamPeriod, now: datetime) -> None:
        """Finish what a crashed or failed cycle started: resend it with the same identifier and idempotency key,
        or, where a resend can no longer be trusted, settle it from what Stripe holds."""
        intent = ledger.pending_intent(work)
        if intent is None:
            return
        if intent.kind is StreamKind.LEGACY and not work.is_current:
            # Stripe takes no usage records for a period it has rolled over from; its summary says what it holds.
            # Stripe documents no lag for usage record summaries (nor their absence): assumed to lag like meters'.
            held = self._stripe.legacy_usage_total(intent.item_id, work.period.start)
            landed = held == intent.total_after
            if not landed:
                self._wait_for_summary(intent, intent.last_sent_at, "its period has rolled over")
            _settle(ledger, intent, landed=landed, evidence=f"Stripe holds {held}")
            return
        invoice_final = now >= work.period.end + self._invoice_grace_period
        if intent.kind is not StreamKind.LEGACY and invoice_final:
            # Stripe would take the event but never bill it; whether an earlier attempt landed is in its summary.
            self.settle_from_meter_summary(ledger, work, intent, "the period's invoice has finalized")
            return
        if intent.kind is StreamKind.METER_SUM and now - intent.created_at > IDENTIFIER_SAFE_RESEND:
            # Stripe may have forgotten the identifier: a resend could bill it twice.
            self.settle_from_meter_summary(ledger, work, intent, "it is older than Stripe's identifier window")
            return
        log.info("resending pending intent", identifier=intent.identifier, quantity=intent.quantity)
        ledger.note_resend(intent)  # `intent` keeps the previous time: a duplicate answer points before this resend
        self._send(ledger, work, intent)

    def settle_from_meter_summary(self, ledger: UsageBook, work: StreamPeriod, intent: Intent, why: str) -> None:
        """Stripe's aggregate for the one minute the intent's event was dated in settles whether it landed, when
        every other event we dated in that minute has a known outcome (`landed_per_summary`)."""
        assert intent.meter is not None
        minute = intent.event_timestamp.replace(second=0, microsecond=0)
        others = [
            event
            for event in ledger.stream_events_between(work.stream.key, minute, minute + timedelta(minutes=1))
            if event.state != IntentState.FAILED and event.report_id != intent.id
        ]
        if minute + timedelta(minutes=1) > self._clock():
            # No summary may end in the future: the intent's minute is read once it has passed.
            raise OutcomeUnknownError(
                "reconciler",
                f"intent {intent.identifier} ({intent.quantity:+}) has an unknown outcome ({why}); Stripe's summary "
                "of its minute can be read once the minute has passed; it is settled at a later cycle",
            )
        # Every event of ours in the minute must have had time to show: one of the others still missing from the
        # summary would make ours look lost (or landed) and leave it to a person.
        self._wait_for_summary(intent, max([intent.last_sent_at, *(event.last_sent_at for event in others)]), why)
        held = self._stripe.meter_total(intent.meter.id, intent.customer_id, minute, minute + timedelta(minutes=1))
        landed = landed_per_summary(intent, others, held)
        if landed is not None:
            _settle(ledger, intent, landed=landed, evidence=f"{why}; Stripe's summary holds {held}")
            return
        raise PermanentError(
            "reconciler",
            f"intent {intent.identifier} ({intent.quantity:+}) has an unknown outcome and cannot be resent ({why}), "
            f"and Stripe's summary for its minute ({held}) does not settle it; resending could bill it twice. "
            "Check the meter's event summaries in Stripe before resolving it",
        )

    def _wait_for_summary(self, intent: Intent, last_sent_at: datetime, why: str) -> None:
        """Stripe aggregates events asynchronously: a summary read less than stripe.summary_lag after an event was
        sent may not show it yet (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api).
        Calling the intent lost then could have its difference sent, and billed, a second time: it waits."""
        ready_at = last_sent_at + self._summary_lag
        if self._clock() < ready_at:
            raise OutcomeUnknownError(
                "reconciler",
                f"intent {intent.identifier} ({intent.quantity:+}) has an unknown outcome ({why}), and Stripe's "
                f"summary may not show it before {ready_at.isoformat()}; it is settled at a later cycle",
            )


def _settle(ledger: UsageBook, intent: Intent, *, landed: bool, evidence: str) -> None:
    log.warning("settled a pending intent from Stripe", identifier=intent.identifier, landed=landed, why=evidence)
    if landed:
        ledger.mark_sent(intent)
    else:
        ledger.mark_failed(intent, f"not resent: {evidence}")
