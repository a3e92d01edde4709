"""Several `reconciler run` replicas on one PostgreSQL database, sharing the work without doing it twice.

- Each replica registers and heartbeats in `replicas`; live replicas split the per-API request budgets.
- For each job tick, the replica whose insert into `cycle_ticks` wins plans the cycle (lists Stripe once) and
  writes one `work_items` row per stream period; the others wait for the plan, then all of them execute it.
- Work is claimed in batches with `SELECT … FOR UPDATE SKIP LOCKED` under a lease (owner, expiry) and a
  fencing token that grows with every claim. Ledger writes for an item check the token in the same
  transaction (`check_fence`), so a replica whose lease lapsed can no longer write. A crashed replica's
  leases expire and its items are claimed again; their pending intents are resent with the same identifiers.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reconciler.ledger.schema import CycleTick, Replica, WorkItem
from reconciler.usage.model import Claim, Fence, LeaseLostError
from reconciler.usage.pipeline import batched

REPLICA_TIMEOUT = timedelta(seconds=30)  # a replica without a heartbeat this long is not live
ENQUEUE_BATCH = 500  # work items written in one insert

_work_items = WorkItem.__table__
# A claim's lease, renewed inside a transaction that writes for it; refused (0 rows) once it lapsed.
_RENEW_LEASE = (
    update(_work_items)
    .where(
        _work_items.c.id == bindparam("b_id"),
        _work_items.c.fencing_token == bindparam("b_token"),
        _work_items.c.lease_owner == bindparam("b_owner"),
        _work_items.c.state == "claimed",
    )
    .values(lease_expires_at=bindparam("b_expires"))
)


def check_fence(session: Session | Connection, fence: Fence) -> None:
    """Inside a transaction that writes for a work item: renew the lease, or raise LeaseLostError if it lapsed."""
    check_fences(session, [fence])


def check_fences(session: Session | Connection, fences: Sequence[Fence]) -> None:
    """`check_fence` for every one of `fences` (a transaction writing for several work items), in one statement;
    LeaseLostError if any lease lapsed. Rows are locked in id order, as `Coordinator.complete_all` locks them: two
    transactions locking several work items must not lock them in orders that deadlock."""
    if not fences:
        return
    params = [
        {"b_id": f.item_id, "b_token": f.token, "b_owner": f.owner, "b_expires": f.clock() + f.lease_ttl}
        for f in sorted(fences, key=lambda f: f.item_id)
    ]
    renewed = session.execute(_RENEW_LEASE, params).rowcount
    if renewed != len(fences):
        items = ", ".join(str(f.item_id) for f in fences)
        raise LeaseLostError(
            f"lost the lease on work item {items}" if len(fences) == 1 else f"lost a lease among work items {items}"
        )


class Coordinator:
    def __init__(self, engine: Engine, clock: Callable[[], datetime], lease_ttl: timedelta = timedelta(seconds=30)):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        self._lease_ttl = lease_ttl
        self.replica_id = str(uuid.uuid4())

    # -- replicas ------------------------------------------------------------------------------------

    def register(self) -> None:
        now = self._clock()
        with self._sessions.begin() as session:
            session.add(
                Replica(
                    id=self.replica_id, host=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now
                )
            )

    def heartbeat(self) -> None:
        """Keep this replica live and its leases fresh; forget replicas long dead."""
        now = self._clock()
        with self._sessions.begin() as session:
            session.execute(update(Replica).where(Replica.id == self.replica_id).values(heartbeat_at=now))
            # Rows locked right now are being written for, by transactions that renew their lease themselves
            # (`check_fences`): skipped, the heartbeat never waits on them, so it cannot deadlock with them.
            held = (
                select(WorkItem.id)
                .where(WorkItem.lease_owner == self.replica_id, WorkItem.state == "claimed")
                .with_for_update(skip_locked=True)
            )
            session.execute(
                update(WorkItem)
                .where(WorkItem.id.in_(held.scalar_subquery()))
                .values(lease_expires_at=now + self._lease_ttl)
                .execution_options(synchronize_session=False)
            )
            session.execute(delete(Replica).where(Replica.heartbeat_at < now - 10 * REPLICA_TIMEOUT))

    def live_replicas(self) -> int:
        with self._sessions() as session:
            count = session.execute(
                select(func.count()).select_from(Replica).where(Replica.heartbeat_at >= self._clock() - REPLICA_TIMEOUT)
            ).scalar_one()
        return max(1, count)

    def leases_held(self) -> int:
        with self._sessions() as session:
            return session.execute(
                select(func.count())
                .select_from(WorkItem)
                .where(WorkItem.lease_owner == self.replica_id, WorkItem.state == "claimed")
            ).scalar_one()

    def leave(self) -> None:
        """Shutdown: give back unfinished claims at once and deregister."""
        with self._sessions.begin() as session:
            session.execute(
                update(WorkItem)
                .where(WorkItem.lease_owner == self.replica_id, WorkItem.state == "claimed")
                .values(state="pending", lease_owner=None, lease_expires_at=None)
            )
            session.execute(delete(Replica).where(Replica.id == self.replica_id))

    # -- planning ------------------------------------------------------------------------------------

    def claim_tick(self, job: str, tick_key: str) -> int | None:
        """The tick's id if this replica plans it, None if another one does."""
        try:
            with self._sessions.begin() as session:
                tick = CycleTick(job=job, tick_key=tick_key, planned_by=self.replica_id, planned_at=self._clock())
                session.add(tick)
                session.flush()
                return tick.id
        except IntegrityError:
            return None

    def enqueue(self, tick_id: int, job: str, payloads: Iterable[str]) -> int:
        """Write the tick's plan, in one transaction, a batch of inserts at a time (`payloads` may be a generator: the
        plan is never held whole); how many items it holds. Items of earlier ticks nobody has started are dropped:
        this plan covers them."""
        now = self._clock()
        written = 0
        with self._sessions.begin() as session:
            session.execute(
                delete(WorkItem).where(WorkItem.job == job, WorkItem.state == "pending", WorkItem.tick_id != tick_id)
            )
            for batch in batched(payloads, ENQUEUE_BATCH):
                rows = [
                    {
                        "tick_id": tick_id,
                        "job": job,
                        "payload": payload,
                        "state": "pending",
                        "fencing_token": 0,  # nosec B105 - a lease's counter, not a secret
                        "attempts": 0,
                        "created_at": now,
                    }
                    for payload in batch
                ]
                session.execute(insert(WorkItem), rows)
                written += len(batch)
            session.get_one(CycleTick, tick_id).enqueued_at = self._clock()  # when the plan was whole
        return written

    def plan_ready(self, job: str, tick_key: str) -> bool | None:
        """True once the tick's plan is written; False while it is being planned; None if nobody planned it."""
        with self._sessions() as session:
            tick = session.scalars(
                select(CycleTick).where(CycleTick.job == job, CycleTick.tick_key == tick_key)
            ).one_or_none()
        return None if tick is None else tick.enqueued_at is not None

    def planner_live(self, job: str, tick_key: str) -> bool:
        """Whether the replica planning the tick still heartbeats (a plan that never comes is not waited for)."""
        with self._sessions() as session:
            planner = session.execute(
                select(Replica.heartbeat_at)
                .join(CycleTick, CycleTick.planned_by == Replica.id)
                .where(CycleTick.job == job, CycleTick.tick_key == tick_key)
            ).scalar_one_or_none()
        return planner is not None and planner >= self._clock() - REPLICA_TIMEOUT

    # -- executing -----------------------------------------------------------------------------------

    def claim_batch(self, job: str, size: int, after: int = 0) -> list[Claim]:
        """Up to `size` items under a new lease each: pending ones in plan order from just past `after` (the last
        item this replica claimed), then any pending before it (given back by a replica that stopped), then once
        none is pending any a dead replica's lapsed lease left behind. Each claim is one UPDATE … RETURNING over rows
        picked with FOR UPDATE SKIP LOCKED along the (job, state, id) index, starting at `after`: a claim costs the
        same in a plan of a million, even where PostgreSQL's statistics lag (autovacuum off, or a first big cycle)
        and the index still holds every claimed item's old 'pending' entry."""
        now = self._clock()
        claims: list[Claim] = []
        pending_after = (WorkItem.state == "pending") & (WorkItem.id > after)
        pending_before = (WorkItem.state == "pending") & (WorkItem.id <= after)
        lapsed = (WorkItem.state == "claimed") & (WorkItem.lease_expires_at < now)
        with self._sessions.begin() as session:
            for condition in (pending_after, pending_before, lapsed) if after else (pending_after, lapsed):
                if len(claims) == size:
                    break
                picked = (
                    select(WorkItem.id)
                    .where(WorkItem.job == job, condition)
                    .order_by(WorkItem.id)
                    .limit(size - len(claims))
                    .with_for_update(skip_locked=True)
                )
                rows = session.execute(
                    update(WorkItem)
                    .where(WorkItem.id.in_(picked.scalar_subquery()))
                    .values(
                        state="claimed",
                        lease_owner=self.replica_id,
                        lease_expires_at=now + self._lease_ttl,
                        fencing_token=WorkItem.fencing_token + 1,
                        attempts=WorkItem.attempts + 1,
                    )
                    .returning(WorkItem.id, WorkItem.payload, WorkItem.fencing_token)
                    .execution_options(synchronize_session=False)
                ).all()
                claims += [
                    Claim(item_id, payload, Fence(item_id, token, self.replica_id, self._clock, self._lease_ttl))
                    for item_id, payload, token in sorted(rows)
                ]
        return claims

    def complete_all(self, claims: list[Claim]) -> int:
        """Mark every claim done in one transaction, each only while its lease still holds; how many were."""
        if not claims:
            return 0
        now = self._clock()
        with self._sessions.begin() as session:
            done = session.execute(
                update(_work_items)
                .where(
                    _work_items.c.id == bindparam("b_id"),
                    _work_items.c.fencing_token == bindparam("b_token"),
                    _work_items.c.lease_owner == self.replica_id,
                    _work_items.c.state == "claimed",
                )
                .values(state="done", finished_at=now),
                [
                    {"b_id": claim.item_id, "b_token": claim.fence.token}
                    for claim in sorted(claims, key=lambda c: c.item_id)  # in id order, as `check_fences`
                ],
            ).rowcount
        return done

    def release(self, claims: list[Claim]) -> None:
        """Give back claims not worked on (stop requested), for another replica to take at once; one already
        completed stays done."""
        with self._sessions.begin() as session:
            for claim in claims:
                session.execute(
                    update(WorkItem)
                    .where(
                        WorkItem.id == claim.item_id,
                        WorkItem.fencing_token == claim.fence.token,
                        WorkItem.lease_owner == self.replica_id,
                        WorkItem.state == "claimed",
                    )
                    .values(state="pending", lease_owner=None, lease_expires_at=None)
                )

    def release_held(self, job: str) -> int:
        """Give back every claim of `job` this replica still holds (at a cycle's end: ones it never synced, e.g. the
        cycle failed); how many."""
        with self._sessions.begin() as session:
            return session.execute(
                update(WorkItem)
                .where(WorkItem.job == job, WorkItem.lease_owner == self.replica_id, WorkItem.state == "claimed")
                .values(state="pending", lease_owner=None, lease_expires_at=None)
            ).rowcount

    def abandon_tick(self, tick_id: int) -> None:
        """The tick's plan will not come (planning failed): forget the tick, so that the replicas waiting for its
        plan stop waiting (and a replica starting within the tick may plan it afresh)."""
        with self._sessions.begin() as session:
            session.execute(delete(CycleTick).where(CycleTick.id == tick_id, CycleTick.enqueued_at.is_(None)))
