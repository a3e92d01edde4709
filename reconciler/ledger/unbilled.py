"""The metered items the usage sync does not report, as the latest full cycle saw them (`unbilled_items`).

Each cycle writes what it refused, a batch at a time; a full cycle then forgets what it no longer refuses; a
cycle for some customers only (a webhook's, a read-back's) adds what it saw and forgets nothing. `report` puts a
figure on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import UnbilledItem
from reconciler.usage.model import Refusal


class UnbilledLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def record(self, refusals: Sequence[tuple[Refusal, int | None]], run_id: str) -> None:
        """`refusals` (a batch of a cycle's), each with what it measures (None: unknown)."""
        if not refusals:
            return
        now = self._clock()
        with self._sessions.begin() as session:
            items = sorted({refusal.item_id for refusal, _ in refusals})
            existing = {
                (row.subscription_item_id, row.stripe_target): row
                for row in session.scalars(select(UnbilledItem).where(UnbilledItem.subscription_item_id.in_(items)))
            }
            for refusal, measured in refusals:
                row = existing.get((refusal.item_id, refusal.stripe_target))
                if row is None:
                    row = UnbilledItem(
                        subscription_item_id=refusal.item_id, stripe_target=refusal.stripe_target, first_seen_at=now
                    )
                    session.add(row)
                    existing[(refusal.item_id, refusal.stripe_target)] = row
                row.customer_id = refusal.customer_id
                row.unmapped = refusal.unmapped
                row.reason = refusal.reason
                row.period_start = refusal.period.start if refusal.period else None
                row.period_end = refusal.period.end if refusal.period else None
                row.measured = measured
                row.unit_amount = refusal.unit_amount
                row.currency = refusal.currency
                row.last_seen_at = now
                row.run_id = run_id

    def forget_unseen(self, since: datetime) -> None:
        """A full cycle, which listed every item, has recorded what it refused since `since`: an item it did not
        refuse is billed now and forgotten here."""
        with self._sessions.begin() as session:
            session.execute(delete(UnbilledItem).where(UnbilledItem.last_seen_at < since))
