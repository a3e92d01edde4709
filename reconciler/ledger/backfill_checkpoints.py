"""A checkpoint per `reconciler backfill` run (usage/backfill.py): the stream periods it finished, so the same
command continues where an interrupted one stopped."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import BackfillItem, BackfillRun


class Checkpoints:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def start_or_resume(self, key: str, total: int) -> tuple[str, set[str]]:
        """The unfinished run of the same command, with the stream periods it finished; else a new run."""
        with self._sessions.begin() as session:
            run = session.scalars(
                select(BackfillRun)
                .where(BackfillRun.key == key, BackfillRun.finished_at.is_(None))
                .order_by(BackfillRun.started_at.desc())
            ).first()
            if run is None:
                run = BackfillRun(id=str(uuid.uuid4()), key=key, started_at=self._clock(), total=total)
                session.add(run)
                return run.id, set()
            done = session.scalars(select(BackfillItem.unit_key).where(BackfillItem.run_id == run.id))
            return run.id, set(done)

    def done(self, run_id: str, unit_key: str) -> None:
        with self._sessions.begin() as session:
            session.add(BackfillItem(run_id=run_id, unit_key=unit_key, done_at=self._clock()))

    def finish(self, run_id: str) -> None:
        with self._sessions.begin() as session:
            session.get_one(BackfillRun, run_id).finished_at = self._clock()
