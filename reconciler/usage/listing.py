"""A dry run's cycle listing, in memory: a dry run writes nothing anywhere, so it cannot use the ledger's
(reconciler.ledger.listing.ListingLedger), whose operations and order this keeps. A dry run holds its whole plan in
memory anyway."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

from reconciler.usage.model import Meter, StreamPeriod


class MemoryListing:
    def __init__(self) -> None:
        self._listings: dict[str, dict[str, list[StreamPeriod]]] = {}

    def open(self) -> str:
        listing = str(uuid.uuid4())
        self._listings[listing] = defaultdict(list)
        return listing

    def add(self, listing: str, units: Sequence[StreamPeriod]) -> None:
        for unit in units:
            self._listings[listing][unit.stream.key].append(unit)

    def groups(self, listing: str, meters: Mapping[str, Meter]) -> Iterator[list[StreamPeriod]]:
        streams = self._listings[listing]
        for key in sorted(streams):
            if key in streams:
                yield sorted(streams[key], key=lambda unit: unit.period.start)

    def drop(self, listing: str, stream_key: str) -> None:
        self._listings[listing].pop(stream_key, None)

    def listed(self, listing: str, periods: Sequence[tuple[str, datetime]]) -> set[tuple[str, datetime]]:
        streams = self._listings[listing]
        return {
            (key, start)
            for key, start in periods
            if key in streams and any(unit.period.start == start for unit in streams[key])
        }

    def close(self, listing: str) -> None:
        self._listings.pop(listing, None)
