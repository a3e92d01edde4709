"""Group commit of Stripe's acceptances: "sent" marks written many to a transaction instead of one per item.

Only the outcome waits; the intent is always written, in its own transaction, before its send. An intent whose
mark is still buffered when the process dies stays pending, exactly as if the process had died between the send
and the mark: the next cycle resends it with the same identifier and idempotency key, which Stripe deduplicates.
So buffering costs no safety, and saves a transaction (and on SQLite an fsync) per reported item.
"""

from __future__ import annotations

import threading

import structlog

from reconciler.usage.model import Intent
from reconciler.usage.ports import UsageBook

log = structlog.get_logger(__name__)


class SentMarks:
    """Thread-safe buffer of accepted intents, written `flush_at` at a time and on `flush()`."""

    def __init__(self, flush_at: int) -> None:
        self._flush_at = flush_at
        self._lock = threading.Lock()
        self._buffered: dict[int, tuple[UsageBook, list[Intent]]] = {}  # by ledger: each may hold its own fence
        self._count = 0

    def add(self, ledger: UsageBook, intent: Intent) -> None:
        with self._lock:
            self._buffered.setdefault(id(ledger), (ledger, []))[1].append(intent)
            self._count += 1
            if self._count < self._flush_at:
                return
            batches = self._take()
        self._write(batches)

    def flush(self) -> None:
        with self._lock:
            batches = self._take()
        self._write(batches)

    def _take(self) -> list[tuple[UsageBook, list[Intent]]]:
        batches = list(self._buffered.values())
        self._buffered.clear()
        self._count = 0
        return batches

    @staticmethod
    def _write(batches: list[tuple[UsageBook, list[Intent]]]) -> None:
        for ledger, intents in batches:
            try:
                ledger.mark_all_sent(intents)
            except Exception:  # e.g. the database went away, or a replica's lease lapsed
                log.warning(
                    "could not record that Stripe accepted these intents; they stay pending and are resent with "
                    "their identifiers, which Stripe deduplicates",
                    identifiers=[intent.identifier for intent in intents],
                    exc_info=True,
                )
