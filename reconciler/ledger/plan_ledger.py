"""The plan ledger: the state each app user last acknowledged, so a cycle sends only what changed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import PlanState
from reconciler.plans.desired import Entitlement


class PlanLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def acknowledged(self) -> dict[str, tuple[str, str, str]]:
        """customer -> (user id, plan, status) the app last acknowledged."""
        with self._sessions() as session:
            rows = session.scalars(select(PlanState).where(PlanState.acknowledged_at.is_not(None))).all()
            return {r.customer_id: (r.user_id, r.plan, r.status) for r in rows}

    def acknowledge(self, entitlement: Entitlement) -> None:
        self._upsert(entitlement, error=None)

    def failed(self, entitlement: Entitlement, error: str) -> None:
        self._upsert(entitlement, error=error)

    def _upsert(self, e: Entitlement, error: str | None) -> None:
        now = self._clock()
        with self._sessions.begin() as session:
            row = session.get(PlanState, e.customer_id)
            if row is None:
                row = PlanState(
                    customer_id=e.customer_id,
                    user_id=e.user_id,
                    plan=e.plan,
                    status=e.status,
                    attempts=0,
                    updated_at=now,
                )
                session.add(row)
            row.attempts += 1
            row.updated_at = now
            row.last_error = error
            if error is None:
                row.user_id, row.plan, row.status, row.acknowledged_at = e.user_id, e.plan, e.status, now
