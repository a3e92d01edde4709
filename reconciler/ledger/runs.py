"""One row per job cycle: when it ran, where, how it ended and what it counted."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import Run
from reconciler.results import RunStatus


class RunLog:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def start(self, job: str) -> str:
        run_id = str(uuid.uuid4())
        with self._sessions.begin() as session:
            session.add(
                Run(
                    id=run_id,
                    job=job,
                    started_at=self._clock(),
                    status=RunStatus.RUNNING.value,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                )
            )
        return run_id

    def finish(self, run_id: str, status: str, summary: dict[str, object]) -> None:
        """How the run ended (a result's `status`, reconciler.results) and its `counts()`."""
        with self._sessions.begin() as session:
            run = session.get_one(Run, run_id)
            run.status = str(status)
            run.finished_at = self._clock()
            run.summary = json.dumps(summary, sort_keys=True)
