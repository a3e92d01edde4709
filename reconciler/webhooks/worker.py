"""Working off the webhook inbox: targeted cycles for the customers the events name."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import structlog

from reconciler.app import App
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.metrics import Metrics
from reconciler.results import JobResult, failure_text
from reconciler.upstream.errors import UpstreamError
from reconciler.webhooks.events import BALANCE_SYNC, METER_ERRORS, PLAN_SYNC, USAGE_SYNC, meter_event_errors
from reconciler.webhooks.inbox import InboxItem, WebhookInbox

log = structlog.get_logger(__name__)


class WebhookWorker:
    def __init__(
        self,
        inbox: WebhookInbox,
        app: Callable[[], App],
        ledger: UsageLedger,
        usage_lock: threading.Lock,
        metrics: Metrics,
    ):
        self._inbox = inbox
        self._app = app
        self._ledger = ledger
        self._usage_lock = usage_lock
        self._metrics = metrics

    def work_off(self) -> None:
        """Everything due now; many events for one customer cost one targeted cycle."""
        by_work: dict[tuple[str, str | None], list[InboxItem]] = defaultdict(list)
        claimed = self._inbox.claim_due()
        for item in claimed:
            for work in item.work.split(","):
                by_work[(work, item.customer_id)].append(item)
        errors: dict[int, str] = {}
        for (work, customer), items in by_work.items():
            # Each meter-error event is fetched on its own, so one failed fetch retries only its own event.
            for group in [[item] for item in items] if work == METER_ERRORS else [items]:
                with structlog.contextvars.bound_contextvars(webhook_work=work, customer=customer):
                    try:
                        error = self._run(work, customer, group)
                    except Exception as exc:  # retried with backoff; the scheduled cycles are the safety net
                        log.exception("webhook work crashed")
                        error = f"{type(exc).__name__}: {exc}"
                if error:
                    errors.update({item.id: error for item in group})
        for item in claimed:
            if item.id in errors:
                self._inbox.retry_later(item, errors[item.id])
            else:
                self._inbox.done(item)

    def _run(self, work: str, customer: str | None, items: list[InboxItem]) -> str | None:
        """The work's failures in one line (the item is retried), None when it is done."""
        if work == METER_ERRORS:
            return self._fetch_meter_errors(self._app(), items)
        result = self._cycle(self._app(), work, customer)
        return None if result is None else failure_text(result)

    def _cycle(self, app: App, work: str, customer: str | None) -> JobResult | None:
        """A targeted cycle of the job the work names, for its customer; None when there is no such job to run."""
        if not customer:
            return None
        if work == USAGE_SYNC:
            # Meter prices only: Stripe accepts no legacy usage records after a rollover, so their last sync
            # runs before period end on the schedule instead.
            with self._usage_lock:
                return app.usage_sync.run_cycle(customers=frozenset({customer}), include_legacy=False)
        if work == BALANCE_SYNC and app.balance_sync is not None:
            return app.balance_sync.run_cycle(customers=frozenset({customer}))
        if work == PLAN_SYNC and app.plan_sync is not None:
            return app.plan_sync.run_cycle(customers=frozenset({customer}))
        return None

    def _fetch_meter_errors(self, app: App, items: list[InboxItem]) -> str | None:
        for item in items:
            try:
                self._record_meter_errors(app, item)
            except UpstreamError as exc:  # Stripe keeps the event for 30 days: the retries have time
                log.warning("could not fetch a thin event from Stripe", event_id=item.event_id, error=str(exc))
                return f"fetching {item.event_id}: {exc}"
        return None

    def _record_meter_errors(self, app: App, item: InboxItem) -> None:
        """A thin meter-error event names no errors itself: its `data` is fetched from Stripe (a failed fetch raises,
        and the item is retried like other failed work), then each sample error is noted on the intent it names."""
        event = app.stripe.v2_event(item.event_id)
        errors = meter_event_errors(event)
        log.warning(
            "Stripe reported rejected meter events",
            event_id=item.event_id,
            type=event.get("type"),
            summary=(event.get("data") or {}).get("developer_message_summary"),
            samples=len(errors),
        )
        for error in errors:
            self._metrics.meter_event_errors.labels(error.code).inc()
            found = self._ledger.record_rejected_event(error.identifier, f"{error.code}: {error.message}")
            log.warning(
                "Stripe rejected a meter event" if found else "Stripe rejected a meter event the ledger does not know",
                identifier=error.identifier,
                code=error.code,
                message=error.message,
                known=found,
            )
