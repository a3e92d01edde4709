"""The usage sync cycle: the imperative shell around `decide`.

For every stream period: resend a pending intent first (a crash left it; reconciler.usage.recovery), ask
OpenMeter for the rounded window's total, decide, then write the intent, call Stripe, and mark it done. One
stream's failure is logged with its context and counted; the cycle goes on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import ClassVar, Protocol
from zoneinfo import ZoneInfo

import structlog

from reconciler.config import Config
from reconciler.jobs import JobName
from reconciler.metrics import NO_METRICS, Metrics
from reconciler.redact import redact
from reconciler.results import RunStatus, run_status
from reconciler.upstream.errors import (
    IdentifierTakenError,
    PermanentError,
    TransientError,
    UpstreamError,
)
from reconciler.usage.batch_log import BatchTally
from reconciler.usage.codec import dump_work, load_work
from reconciler.usage.cycle_meters import CycleMeters
from reconciler.usage.decide import (
    Action,
    Decision,
    LedgerState,
    Timing,
    decide,
    final_sync_due_at,
    reopen_for_backfill,
    writes_nothing,
)
from reconciler.usage.history import periods_between
from reconciler.usage.listing import MemoryListing
from reconciler.usage.measure import SUBJECTS_PER_QUERY, Measurements, Need, UsageQueries, measure
from reconciler.usage.model import (
    BillingPeriod,
    ContendedError,
    CycleSummary,
    Fence,
    Intent,
    KnownMeter,
    LeaseLostError,
    Meter,
    MeteredItem,
    RecordedPeriod,
    Refusal,
    Stream,
    StreamKind,
    StreamPeriod,
    UsageWindow,
)
from reconciler.usage.outcomes import Completions, SentMarks, Settlement
from reconciler.usage.periods import ONE_SECOND, usage_window
from reconciler.usage.pipeline import KeyedLocks, SyncItem, batched, run_pipeline
from reconciler.usage.ports import Coordination, ListingBook, MeterStore, Runs, UnbilledBook, UsageBook
from reconciler.usage.recovery import Recovery
from reconciler.usage.rounding import round_quantity
from reconciler.usage.stream_batches import StreamBatches
from reconciler.usage.streams import LIVE_STATUSES, build_work, clashes, classify, meter_problem

log = structlog.get_logger(__name__)

MAX_WAIT_FOR_EVENT_SLOT = timedelta(seconds=2)
CLAIM_BATCH = SUBJECTS_PER_QUERY  # work items a replica claims at once: one OpenMeter query's worth
SENT_MARKS_PER_TRANSACTION = 50  # Stripe's acceptances recorded in one ledger transaction (reconciler.usage.outcomes)
PLAN_WAIT = timedelta(seconds=30)  # how often replicas waiting for a plan check its planner is still live
LISTING_BATCH = 2000  # stream periods written to the cycle's listing in one insert (and commit)
REFUSALS_BATCH = 500  # refused items recorded (reconciler.ledger.unbilled) in one transaction
REVISIT_BATCH = 1000  # ended periods the ledger remembers, checked against the listing in one query


class StripePort(Protocol):
    def list_meters(self) -> dict[str, Meter]: ...
    def metered_items(self, *, with_customer: bool, customers: frozenset[str] = ...) -> Iterable[MeteredItem]: ...
    # `renew_key` commits a fresh idempotency key for the intent before a resend after a 5xx answer.
    def send_meter_event(self, intent: Intent, renew_key: Callable[[Intent], Intent]) -> None: ...
    def send_usage_record(self, intent: Intent, renew_key: Callable[[Intent], Intent]) -> None: ...
    # `stripe.meter_events: v2_stream`: up to 100 meter events in one request (reconciler.usage.stream_batches).
    def send_meter_event_batch(self, intents: Sequence[Intent]) -> None: ...
    def meter_total(self, meter_id: str, customer: str, start: datetime, end: datetime) -> Decimal: ...
    def legacy_usage_total(self, item_id: str, period_start: datetime) -> int | None: ...


class OpenMeterPort(UsageQueries, Protocol):
    def query_total(self, meter: str, subject: str, window: UsageWindow) -> Decimal: ...
    def meters(self) -> dict[str, KnownMeter]: ...


@dataclass(frozen=True)
class PreparedBatch:
    """What a batch of stream periods needs before syncing, read in a few requests for all of them: OpenMeter's
    totals, and the ledger's state of every period with nothing pending."""

    measurements: Measurements
    states: dict[tuple[str, datetime], LedgerState]
    tally: BatchTally  # the batch's one INFO line, once its last item is synced


@dataclass(frozen=True)
class PlannedReport:
    """The decision for one stream period and what the ledger held before it (a dry run's plan line)."""

    work: StreamPeriod
    decision: Decision
    reported_total: int


@dataclass
class CycleResult:
    job: ClassVar[str] = JobName.USAGE_SYNC
    run_id: str | None
    summary: CycleSummary
    plan: list[PlannedReport] = field(default_factory=list)
    interrupted: bool = False
    next_final_sync: datetime | None = None  # the earliest upcoming final-sync deadline seen this cycle
    aborted: bool = False  # Stripe's subscriptions or meters could not be listed: nothing was synced
    dry_run: bool = False
    # Held while counting into the result: the workers fold their items' results in while the plan may still count
    # refusals (those it finds after it began yielding work).
    merging: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.summary.failed == 0 and not self.interrupted

    # -- the shared shape (reconciler.results.JobResult) --

    @property
    def status(self) -> RunStatus:
        return run_status(
            dry_run=self.dry_run, failed=self.summary.failed, interrupted=self.interrupted, aborted=self.aborted
        )

    @property
    def failures(self) -> list[str]:
        return self.summary.failures

    @property
    def attention(self) -> list[str]:
        counted = {"late drift (final, not billable)": self.summary.late_drift, "unmapped": self.summary.unmapped}
        return [f"{name}: {n} stream period(s)" for name, n in counted.items() if n]

    def counts(self) -> dict[str, object]:
        return self.summary.as_dict()

    def add(self, other: CycleResult) -> None:
        """Fold one item's result (synced in another thread) into the cycle's."""
        self.summary.add(other.summary)
        self.plan += other.plan
        if other.next_final_sync is not None and (
            self.next_final_sync is None or other.next_final_sync < self.next_final_sync
        ):
            self.next_final_sync = other.next_final_sync


class UsageSync:
    def __init__(
        self,
        config: Config,
        stripe: StripePort,
        openmeter: OpenMeterPort,
        ledger: UsageBook,
        runs: Runs,
        clock: Callable[[], datetime],
        *,
        meter_cache: MeterStore,
        stop_requested: Callable[[], bool] = lambda: False,
        listings: ListingBook,
        metrics: Metrics = NO_METRICS,
        unbilled: UnbilledBook | None = None,
    ):
        self._config = config
        self._listings = listings
        self._metrics = metrics
        self._unbilled = unbilled
        self._stripe = stripe
        self._openmeter = openmeter
        self._ledger = ledger
        self._runs = runs
        self._clock = clock
        self._stop_requested = stop_requested
        self._zone = ZoneInfo(config.usage.window_time_zone)
        self._streams = KeyedLocks()
        self._sent_marks = SentMarks(flush_at=SENT_MARKS_PER_TRANSACTION)
        self._stream_batches = (
            StreamBatches(
                send=lambda intents: self._stripe.send_meter_event_batch(intents),
                accepted=self._sent_marks.add,
                failed=self._batch_failed,
            )
            if config.stripe.meter_events == "v2_stream"
            else None
        )
        self._meter_cache = meter_cache
        self._timing = Timing(
            grace_period=config.usage.grace_period,
            invoice_grace_period=config.stripe.invoice_grace_period,
            legacy_final_sync_before=config.usage.legacy_final_sync_before,
        )
        self._recovery = Recovery(
            stripe,
            clock,
            invoice_grace_period=config.stripe.invoice_grace_period,
            summary_lag=config.stripe.summary_lag,
            send=self._send,
        )

    def run_cycle(
        self, *, dry_run: bool = False, customers: frozenset[str] = frozenset(), include_legacy: bool = True
    ) -> CycleResult:
        """One cycle over every stream (or only `customers`'; `include_legacy=False` leaves legacy prices out)."""

        def local_plan(now: datetime, result: CycleResult) -> Iterator[SyncItem]:
            with closing(self._planned_work(now, customers, result)) as work:
                for unit in work:
                    if include_legacy or unit.stream.kind is not StreamKind.LEGACY:
                        yield SyncItem(unit)

        return self._timed(dry_run, local_plan)

    def run_shared_cycle(self, coordinator: Coordination, tick_key: str) -> CycleResult:
        """One cycle shared by every live replica on PostgreSQL: the replica that wins the tick lists Stripe
        and writes the plan; all of them claim its items in batches under leases and sync them."""

        def shared_plan(now: datetime, result: CycleResult) -> Iterator[SyncItem]:
            tick_id = coordinator.claim_tick(JobName.USAGE_SYNC, tick_key)
            if tick_id is not None:
                try:
                    with closing(self._planned_work(now, frozenset(), result)) as work:
                        planned = coordinator.enqueue(tick_id, JobName.USAGE_SYNC, (dump_work(unit) for unit in work))
                except Exception:
                    # No plan is coming (e.g. Stripe's listing failed): the replicas waiting for it stop waiting.
                    with suppress_logged("could not abandon the tick; the others wait until this replica stops"):
                        coordinator.abandon_tick(tick_id)
                    raise
                log.info("cycle planned for all replicas", tick=tick_key, items=planned)
            else:
                self._await_plan(coordinator, tick_key)
            after = 0  # the plan is claimed in order: each claim starts where this replica's last one ended
            while not self._stop_requested():
                claims = coordinator.claim_batch(JobName.USAGE_SYNC, CLAIM_BATCH, after)
                if not claims:
                    return
                after = max(after, max(claim.item_id for claim in claims))
                for position, claim in enumerate(claims):
                    try:
                        yield SyncItem(load_work(claim.payload), claim.fence, partial(completions.add, claim))
                    except GeneratorExit:
                        coordinator.release(claims[position:])  # stopped: hand the rest back at once
                        raise

        def end_claims() -> None:
            completions.flush()
            # Claims the cycle never synced (it failed) go back at once: the heartbeat would keep them.
            with suppress_logged("could not give back unsynced claims; they go back when this replica stops"):
                coordinator.release_held(JobName.USAGE_SYNC)

        completions = Completions(coordinator.complete_all, flush_at=CLAIM_BATCH)
        try:
            # A claim is one batch of the pipeline: its items wait there under leases the heartbeat renews.
            result = self._timed(False, shared_plan, batch_size=CLAIM_BATCH)
        except Exception:
            end_claims()
            raise
        end_claims()
        return result

    def _await_plan(self, coordinator: Coordination, tick_key: str) -> None:
        """Wait for the planning replica's plan for as long as that replica is live: listing a large account takes
        minutes, and a replica that stopped waiting would find nothing to claim and sit the cycle out."""
        deadline = time.monotonic() + PLAN_WAIT.total_seconds()
        while coordinator.plan_ready(JobName.USAGE_SYNC, tick_key) is False:
            if self._stop_requested():
                return
            if time.monotonic() >= deadline:
                if not coordinator.planner_live(JobName.USAGE_SYNC, tick_key):
                    log.warning("the replica planning this cycle stopped; its plan is not waited for", tick=tick_key)
                    return
                deadline = time.monotonic() + PLAN_WAIT.total_seconds()
            time.sleep(0.2)

    def _timed(
        self,
        dry_run: bool,
        plan: Callable[[datetime, CycleResult], Iterator[SyncItem]],
        batch_size: int = SUBJECTS_PER_QUERY,
    ) -> CycleResult:
        started = time.perf_counter()
        result = self._cycle(dry_run, plan, batch_size)
        if not dry_run:
            self._metrics.job_finished(result, time.perf_counter() - started)
            for name, value in result.summary.as_dict().items():
                if name != "seen" and isinstance(value, int) and value:
                    self._metrics.usage_items.labels(name).inc(value)
        return result

    def _cycle(
        self, dry_run: bool, plan: Callable[[datetime, CycleResult], Iterator[SyncItem]], batch_size: int
    ) -> CycleResult:
        now = self._clock()
        run_id = None if dry_run else self._runs.start(JobName.USAGE_SYNC)
        result = CycleResult(run_id=run_id, summary=CycleSummary(), dry_run=dry_run)
        with structlog.contextvars.bound_contextvars(run_id=run_id, dry_run=dry_run):
            log.info("usage sync started", now=now.isoformat())
            units = plan(now, result)  # counts its refusals into `result` as it finds them, under result.merging
            merging = result.merging
            meters = CycleMeters(self._meter_cache, self._openmeter.meters, keep_listing=not dry_run)
            batches = itertools.count(1)  # numbers the batch lines

            def sync(item: SyncItem, prepared: PreparedBatch) -> None:
                own = CycleResult(run_id=run_id, summary=CycleSummary())
                # A replica's claim completes once the outcomes this sync left buffered are written, not before.
                settlement = Settlement(item.done) if item.done is not None else None
                try:
                    with self._streams.hold(item.unit.stream.key):  # the pipeline's workers run in the cycle's context
                        self._sync_one(
                            item.unit, now, run_id, dry_run, own, item.fence, prepared=prepared, settlement=settlement
                        )
                finally:
                    if settlement is not None:
                        settlement.synced()
                with merging:
                    result.add(own)
                prepared.tally.add(own.summary)

            try:
                try:
                    result.interrupted = run_pipeline(
                        units,
                        measure=lambda batch: self._prepare_batch(batch, now, meters, next(batches), result),
                        sync=sync,
                        batch_size=batch_size,
                        workers=self._config.stripe.concurrency(),
                        measurers=self._config.openmeter.max_concurrency,
                        stop_requested=self._stop_requested,
                    )
                except Exception:
                    # A failed cycle still writes what it buffered (the buffers outlive it, and a replica's claim
                    # completes once its outcomes are written); a BaseException is the process going down: nothing.
                    self._flush_outcomes(result)
                    raise
                self._flush_outcomes(result)
                if result.interrupted:
                    log.warning("stop requested: ending the cycle after the items in flight")
            except UpstreamError as exc:
                log.error("usage sync could not list Stripe subscriptions or meters", error=str(exc))
                result.summary.failed += 1
                result.summary.failures.append(f"listing: {exc}")
                result.aborted = True
                self._finish(result)
                return result
            finally:
                units.close()  # type: ignore[attr-defined]
            result.plan.sort(key=lambda p: (p.work.stream.key, p.work.period.start))  # workers finish in any order
            self._finish(result)
        return result

    # -- collecting ----------------------------------------------------------------------------------

    def _planned_work(self, now: datetime, customers: frozenset[str], result: CycleResult) -> Iterator[StreamPeriod]:
        """The cycle's stream periods (only `customers`' if given), with memory that does not grow with their number.

        Stripe's listing goes into the cycle's listing in the ledger a batch at a time (a dry run's stays in memory:
        it writes nothing anywhere) and is read back stream by stream, so that nothing is yielded before every item of
        a (customer, meter) is known: two items that bill it in overlapping periods are refused together, however far
        apart Stripe listed them. Then the ended periods only the ledger still remembers. Refused items are counted
        and recorded as they are found."""
        usage = self._config.usage
        listings: ListingBook = MemoryListing() if result.dry_run else self._listings
        refused = _Refused(self, now, result, full=not customers)
        meters = self._stripe.list_meters()
        listing = listings.open()
        try:
            items = self._stripe.metered_items(
                with_customer=usage.subject_metadata_key is not None, customers=customers
            )
            for batch in batched(classify(items, meters, usage, now), LISTING_BATCH):
                listings.add(listing, [unit for unit in batch if isinstance(unit, StreamPeriod)])
                refused.add(unit for unit in batch if isinstance(unit, Refusal))
            for group in listings.groups(listing, meters):
                clashing = clashes(group)
                if clashing:
                    listings.drop(listing, group[0].stream.key)  # not listed, as far as revisiting goes
                    refused.add(clashing)
                else:
                    yield from group
            for rows in batched(self._ledger.periods_to_revisit(now, usage.lookback, customers), REVISIT_BATCH):
                listed = listings.listed(listing, [(row.stream_key, row.period_start) for row in rows])
                for row in rows:
                    if (row.stream_key, row.period_start) in listed:
                        continue
                    revisit = self._revisit(row, meters)
                    if isinstance(revisit, Refusal):
                        refused.add([revisit])
                    else:
                        yield revisit
            refused.finish()
        finally:
            try:
                listings.close(listing)
            except Exception:  # e.g. the database is briefly away: the rows go once abandoned (ledger/listing.py)
                log.warning("could not delete the cycle's listing", exc_info=True)

    def _revisit(self, row: RecordedPeriod, meters: dict[str, Meter]) -> StreamPeriod | Refusal:
        """A period only the ledger still remembers (the item moved on): rebuild its stream from the row."""
        mapping = self._config.usage.mapping_for(row.stripe_target)
        meter = meters.get(row.meter_id) if row.meter_id else None
        problem = None
        if mapping is None:
            problem = f"{row.stripe_target!r} is no longer in usage.meters; its open period cannot be finished"
        elif row.meter_id and meter is None:
            problem = f"meter {row.meter_id} is no longer listed by Stripe"
        elif meter is not None:
            problem = meter_problem(meter)
        if problem or mapping is None:
            return Refusal(row.customer_id, row.subscription_item_id, row.stripe_target, problem or "")
        stream = Stream(
            kind=StreamKind(row.kind),
            customer_id=row.customer_id,
            subscription_id=row.subscription_id,
            item_id=row.subscription_item_id,
            stripe_target=row.stripe_target,
            openmeter_meter=mapping.openmeter,
            subject=row.subject,
            rounding=mapping.rounding,
            meter=meter,
            unit_amount=row.unit_amount,
            currency=row.currency,
        )
        return StreamPeriod(stream, BillingPeriod(row.period_start, row.period_end), is_current=False)

    # -- one stream period ---------------------------------------------------------------------------

    def _sync_one(
        self,
        work: StreamPeriod,
        now: datetime,
        run_id: str | None,
        dry_run: bool,
        result: CycleResult,
        fence: Fence | None = None,
        reopen_final: bool = False,
        prepared: PreparedBatch | None = None,
        settlement: Settlement | None = None,
    ) -> PlannedReport | None:
        """Sync one stream period; its decision, or None if it failed or another process holds it. Outcomes it
        leaves buffered are each expected by `settlement` (a replica's claim on the item), when given."""
        stream, summary = work.stream, result.summary
        ledger = self._ledger.fenced(fence)
        summary.seen += 1
        with structlog.contextvars.bound_contextvars(
            customer=stream.customer_id,
            subscription_item=stream.item_id,
            meter=stream.stripe_target,
            period_start=work.period.start.isoformat(),
            period_end=work.period.end.isoformat(),
        ):
            try:
                state = prepared.states.get((stream.key, work.period.start)) if prepared else None
                if state is None:  # not read with its batch, or an intent is pending: resend it first
                    if not dry_run:
                        self._recovery.resend_pending(ledger, work, now)
                    state = ledger.state(work)
                if reopen_final:
                    state = reopen_for_backfill(work, state, now, self._timing)
                target = self._measure(work, now, prepared.measurements if prepared else None)
                now = self._after_previous_event(state, now)
                decision = decide(work, state, target, now, self._timing)
                self._note_deadline(work, state, decision, now, result)
                planned = PlannedReport(work, decision, state.reported_total)
                if dry_run:
                    result.plan.append(planned)
                    self._count(decision, summary)
                    return planned
                assert run_id is not None
                self._apply(ledger, work, state, decision, run_id, settlement)
                self._count(decision, summary)
                return planned
            except ContendedError as exc:
                summary.unchanged += 1
                log.info("skipped: another process holds this period", reason=str(exc))
            except LeaseLostError as exc:
                summary.unchanged += 1
                log.warning("skipped: this replica's lease lapsed; another replica syncs the item", reason=str(exc))
            except UpstreamError as exc:
                self._fail(ledger, work, str(exc), summary, dry_run)
            except Exception as exc:  # a bug for one customer must not stop billing for the others
                log.exception("unexpected error")
                self._fail(ledger, work, f"unexpected error: {type(exc).__name__}: {exc}", summary, dry_run)
        return None

    def sync_for_backfill(self, work: StreamPeriod, run_id: str | None, result: CycleResult) -> PlannedReport | None:
        """One stream period of a backfill: the same rules and ledger as the cycle, plus corrections into final
        periods Stripe still bills (reconciler.usage.decide.reopen_for_backfill). `run_id` None: a dry run."""
        try:
            return self._sync_one(work, self._clock(), run_id, run_id is None, result, reopen_final=True)
        finally:
            self._flush_outcomes(result)

    def backfill_work(
        self, since: datetime, until: datetime, customers: frozenset[str], meters: frozenset[str]
    ) -> list[tuple[StreamPeriod, MeteredItem]]:
        """Every stream period overlapping `[since, until)`, from each metered item's billing cycle anchor,
        canceled subscriptions included."""
        meters_by_id = self._stripe.list_meters()
        with_customer = self._config.usage.subject_metadata_key is not None
        units: list[tuple[StreamPeriod, MeteredItem]] = []
        for item in self._stripe.metered_items(with_customer=with_customer, customers=customers):
            current, _ = build_work(
                [replace(item, subscription_status="active")], meters_by_id, self._config.usage, item.period.start
            )
            if not current:
                continue  # unmapped or refused: the scheduled cycle reports why
            stream = current[0].stream
            if meters and stream.stripe_target not in meters:
                continue
            anchor = item.billing_cycle_anchor or item.period.start
            first = max(since, item.started_at or since)
            last = min(until, item.ended_at or until)
            for period in periods_between(anchor, item.interval, item.interval_count, first, last):
                if item.ended_at and period.end > item.ended_at:
                    period = BillingPeriod(period.start, item.ended_at)
                is_current = period.start == item.period.start and item.subscription_status in LIVE_STATUSES
                units.append((StreamPeriod(stream, period, is_current=is_current), item))
        return units

    def _after_previous_event(self, state: LedgerState, now: datetime) -> datetime:
        """Meter events of one stream must be at least a second apart and never in the future. When the last one
        was sent within the past second (a webhook-triggered cycle right after a scheduled one), wait out that
        second rather than fail the stream."""
        if state.last_event_at is None:
            return now
        wait = (state.last_event_at + ONE_SECOND - now).total_seconds()
        if 0 < wait <= MAX_WAIT_FOR_EVENT_SLOT.total_seconds():
            time.sleep(wait)
            return max(now, self._clock())
        return now

    def _need(self, work: StreamPeriod, now: datetime) -> Need | None:
        """What to ask OpenMeter for this stream period; None for an empty window (OpenMeter answers 400 to equal
        bounds, and an empty window holds no usage anyway)."""
        window = usage_window(work.period, now, self._config.usage.window_size, self._zone)
        return None if window.is_empty else Need(work.stream.openmeter_meter, work.stream.subject, window)

    def _prepare_batch(
        self, batch: list[SyncItem], now: datetime, cycle_meters: CycleMeters, number: int, result: CycleResult
    ) -> tuple[PreparedBatch, list[SyncItem]]:
        """Measure a batch, read its ledger states and settle the items that leave Stripe and the ledger as they are;
        returns the batch's measurements and states, and the items left to sync."""
        units = [item.unit for item in batch]
        needs = [self._need(unit, now) for unit in units]  # None for an empty window
        asked = [need for need in needs if need is not None]
        usage = self._config.usage
        meters = cycle_meters.covering({need.meter for need in asked})
        measured = measure(self._openmeter, asked, meters, usage.window_size, usage.window_time_zone)
        cycle_meters.failed(measured.failed_meters & meters.keys())
        try:
            states = self._ledger.settled_states(units)
        except Exception:  # e.g. the database is briefly away: each item reads its own state instead
            log.warning("could not read the batch's ledger states; reading them one by one", exc_info=True)
            states = {}
        prepared = PreparedBatch(measured, states, BatchTally(number, len(units)))
        return prepared, self._settle_quiet(batch, needs, prepared, now, result)

    def _settle_quiet(
        self,
        batch: list[SyncItem],
        needs: list[Need | None],
        prepared: PreparedBatch,
        now: datetime,
        result: CycleResult,
    ) -> list[SyncItem]:
        """Settle, here and now, the batch's items whose decision writes nothing (a warm cycle's unchanged items, most
        of a cycle's): the same `decide` as in `_sync_one`, without a worker, a stream lock or a result of its own
        each, which cost more than deciding. Returns the items left for the workers."""
        quiet = CycleResult(run_id=result.run_id, summary=CycleSummary())
        left: list[SyncItem] = []
        for item, need in zip(batch, needs, strict=True):
            work = item.unit
            settled = self._quiet_decision(work, need, prepared, now)
            if settled is None:
                left.append(item)
                continue
            state, decision = settled
            quiet.summary.seen += 1
            self._count(decision, quiet.summary)
            self._note_deadline(work, state, decision, now, quiet)
            if result.dry_run:
                quiet.plan.append(PlannedReport(work, decision, state.reported_total))
            if item.done is not None:
                item.done()  # a replica's claim: nothing is left buffered for it
        if quiet.summary.seen:
            with result.merging:
                result.add(quiet)
            prepared.tally.add(quiet.summary, items=quiet.summary.seen)
        return left

    def _quiet_decision(
        self, work: StreamPeriod, need: Need | None, prepared: PreparedBatch, now: datetime
    ) -> tuple[LedgerState, Decision] | None:
        """The item's state and decision if that decision writes nothing; None when it may write, or when anything
        about it is not plain (nothing read for it with the batch, a failed query, the stream's last meter event
        less than a second ago): `_sync_one` then takes it, as it takes every item."""
        state = prepared.states.get((work.stream.key, work.period.start))
        if state is None or (state.last_event_at is not None and now < state.last_event_at + ONE_SECOND):
            return None
        try:
            target = 0 if need is None else self._target_of(work, prepared.measurements.total(need))
        except Exception:  # not measured with the batch, or the error its measuring found: `_sync_one` reports it
            return None
        decision = decide(work, state, target, now, self._timing)
        return (state, decision) if writes_nothing(state, decision) else None

    def _measure(self, work: StreamPeriod, now: datetime, measured: Measurements | None = None) -> int:
        need = self._need(work, now)
        if need is None:
            return 0
        if measured is not None and need in measured:
            total = measured.total(need)
        else:
            total = self._openmeter.query_total(need.meter, need.subject, need.window)
        return self._target_of(work, total)

    @staticmethod
    def _target_of(work: StreamPeriod, total: Decimal) -> int:
        return round_quantity(total, work.stream.rounding)

    def _note_deadline(
        self, work: StreamPeriod, state: LedgerState, decision: Decision, now: datetime, result: CycleResult
    ) -> None:
        due = None if decision.final else final_sync_due_at(work, state, self._timing)
        if due is not None and due > now and (result.next_final_sync is None or due < result.next_final_sync):
            result.next_final_sync = due

    def _apply(
        self,
        ledger: UsageBook,
        work: StreamPeriod,
        state: LedgerState,
        decision: Decision,
        run_id: str,
        settlement: Settlement | None = None,
    ) -> None:
        if decision.action is Action.FAIL:
            raise PermanentError("reconciler", decision.reason)
        if writes_nothing(state, decision):
            return
        if decision.action is not Action.REPORT:
            ledger.observe(work, decision, run_id)
            if decision.action is Action.LATE_DRIFT:
                log.warning(
                    "late drift",
                    reported_total=state.reported_total,
                    measured_total=decision.target,
                    reason=decision.reason,
                )
            elif decision.action is Action.FINALIZE:
                log.debug("period final", total=decision.target)
            return
        intent = ledger.record_intent(work, decision, run_id, based_on=state)
        log.debug(
            "reporting",
            identifier=intent.identifier,
            quantity=intent.quantity,
            total=intent.total_after,
            previous_total=state.reported_total,
            final=intent.final,
        )
        direction = "up" if intent.quantity >= 0 else "down"
        self._metrics.usage_quantity.labels(work.stream.stripe_target, direction).inc(abs(intent.quantity))
        self._send(ledger, work, intent, group_commit=True, settlement=settlement)

    def _send(
        self,
        ledger: UsageBook,
        work: StreamPeriod,
        intent: Intent,
        *,
        group_commit: bool = False,
        settlement: Settlement | None = None,
    ) -> None:
        """Send an intent and record its outcome; `group_commit`: an acceptance is recorded with others, by the
        cycle's SentMarks (reconciler.usage.outcomes). With `stripe.meter_events: v2_stream` a meter event of the
        cycle goes to the stream in a batch (reconciler.usage.stream_batches), which records its outcome when the
        batch leaves; a resend of a pending one (recovery) goes at once, alone, as its outcome decides what follows.
        `settlement` expects each outcome left buffered."""
        send = self._stripe.send_usage_record if intent.kind is StreamKind.LEGACY else self._stripe.send_meter_event
        if self._stream_batches is not None and intent.kind is not StreamKind.LEGACY:
            if group_commit:
                self._stream_batches.add(ledger, work, intent, settlement.expect() if settlement else None)
                return
            send = self._send_alone_to_stream
        try:
            send(intent, ledger.renew_idempotency_key)
        except UpstreamError as exc:
            self._settle_failed_send(ledger, work, intent, exc)
            return
        if group_commit:
            self._sent_marks.add(ledger, intent, settlement.expect() if settlement else None)
        else:
            ledger.mark_sent(intent)

    def _send_alone_to_stream(self, intent: Intent, renew_key: Callable[[Intent], Intent]) -> None:
        self._stripe.send_meter_event_batch([intent])  # identifiers, not idempotency keys, make a resend safe

    def _settle_failed_send(self, ledger: UsageBook, work: StreamPeriod, intent: Intent, exc: UpstreamError) -> None:
        """Record what a failed send means for the intent, and raise what the stream period failed with (nothing when
        the intent waits for Stripe's summary)."""
        if isinstance(exc, IdentifierTakenError):
            # The event Stripe holds under the identifier may carry another quantity than ours (a ledger restored
            # from a backup, or one with identifiers from before they had nonces): marking the intent sent could
            # lose or mis-bill usage. It stays pending, attempts unchanged, until Stripe's summary settles it.
            self._recovery.settle_from_meter_summary(
                ledger, work, intent, f"Stripe already holds its identifier: {exc}"
            )
            return
        if isinstance(exc, PermanentError):
            if intent.kind is StreamKind.METER_SUM and intent.attempts > 0:
                # An earlier send of this difference may have been applied: refusing it now proves nothing, and a
                # new intent could bill it twice. It stays pending for a person to resolve.
                ledger.note_attempt(intent, str(exc))
                raise PermanentError(
                    "reconciler",
                    f"resend of {intent.identifier} refused ({exc}) after an earlier attempt's outcome was unknown; "
                    "check the meter's event summaries in Stripe",
                ) from None
            ledger.mark_failed(intent, str(exc))
            raise exc
        if isinstance(exc, TransientError):
            # Stays pending: resent next cycle, same identifier, under the key the ledger now holds for it.
            ledger.note_attempt(intent, str(exc))
        raise exc

    def _batch_failed(self, ledger: UsageBook, work: StreamPeriod, intent: Intent, exc: UpstreamError) -> str | None:
        """The outcome of an intent whose stream batch failed, recorded as `_send` records a failed send, and the
        stream period's failure line for the cycle (None when the intent waits for Stripe's summary)."""
        try:
            self._settle_failed_send(ledger, work, intent, exc)
        except UpstreamError as error:
            failed = CycleSummary()
            self._fail(ledger, work, str(error), failed, dry_run=False)
            return failed.failures[0]
        return None

    def _flush_outcomes(self, result: CycleResult) -> None:
        """Send what the stream's buffer holds, then record every buffered acceptance."""
        self._flush_stream_batches(result)
        self._sent_marks.flush()

    def _flush_stream_batches(self, result: CycleResult) -> None:
        """Send the meter events still buffered for the stream, and count the stream periods whose batches failed:
        each was counted reported (and finalized) when its intent was recorded; like a failed single send, it is
        failed instead."""
        if self._stream_batches is None:
            return
        self._stream_batches.flush()
        for failure in self._stream_batches.take_failures():
            result.summary.reported -= 1
            result.summary.finalized -= int(failure.intent.final)
            result.summary.failed += 1
            result.summary.failures.append(failure.error)

    # -- bookkeeping ---------------------------------------------------------------------------------

    @staticmethod
    def _count(decision: Decision, summary: CycleSummary) -> None:
        if decision.action is Action.REPORT:
            summary.reported += 1
        elif decision.action is Action.FAIL:
            summary.failed += 1
            summary.failures.append(decision.reason)
        else:
            summary.unchanged += 1
        if decision.final and decision.action is not Action.FAIL:
            summary.finalized += 1
        if decision.action is Action.LATE_DRIFT:
            summary.late_drift += 1

    def _fail(self, ledger: UsageBook, work: StreamPeriod, error: str, summary: CycleSummary, dry_run: bool) -> None:
        error = redact(error, self._config.secret_values())  # it goes to the ledger and the CLI's output
        summary.failed += 1
        summary.failures.append(f"{work.stream.customer_id} {work.stream.stripe_target}: {error}")
        log.error("stream failed", error=error)
        if not dry_run:
            try:
                ledger.note_failure(work, error)
            except Exception:  # e.g. the lease lapsed: the item's new owner records its own outcome
                log.warning("could not record the failure on the ledger", exc_info=True)

    def _refuse(self, refusal: Refusal, result: CycleResult) -> None:
        fields = {
            "customer": refusal.customer_id,
            "subscription_item": refusal.item_id,
            "meter": refusal.stripe_target,
            "reason": refusal.reason,
        }
        summary = result.summary
        with result.merging:
            summary.seen += 1
            if refusal.unmapped:
                summary.unmapped += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{refusal.customer_id} {refusal.stripe_target}: {refusal.reason}")
        if refusal.unmapped:
            log.warning("unmapped metered item skipped", **fields)
        else:
            log.error("metered item refused", **fields)

    def _record_unbilled(self, refusals: list[Refusal], now: datetime, run_id: str | None) -> None:
        """What nobody bills, for `report`: each refused item's usage measured where the mapping and subject are
        known (one query each: refused items are few, and each is a problem to fix), unknown otherwise."""
        if self._unbilled is None or run_id is None:  # a dry run writes nothing
            return
        measured = []
        for refusal in refusals:
            quantity = None
            if refusal.openmeter_meter and refusal.subject and refusal.period and refusal.rounding:
                window = usage_window(refusal.period, now, self._config.usage.window_size, self._zone)
                try:
                    total = self._openmeter.query_total(refusal.openmeter_meter, refusal.subject, window)
                    quantity = round_quantity(total, refusal.rounding)
                except UpstreamError as exc:
                    log.warning("could not measure a refused item", item=refusal.item_id, error=str(exc))
            measured.append((refusal, quantity))
        self._unbilled.record(measured, run_id)

    def _forget_unbilled(self, since: datetime, run_id: str | None) -> None:
        """After a full cycle recorded what it refused: forget the items it did not refuse."""
        if self._unbilled is not None and run_id is not None:
            self._unbilled.forget_unseen(since)

    def _finish(self, result: CycleResult) -> None:
        log.info("usage sync finished", status=result.status.value, **result.summary.as_dict())
        if result.run_id is not None:
            self._runs.finish(result.run_id, result.status, result.counts())


@contextmanager
def suppress_logged(what: str) -> Iterator[None]:
    """Housekeeping that must not hide the error (or the result) at hand: its own failure is logged as `what`."""
    try:
        yield
    except Exception:
        log.warning(what, exc_info=True)


class _Refused:
    """A cycle's refused items as its plan finds them: each counted (and logged) at once, and recorded for `report` a
    batch at a time; once the plan is complete, a full cycle forgets the items it no longer refuses."""

    def __init__(self, sync: UsageSync, now: datetime, result: CycleResult, *, full: bool):
        self._sync, self._now, self._result, self._full = sync, now, result, full
        self._pending: list[Refusal] = []

    def add(self, refusals: Iterable[Refusal]) -> None:
        for refusal in refusals:
            self._sync._refuse(refusal, self._result)
            self._pending.append(refusal)
            if len(self._pending) >= REFUSALS_BATCH:
                self._record()

    def finish(self) -> None:
        self._record()
        if self._full:
            self._sync._forget_unbilled(self._now, self._result.run_id)

    def _record(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._sync._record_unbilled(pending, self._now, self._result.run_id)
