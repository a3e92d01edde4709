"""The webhook inbox: events are stored with their work before Stripe is answered, then worked off.

Stripe redelivers an event until it gets a 2xx, so the endpoint answers 2xx only once the event is durably
stored (5xx otherwise), and a redelivered id adds no work. The work runs later, on the daemon's worker,
with retries and backoff; the scheduled cycles remain the safety net for events that never arrive.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import WebhookEvent
from reconciler.webhooks.events import works_for_event

MAX_ATTEMPTS = 8
WORK_LEASE = timedelta(minutes=5)


@dataclass(frozen=True)
class InboxItem:
    id: int
    event_id: str
    work: str
    customer_id: str | None
    event: dict[str, Any]
    attempts: int


class WebhookInbox:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def record(self, event: dict[str, Any], raw: str) -> bool:
        """Store the event and its work in one transaction. False if this event id was seen before."""
        works = works_for_event(event)
        customers = {w.customer_id for w in works if w.customer_id}
        now = self._clock()
        try:
            with self._sessions.begin() as session:
                session.add(
                    WebhookEvent(
                        event_id=str(event["id"]),
                        type=str(event.get("type", "")),
                        customer_id=next(iter(customers), None),
                        work=",".join(w.kind for w in works) or None,
                        state="pending" if works else "ignored",
                        attempts=0,
                        next_attempt_at=now,
                        payload=raw,
                        received_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    def claim_due(self, limit: int = 50) -> list[InboxItem]:
        """Take the work that is due, so no other replica runs it too (SKIP LOCKED on PostgreSQL). A claim
        not finished within WORK_LEASE (its replica died) is due again."""
        now = self._clock()
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(WebhookEvent)
                .where(WebhookEvent.state.in_(("pending", "working")), WebhookEvent.next_attempt_at <= now)
                .order_by(WebhookEvent.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                row.state = "working"
                row.next_attempt_at = now + WORK_LEASE
            return [
                InboxItem(r.id, r.event_id, r.work or "", r.customer_id, json.loads(r.payload), r.attempts)
                for r in rows
            ]

    def done(self, item: InboxItem) -> None:
        with self._sessions.begin() as session:
            row = session.get_one(WebhookEvent, item.id)
            row.state, row.processed_at, row.attempts, row.error = "done", self._clock(), row.attempts + 1, None

    def retry_later(self, item: InboxItem, error: str) -> None:
        """Back off exponentially; give up (state failed, shown by `status`) after MAX_ATTEMPTS."""
        with self._sessions.begin() as session:
            row = session.get_one(WebhookEvent, item.id)
            row.attempts += 1
            row.error = error
            if row.attempts >= MAX_ATTEMPTS:
                row.state = "failed"
            else:
                row.state = "pending"
                row.next_attempt_at = self._clock() + timedelta(seconds=min(3600, 5 * 2**row.attempts))
