"""`reconciler verify`: read Stripe's own view back and compare it with the ledger and with OpenMeter.

For each ledger period in range: what OpenMeter measures now (rounded as configured), what the ledger says it
reported, and what Stripe holds (meter event summaries; legacy usage record summaries). Stripe's summaries are
eventually consistent, so a difference less than `stripe.summary_lag` after we sent a report the summary covers is
`settling`, not a finding (how Stripe's view is read: usage/stripe_view.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from reconciler.config import Config
from reconciler.ledger.readback_ledger import SentEventLog
from reconciler.ledger.schema import UsagePeriod
from reconciler.ledger.usage_ledger import recorded_period
from reconciler.upstream.errors import UpstreamError
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.usage.model import BillingPeriod
from reconciler.usage.periods import usage_window
from reconciler.usage.readback import NEEDS_A_PERSON as READBACK_NEEDS_A_PERSON
from reconciler.usage.rounding import round_quantity
from reconciler.usage.stripe_view import StripeHolding, StripeView

NEEDS_A_PERSON = frozenset({"foreign_usage", "missing_in_stripe", "late_drift", "unverifiable"})


@dataclass(frozen=True)
class VerifyLine:
    customer: str
    stripe_target: str
    kind: str
    period_start: str
    period_end: str
    ledger_status: str
    measured: int | None  # OpenMeter now, rounded
    reported: int  # what the ledger says Stripe holds because of us
    stripe: str | None  # what Stripe says it holds
    finding: str
    note: str


def classify(
    *,
    reported: int,
    stripe: Decimal | None,
    measured: int | None,
    is_final: bool,
    last_sent_at: datetime | None,
    now: datetime,
    summary_lag: timedelta,
) -> tuple[str, str]:
    """The finding for one period: ok, settling, foreign_usage, missing_in_stripe, late_drift or unverifiable.
    `last_sent_at`: when we last sent an event the summary covers (when it was sent, not the date it carries: a
    final event is dated before its period ends but may be sent an hour later)."""
    if stripe is None:
        return "unverifiable", "Stripe's summaries do not show this period"
    if stripe != reported:
        if last_sent_at is not None and now - last_sent_at < summary_lag:
            return "settling", "Stripe's summaries may not include the latest report yet"
        if stripe > reported:
            return "foreign_usage", f"Stripe holds {stripe - reported} more than the reconciler sent (another writer?)"
        return "missing_in_stripe", f"Stripe holds {reported - stripe} less than the reconciler sent (rejected?)"
    if measured is not None and measured != reported:
        if is_final:
            return "late_drift", f"OpenMeter now measures {measured}; the period is final"
        return "ok", f"OpenMeter now measures {measured}; the next cycle reports it"
    return "ok", ""


class Verifier:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        stripe: StripeGateway,
        openmeter: OpenMeterGateway,
        clock: Callable[[], datetime],
    ):
        self._config = config
        self._engine = engine
        self._view = StripeView(SentEventLog(engine), stripe)
        self._openmeter = openmeter
        self._clock = clock

    def run(self, since: datetime | None = None, until: datetime | None = None) -> list[VerifyLine]:
        now = self._clock()
        since = since or now - self._config.usage.lookback
        until = until or now
        with Session(self._engine) as session:
            rows = session.scalars(
                select(UsagePeriod)
                .where(UsagePeriod.period_end > since, UsagePeriod.period_start < until)
                .order_by(UsagePeriod.customer_id, UsagePeriod.period_start)
            ).all()
        lines = [self._verify(row, now) for row in rows]
        with Session(self._engine) as session, session.begin():  # keep Stripe's view for `report`
            for row, line in zip(rows, lines, strict=True):
                if line.stripe is not None:
                    session.execute(
                        update(UsagePeriod)
                        .where(UsagePeriod.id == row.id)
                        .values(stripe_total=line.stripe, verified_at=now)
                    )
                if line.finding == "ok" and row.read_back_finding in READBACK_NEEDS_A_PERSON:
                    # What the read-back asked a person about agrees now (fixed in Stripe, or it was lag): cleared.
                    session.execute(
                        update(UsagePeriod)
                        .where(UsagePeriod.id == row.id)
                        .values(read_back_finding="ok", read_back_note=f"agreed at `verify` on {now:%Y-%m-%d %H:%M}")
                    )
        return lines

    def _verify(self, row: UsagePeriod, now: datetime) -> VerifyLine:
        holding = StripeHolding(None, None, "")
        measured: int | None = None
        error = ""
        try:
            holding = self._view.holding(recorded_period(row), now)
            measured = self._measure(row, now)
        except UpstreamError as exc:
            error = str(exc)
        finding, reason = classify(
            reported=row.reported_total,
            stripe=holding.total,
            measured=measured,
            is_final=row.status == "final",
            last_sent_at=holding.last_sent_at,
            now=now,
            summary_lag=self._config.stripe.summary_lag,
        )
        return VerifyLine(
            customer=row.customer_id,
            stripe_target=row.stripe_target,
            kind=row.kind,
            period_start=row.period_start.isoformat(),
            period_end=row.period_end.isoformat(),
            ledger_status=row.status,
            measured=measured,
            reported=row.reported_total,
            stripe=None if holding.total is None else str(holding.total),
            finding=finding,
            note="; ".join(part for part in (error or reason, holding.note) if part),
        )

    def _measure(self, row: UsagePeriod, now: datetime) -> int | None:
        mapping = self._config.usage.mapping_for(row.stripe_target)
        if mapping is None:
            return None
        usage = self._config.usage
        window = usage_window(
            BillingPeriod(row.period_start, row.period_end), now, usage.window_size, ZoneInfo(usage.window_time_zone)
        )
        if window.is_empty:
            return 0
        total = self._openmeter.query_total(row.openmeter_meter, row.subject, window)
        return round_quantity(total, mapping.rounding)


def verify(config: Config, since: datetime | None, until: datetime | None) -> list[VerifyLine]:
    """`reconciler verify`: the ledger's periods in the range read back from Stripe and measured again."""
    from reconciler.app import opened_ledger
    from reconciler.clock import utc_now

    with (
        opened_ledger(config) as engine,
        closing(StripeGateway(config.stripe)) as stripe,
        closing(OpenMeterGateway(config.openmeter)) as openmeter,
    ):
        return Verifier(config, engine, stripe, openmeter, utc_now).run(since, until)


def verify_json(lines: list[VerifyLine]) -> str:
    return json.dumps(
        {
            "periods": [asdict(line) for line in lines],
            "needs_a_person": sum(1 for line in lines if line.finding in NEEDS_A_PERSON),
        },
        indent=2,
    )
