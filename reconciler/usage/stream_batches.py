"""Batches of meter events for Stripe's v2 meter event stream (`stripe.meter_events: v2_stream`).

With the stream, the cycle does not send each meter-event intent on its own: `_apply` records the intent as pending
(in its own transaction, before anything is sent, as always) and hands it here. A batch leaves as soon as it holds
100 intents, Stripe's maximum per request (https://docs.stripe.com/api/v2/billing/meter-event-stream/create), and
`flush` sends what is left when the cycle ends (also after a stop request), so a cycle of N reported items makes at
most ceil(N / 100) stream requests, plus the session's.

Outcomes: an accepted batch (a 200) is recorded as sent, each intent through the cycle's group commit (`SentMarks`);
a batch that failed after its retries leaves each intent pending with its attempt noted (or failed, for a refusal),
exactly as a single send would (the job's `settle_failed_send`), and the next cycle resends it with the same
identifier, which the stream deduplicates. An intent still buffered when the process dies stays pending too: the next
cycle's recovery resends it. So a buffer costs no safety, only the moment the outcome is known.

A stream's sync holds its stream lock only until its intent is recorded; the batch may leave later from another
worker. Two intents of one stream (a period finalized and the next one begun) may travel in one batch: each has its
own identifier and timestamp, and the stream has no documented per-customer concurrency limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from reconciler.upstream.errors import TransientError, UpstreamError
from reconciler.usage.model import Intent, StreamPeriod
from reconciler.usage.outcomes import Written
from reconciler.usage.ports import UsageBook

log = structlog.get_logger(__name__)

BATCH_SIZE = 100  # https://docs.stripe.com/api/v2/billing/meter-event-stream/create: up to 100 events per request


@dataclass(frozen=True)
class Queued:
    ledger: UsageBook  # the item's (fenced, for a replica's claim)
    work: StreamPeriod
    intent: Intent
    written: Written | None  # called once its outcome is recorded (a replica's claim completes then)


@dataclass
class BatchFailure:
    """An intent of a batch that failed, for the cycle's summary."""

    work: StreamPeriod
    intent: Intent
    error: str


@dataclass
class StreamBatches:
    """Thread-safe buffer of meter-event intents, sent `batch_size` at a time by `send` and on `flush()`.

    `send` posts one batch (raising reconciler.upstream.errors); `accepted` records an intent Stripe took (the group
    commit, which calls the intent's `written` once it has); `failed` records the outcome of an intent whose batch
    failed and returns the stream period's failure line, or None when the intent was settled without one (its
    `written` is called after)."""

    send: Callable[[Sequence[Intent]], None]
    accepted: Callable[[UsageBook, Intent, Written | None], None]
    failed: Callable[[UsageBook, StreamPeriod, Intent, UpstreamError], str | None]
    batch_size: int = BATCH_SIZE
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queued: list[Queued] = field(default_factory=list)
    _failures: list[BatchFailure] = field(default_factory=list)
    requests: int = 0  # batches sent, for tests and logs

    def add(self, ledger: UsageBook, work: StreamPeriod, intent: Intent, written: Written | None = None) -> None:
        with self._lock:
            self._queued.append(Queued(ledger, work, intent, written))
            if len(self._queued) < self.batch_size:
                return
            batch, self._queued = self._queued[: self.batch_size], self._queued[self.batch_size :]
        self._send(batch)

    def flush(self) -> None:
        """Send everything buffered, in batches of at most `batch_size`."""
        while True:
            with self._lock:
                batch, self._queued = self._queued[: self.batch_size], self._queued[self.batch_size :]
            if not batch:
                return
            self._send(batch)

    def take_failures(self) -> list[BatchFailure]:
        """The intents whose batches failed since the last call (the cycle counts them as failed)."""
        with self._lock:
            failures, self._failures = self._failures, []
        return failures

    def _send(self, batch: list[Queued]) -> None:
        with self._lock:
            self.requests += 1
        try:
            self.send([queued.intent for queued in batch])
        except UpstreamError as exc:
            self._record_failure(batch, exc)
            return
        except Exception as exc:  # a bug, or a success we could not read: the batch may have landed
            log.exception("sending a meter event batch failed unexpectedly; its intents stay pending")
            self._record_failure(batch, TransientError("reconciler", f"unexpected error: {type(exc).__name__}: {exc}"))
            return
        for queued in batch:
            self.accepted(queued.ledger, queued.intent, queued.written)

    def _record_failure(self, batch: list[Queued], exc: UpstreamError) -> None:
        log.warning("a meter event batch failed", events=len(batch), error=str(exc))
        failures = []
        for queued in batch:
            stream = queued.work.stream
            with structlog.contextvars.bound_contextvars(
                customer=stream.customer_id,
                subscription_item=stream.item_id,
                meter=stream.stripe_target,
                period_start=queued.work.period.start.isoformat(),
                period_end=queued.work.period.end.isoformat(),
            ):
                try:
                    error = self.failed(queued.ledger, queued.work, queued.intent, exc)
                except Exception as recording:  # e.g. the database is away: the intent is still pending
                    log.warning("could not record a failed batch's outcome", exc_info=True)
                    error = f"{stream.customer_id} {stream.stripe_target}: {exc}; not recorded: {recording}"
            if error is not None:
                failures.append(BatchFailure(queued.work, queued.intent, error))
            if queued.written is not None:
                queued.written()
        with self._lock:
            self._failures += failures
