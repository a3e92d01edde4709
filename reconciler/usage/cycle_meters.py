"""One cycle's view of OpenMeter's meters (id, aggregation): the ledger's cache (reconciler.ledger.meter_cache)
read once, and OpenMeter listed afresh at most once, only when the cache misses a meter the cycle needs.

A cycle makes its own `CycleMeters`, so nothing of one cycle's view outlives it: the next cycle reads the cache
again, since another process may have listed the meters since."""

from __future__ import annotations

import threading
from collections.abc import Callable, Set
from typing import TypeVar

import structlog

from reconciler.upstream.errors import UpstreamError
from reconciler.usage.model import KnownMeter
from reconciler.usage.ports import MeterStore

log = structlog.get_logger(__name__)
T = TypeVar("T")


class CycleMeters:
    def __init__(
        self, cache: MeterStore, list_meters: Callable[[], dict[str, KnownMeter]], *, keep_listing: bool
    ) -> None:
        """`keep_listing` False (a dry run): never write the cache, only read it."""
        self._cache = cache
        self._list_meters = list_meters
        self._keep_listing = keep_listing
        self._lock = threading.Lock()  # the pipeline's measurers ask at once
        self._known: dict[str, KnownMeter] | None = None  # None: the cache not read yet
        self._listed = False

    def covering(self, needed: Set[str]) -> dict[str, KnownMeter]:
        """The meters as last listed, listed afresh (at most once this cycle) when they miss one in `needed`."""
        with self._lock:
            if self._known is None:
                self._known = _best_effort(self._cache.load, "read the meters last listed") or {}
            if needed <= self._known.keys() or self._listed:
                return self._known
            self._listed = True
            try:
                listed = self._list_meters()
            except UpstreamError as exc:
                # Unknown aggregations are measured one window at a time: slower, never wrong.
                log.warning("could not list OpenMeter meters; measuring without windowed batches", error=str(exc))
                return self._known
            if self._keep_listing:
                _best_effort(lambda: self._cache.replace(listed), "keep the meters listed")
            self._known = listed
            return listed

    def failed(self, meters: Set[str]) -> None:
        """Queries of these meters failed: perhaps deleted or made again under their slug (a new id), so the next
        cycle lists the meters afresh."""
        if meters and self._keep_listing:
            _best_effort(self._cache.forget, "forget the meters listed")


def _best_effort(operation: Callable[[], T], what: str) -> T | None:
    """The cache only saves a listing: when the database cannot serve it, the cycle goes on without it."""
    try:
        return operation()
    except Exception:
        log.warning(f"could not {what}; going on without", exc_info=True)
        return None
