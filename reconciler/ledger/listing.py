"""A usage cycle's listing, kept in the ledger (`usage_listing`) so that a cycle's memory does not grow with the
number of metered items.

Whether two subscription items bill one customer's meter in overlapping periods is known only once the whole
listing has been seen, and one customer's subscriptions may sit on any of Stripe's pages. So the cycle writes each
batch of stream periods here as it lists them (one insert a batch), then reads them back ordered by stream key, a
chunk at a time, and meets every stream's periods together (`groups`). When its planning ends it deletes its rows
(`close`); a process that died mid-cycle leaves rows that the next listing opened a day later deletes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import groupby

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import UsageListing
from reconciler.usage.codec import dump_listed, load_listed
from reconciler.usage.model import Meter, StreamPeriod

READ_CHUNK = 1000  # rows read back in one query
ABANDONED_AFTER = timedelta(days=1)  # a listing this old belongs to a process that died mid-cycle


class ListingLedger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime], read_chunk: int = READ_CHUNK):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        self._read_chunk = read_chunk

    def open(self) -> str:
        """A new, empty listing's id. Forgets listings abandoned long ago (their process died mid-cycle): an id begins
        with when it was opened, so they are found through the index, however many rows other listings hold."""
        now = self._clock()
        with self._sessions.begin() as session:
            session.execute(delete(UsageListing).where(UsageListing.listing_id < _id_prefix(now - ABANDONED_AFTER)))
        return f"{_id_prefix(now)}-{uuid.uuid4().hex[:23]}"

    def add(self, listing: str, units: Sequence[StreamPeriod]) -> None:
        """Add `units` to the listing, in one insert."""
        if not units:
            return
        rows = [
            {
                "listing_id": listing,
                "stream_key": unit.stream.key,
                "period_start": unit.period.start,
                "payload": dump_listed(unit),
            }
            for unit in units
        ]
        with self._sessions.begin() as session:
            session.connection().execute(insert(UsageListing.__table__), rows)  # Core: no ORM bookkeeping a row

    def groups(self, listing: str, meters: Mapping[str, Meter]) -> Iterator[list[StreamPeriod]]:
        """Every stream's periods in the listing, together, stream by stream (ordered by key, then period start),
        with their meters from `meters` (those the listing was made with). Read a chunk at a time, each in its own
        short transaction; a stream whose periods straddle two chunks is read again whole with the next one.
        Dropping the stream just yielded (`drop`) does not disturb it."""
        after: str | None = None
        while True:
            query = select(UsageListing.stream_key, UsageListing.payload).where(UsageListing.listing_id == listing)
            if after is not None:
                query = query.where(UsageListing.stream_key > after)
            query = query.order_by(UsageListing.stream_key, UsageListing.period_start, UsageListing.id)
            with self._sessions() as session:
                rows = session.execute(query.limit(self._read_chunk)).all()
            if not rows:
                return
            complete = len(rows) < self._read_chunk
            if not complete:
                last = rows[-1].stream_key
                rows = [row for row in rows if row.stream_key != last]  # the last stream may go on in the next chunk
                if not rows:  # one stream fills the chunk: read it whole
                    with self._sessions() as session:
                        rows = session.execute(
                            query.where(UsageListing.stream_key == last)
                            .order_by(None)
                            .order_by(UsageListing.period_start, UsageListing.id)
                        ).all()
            for key, group in groupby(rows, key=lambda row: row.stream_key):
                yield [load_listed(row.payload, meters) for row in group]
                after = key
            if complete:
                return

    def drop(self, listing: str, stream_key: str) -> None:
        """Take a stream out of the listing (refused: its periods count as not listed)."""
        with self._sessions.begin() as session:
            session.execute(
                delete(UsageListing).where(UsageListing.listing_id == listing, UsageListing.stream_key == stream_key)
            )

    def listed(self, listing: str, periods: Sequence[tuple[str, datetime]]) -> set[tuple[str, datetime]]:
        """Which of `periods` (stream key, period start) the listing holds."""
        if not periods:
            return set()
        with self._sessions() as session:
            rows = session.execute(
                select(UsageListing.stream_key, UsageListing.period_start).where(
                    UsageListing.listing_id == listing,
                    UsageListing.stream_key.in_(sorted({key for key, _ in periods})),
                )
            ).all()
        held = {(row.stream_key, row.period_start) for row in rows}
        return {period for period in periods if period in held}

    def close(self, listing: str) -> None:
        """Delete the listing."""
        with self._sessions.begin() as session:
            session.execute(delete(UsageListing).where(UsageListing.listing_id == listing))


def _id_prefix(moment: datetime) -> str:
    """Listing ids sort by when they were opened: epoch seconds, zero-padded."""
    return f"{int(moment.timestamp()):012d}"
