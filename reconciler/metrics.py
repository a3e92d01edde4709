"""Prometheus metrics (prometheus-client), one registry per process, served at /metrics by `reconciler run`.

The jobs and upstream adapters record into a `Metrics` object handed to them; `NO_METRICS` is a registry
nobody scrapes, for one-shot commands and tests that don't care.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler.results import COMPLETED, JobResult


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter("reconciler_cycles", "Job cycles by job and outcome.", ["job", "outcome"], registry=r)
        self.cycle_duration = Histogram(
            "reconciler_cycle_duration_seconds",
            "Duration of job cycles.",
            ["job"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.last_success = Gauge(
            "reconciler_last_success_timestamp_seconds", "When each job last completed a cycle.", ["job"], registry=r
        )
        self.usage_items = Counter(
            "reconciler_usage_items",
            "Usage stream periods by result (reported, unchanged, failed, ...).",
            ["result"],
            registry=r,
        )
        self.usage_quantity = Counter(
            "reconciler_usage_quantity_reported",
            "Quantity sent to Stripe, by direction (sum-meter corrections can be negative).",
            ["meter", "direction"],
            registry=r,
        )
        self.drift_found = Counter(
            "reconciler_balance_drift_found", "Balance drifts found above tolerance.", ["currency"], registry=r
        )
        self.drift_found_amount = Counter(
            "reconciler_balance_drift_found_amount", "Absolute drift found, currency units.", ["currency"], registry=r
        )
        self.drift_corrected = Counter(
            "reconciler_balance_drift_corrected", "Drifts corrected in Moesif.", ["currency"], registry=r
        )
        self.drift_corrected_amount = Counter(
            "reconciler_balance_drift_corrected_amount",
            "Absolute drift corrected, currency units.",
            ["currency"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "reconciler_upstream_request_duration_seconds",
            "Upstream API call latency (each attempt).",
            ["api"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.upstream_errors = Counter(
            "reconciler_upstream_errors", "Failed upstream calls by API and HTTP status.", ["api", "status"], registry=r
        )
        self.meter_event_errors = Counter(
            "reconciler_meter_event_errors",
            "Meter events Stripe rejected asynchronously (error reports), by code.",
            ["code"],
            registry=r,
        )
        self.upstream_rate_limited = Counter(
            "reconciler_upstream_rate_limited", "Upstream 429 answers.", ["api"], registry=r
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    @contextmanager
    def upstream_call(self, api: str) -> Iterator[None]:
        """Time one upstream attempt; count it as an error (429s separately) if it raises."""
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            status = getattr(exc, "status", None)
            self.upstream_errors.labels(api, str(status or "none")).inc()
            if status == 429:
                self.upstream_rate_limited.labels(api).inc()
            raise
        finally:
            self.upstream_latency.labels(api).observe(time.perf_counter() - started)

    def job_finished(self, result: JobResult, seconds: float) -> None:
        """A job's cycle, as its result tells: counted by outcome, timed, and its last success noted if it went
        through everything it found (some items may have failed: they are counted, and retried)."""
        self.cycle_finished(result.job, result.status.value, seconds, succeeded=result.status in COMPLETED)

    def cycle_finished(self, job: str, outcome: str, seconds: float, *, succeeded: bool) -> None:
        self.cycles.labels(job, outcome).inc()
        self.cycle_duration.labels(job).observe(seconds)
        if succeeded:
            self.last_success.labels(job).set_to_current_time()

    def drift(self, currency: str, amount: Decimal, *, corrected: bool) -> None:
        self.drift_found.labels(currency).inc()
        self.drift_found_amount.labels(currency).inc(float(abs(amount)))
        if corrected:
            self.drift_corrected.labels(currency).inc()
            self.drift_corrected_amount.labels(currency).inc(float(abs(amount)))


class GaugeCallback(Collector):
    """A gauge whose value is read when /metrics is scraped (e.g. pending intents from the ledger)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]):
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


NO_METRICS = Metrics()
