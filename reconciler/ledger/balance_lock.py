"""One lock between balance cycles and a person resolving a transaction (`reconciler balances resolve`).

Balance cycles take it shared: the daemon's scheduled cycle, a webhook's targeted cycle and `reconcile-balances`
may run side by side, as they always could (the ledger keeps them from sending anything twice). A resolution takes
it exclusively, without waiting: while a person resends a transaction no cycle may compare that balance (it would
see the resend missing and correct it) or pick the transaction up itself; while a cycle runs, the resolution is
refused and the person tries again. A cycle that finds a resolution in progress waits for it (one Moesif POST).

PostgreSQL: a session advisory lock, per schema (deployments sharing a database do not block each other).
SQLite: an flock on `<db>.balances.lock` (the kernel releases it when the process dies). An in-memory SQLite
database lives in one process and needs none.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text

from reconciler.errors import BusyError

KEY = "reconciler:balance_job"
# Each statement names the lock by KEY and the schema.
TRY_EXCLUSIVE = "SELECT pg_try_advisory_lock(hashtext(:key || current_schema()))"
WAIT_SHARED = "SELECT pg_advisory_lock_shared(hashtext(:key || current_schema()))"
UNLOCK_EXCLUSIVE = "SELECT pg_advisory_unlock(hashtext(:key || current_schema()))"
UNLOCK_SHARED = "SELECT pg_advisory_unlock_shared(hashtext(:key || current_schema()))"


class BalanceJobBusyError(BusyError):
    """A balance cycle is running; a resolution must wait for it to finish."""


@contextmanager
def balance_job_lock(engine: Engine, *, exclusive: bool) -> Iterator[None]:
    """Shared (waits for a resolution to finish) or exclusive (raises BalanceJobBusyError if a cycle holds it)."""
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, exclusive):
            yield
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.balances.lock", "a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise BalanceJobBusyError(_BUSY) from None
        yield  # closing the file releases it


@contextmanager
def _advisory_lock(engine: Engine, exclusive: bool) -> Iterator[None]:
    unlock = UNLOCK_EXCLUSIVE if exclusive else UNLOCK_SHARED
    with engine.connect() as connection:
        if exclusive:
            taken = connection.execute(text(TRY_EXCLUSIVE), {"key": KEY}).scalar()
            if not taken:
                raise BalanceJobBusyError(_BUSY)
        else:
            connection.execute(text(WAIT_SHARED), {"key": KEY})
        connection.commit()  # the lock belongs to the session: no transaction is left open while it is held
        try:
            yield
        finally:
            # The connection goes back to the pool, where a session lock would outlive us.
            connection.execute(text(unlock), {"key": KEY})
            connection.commit()


_BUSY = (
    "a balance cycle is running (the daemon's, a webhook's or `reconciler reconcile-balances`); "
    "nothing was changed: try again when it has finished"
)
