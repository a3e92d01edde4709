"""Group commit of Stripe's acceptances: "sent" marks written many to a transaction instead of one per item.

Only the outcome waits; the intent is always written, in its own transaction, before its send. An intent whose
mark is still buffered when the process dies stays pending, exactly as if the process had died between the send
and the mark: the next cycle resends it with the same identifier and idempotency key, which Stripe deduplicates.
So buffering costs no safety, and saves a transaction (and on SQLite an fsync) per reported item.

A replica's claimed work item (reconciler.ledger.coordination) is completed only once the outcomes its sync left
buffered are written (`Settlement`): completing ends the lease, and with it the right to write for the item, so a
mark written after it would be refused and its intent left pending. A replica's marks for many claims (a ledger
and a lease each) go in one transaction that checks every lease, or, if one lapsed, claim by claim. Completions are
group-committed too (`Completions`): one that dies with the process leaves its item claimed until the lease lapses,
and another replica syncs it again, which finds nothing left to send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from reconciler.usage.model import Claim, Intent
from reconciler.usage.ports import UsageBook

log = structlog.get_logger(__name__)


Written = Callable[[], None]  # called once a buffered outcome has been written (or its write failed)


class Settlement:
    """A claimed work item's completion (`done`), held back until the sync has returned and every outcome it left
    buffered has been written."""

    def __init__(self, done: Callable[[], None]) -> None:
        self._done = done
        self._open = 1  # the sync itself
        self._lock = threading.Lock()

    def expect(self) -> Written:
        """One more buffered outcome; returns what to call once it has been written."""
        with self._lock:
            self._open += 1
        return self._settle

    def synced(self) -> None:
        """The sync has returned."""
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            self._open -= 1
            complete = self._open == 0
        if complete:
            self._done()


class SentMarks:
    """Thread-safe buffer of accepted intents, written `flush_at` at a time and on `flush()`."""

    def __init__(self, flush_at: int) -> None:
        self._flush_at = flush_at
        self._lock = threading.Lock()
        # By ledger (each may hold its own fence): its intents, and what to call once they are written.
        self._buffered: dict[int, tuple[UsageBook, list[Intent], list[Written]]] = {}
        self._count = 0

    def add(self, ledger: UsageBook, intent: Intent, written: Written | None = None) -> None:
        with self._lock:
            _, intents, callbacks = self._buffered.setdefault(id(ledger), (ledger, [], []))
            intents.append(intent)
            if written is not None:
                callbacks.append(written)
            self._count += 1
            if self._count < self._flush_at:
                return
            batches = self._take()
        self._write(batches)

    def flush(self) -> None:
        with self._lock:
            batches = self._take()
        self._write(batches)

    def _take(self) -> list[tuple[UsageBook, list[Intent], list[Written]]]:
        batches = list(self._buffered.values())
        self._buffered.clear()
        self._count = 0
        return batches

    @classmethod
    def _write(cls, batches: list[tuple[UsageBook, list[Intent], list[Written]]]) -> None:
        if len(batches) > 1 and cls._marked_together(batches):
            cls._settled(batches)
            return
        for ledger, intents, _ in batches:
            try:
                ledger.mark_all_sent(intents)
            except Exception:  # e.g. the database went away, or a replica's lease lapsed
                log.warning(
                    "could not record that Stripe accepted these intents; they stay pending and are resent with "
                    "their identifiers, which Stripe deduplicates",
                    identifiers=[intent.identifier for intent in intents],
                    exc_info=True,
                )
        cls._settled(batches)

    @staticmethod
    def _marked_together(batches: list[tuple[UsageBook, list[Intent], list[Written]]]) -> bool:
        """A replica's claims, a ledger (and a lease) each: their marks in one transaction, which holds every lease
        (False: a lease lapsed, or not all are claims; each claim's marks then go on their own)."""
        fences = [ledger.fence for ledger, _, _ in batches]
        if None in fences:
            return False
        try:
            batches[0][0].mark_all_sent(
                [intent for _, intents, _ in batches for intent in intents],
                also_fenced_by=[fence for fence in fences[1:] if fence is not None],
            )
        except Exception as exc:  # e.g. one lease lapsed: marked one claim at a time, the others still are
            log.info("marks for several claims could not go together; marking them claim by claim", error=str(exc))
            return False
        return True

    @staticmethod
    def _settled(batches: list[tuple[UsageBook, list[Intent], list[Written]]]) -> None:
        for _, _, callbacks in batches:
            for written in callbacks:
                written()


class Completions:
    """Thread-safe buffer of a replica's settled claims, completed `flush_at` at a time (`complete_all`, which
    returns how many still held their lease) and on `flush()`."""

    def __init__(self, complete_all: Callable[[list[Claim]], int], flush_at: int) -> None:
        self._complete_all = complete_all
        self._flush_at = flush_at
        self._lock = threading.Lock()
        self._buffered: list[Claim] = []

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._buffered.append(claim)
            if len(self._buffered) < self._flush_at:
                return
            claims, self._buffered = self._buffered, []
        self._write(claims)

    def flush(self) -> None:
        with self._lock:
            claims, self._buffered = self._buffered, []
        self._write(claims)

    def _write(self, claims: list[Claim]) -> None:
        if not claims:
            return
        try:
            completed = self._complete_all(claims)
        except Exception:  # e.g. the database went away: the leases lapse and another replica syncs the items again
            log.exception("could not complete work items; once their leases lapse they are synced again")
            return
        if completed < len(claims):
            log.warning(
                "leases lost before completing work items; their new owners finish them", items=len(claims) - completed
            )
