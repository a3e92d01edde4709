"""Run one benchmark size: seed the sandbox, time the product's cold and warm cycles in a child process (so its peak
RSS is its own), time the naive loop on an identically seeded Stripe, and check both billed the same."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess  # runs this same Python on the product's own CLI  # nosec B404
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from reconciler.config import StripeConfig
from reconciler_sandbox.bench.arrivals import ArrivalLog
from reconciler_sandbox.bench.dataset import EVENT_NAME, OPENMETER_METER, billed_totals, seed_openmeter, seed_stripe
from reconciler_sandbox.bench.floor import (
    ApiLimits,
    Floor,
    LimiterUse,
    OneLimit,
    Shape,
    StripeLimits,
    floor,
    limiter_use,
)
from reconciler_sandbox.bench.naive import naive_cycle
from reconciler_sandbox.httpserver import GLOBAL_LIMITER, FakeService, LoopbackServer
from reconciler_sandbox.server import SANDBOX_STRIPE_KEY, Sandbox
from reconciler_sandbox.stripe_fake import FakeStripe


@dataclass(frozen=True)
class Conditions:
    """What the upstream APIs look like in a run: answer latency and the limiters, enforced by the fakes and
    configured in the product alike (the product at the full limits, not its default 80%, so the floor is what the
    fakes allow). Stripe's limiters are live mode's structure (https://docs.stripe.com/rate-limits): a global limit,
    one per endpoint, and meter events apart (None: counted in the global limit, as in a Stripe sandbox)."""

    stripe_latency: float = 0.040
    openmeter_latency: float = 0.060
    stripe_global_per_second: float = 100
    stripe_endpoint_per_second: float = 25
    stripe_meter_events_per_second: float | None = 1000
    openmeter_per_second: float = 50
    moesif_latency: float = 0.080
    moesif_per_minute: float = 500  # Moesif's Management API budget, and the most the product may be configured to
    # Requests the product keeps in flight (its `*.max_concurrency`, the defaults): a latency-bound term of the floor.
    # None: the product's own default for these limits (budget × latency, `StripeConfig.concurrency`).
    stripe_concurrency: int | None = None
    openmeter_concurrency: int = 4
    moesif_concurrency: int = 4
    # The product's `stripe.meter_events`: v1 (a request per meter event) or v2_stream (up to 100 per request).
    meter_events: str = "v1"
    # Usage in every hour of each customer's period (dataset.seed_openmeter), not only a few events.
    usage_every_hour: bool = False

    def lifted(self) -> Conditions:
        """No latency and limits far above the loopback's speed: measures memory and CPU, not waiting."""
        return replace(
            self,
            stripe_latency=0.0,
            openmeter_latency=0.0,
            stripe_global_per_second=5000,
            stripe_endpoint_per_second=5000,
            stripe_meter_events_per_second=None if self.stripe_meter_events_per_second is None else 5000,
            openmeter_per_second=1000,
        )

    @property
    def stripe_limits(self) -> StripeLimits:
        return StripeLimits(
            global_per_second=self.stripe_global_per_second,
            endpoint_per_second=self.stripe_endpoint_per_second,
            meter_events_per_second=self.stripe_meter_events_per_second,
        )

    @property
    def limits(self) -> dict[str, ApiLimits]:
        """Every API's limiters, as the fakes enforce them."""
        return {
            "stripe": self.stripe_limits,
            "openmeter": OneLimit("openmeter", max(1, int(self.openmeter_per_second))),
            "moesif": OneLimit("moesif", max(1, int(self.moesif_per_minute)), 60.0),
        }

    @property
    def latency(self) -> dict[str, float]:
        return {"stripe": self.stripe_latency, "openmeter": self.openmeter_latency, "moesif": self.moesif_latency}

    @property
    def stripe_in_flight(self) -> int:
        """The Stripe requests the product keeps in flight under these conditions."""
        settings = stripe_config(self)
        return StripeConfig(api_key=SANDBOX_STRIPE_KEY, **settings).concurrency()

    def usage_cycle_shape(self) -> Shape:
        """A usage cycle: the subscription listing page after page; Stripe and OpenMeter each with the product's
        requests in flight."""
        return Shape(
            in_flight={"stripe": self.stripe_in_flight, "openmeter": self.openmeter_concurrency},
            paged=[("stripe", SUBSCRIPTIONS)],
        )


# The read-back and the naive loop make one request at a time.
ONE_AT_A_TIME = Shape(one_at_a_time=True)
SUBSCRIPTIONS = "GET /v1/subscriptions"


# Each benchmarked command, and the log lines its cycle starts and finishes with.
CYCLE_EVENTS = {
    "sync-usage": ("usage sync started", "usage sync finished"),
    "read-back": ("read-back started", "read-back finished"),
    "reconcile-balances": ("balance reconcile started", "balance reconcile finished"),
}


@dataclass
class LimitsCheck:
    """A run against the limiters: its requests per endpoint, each limiter's use (the most requests within any of
    its windows), the floor and its binding term, and whether it kept within every limiter with no 429."""

    endpoint_requests: dict[str, dict[str, int]]
    limiters: dict[str, LimiterUse]
    floor: Floor
    answered_429: int
    within_limits: bool


@dataclass
class CycleMeasurement:
    wall_seconds: float  # the cycle, from the product's own "... started" to "... finished" log lines
    process_seconds: float  # the whole `reconciler sync-usage` process, interpreter start-up included
    cpu_seconds: float
    peak_rss_mb: float
    exit_code: int
    requests: dict[str, int]
    max_requests_in_one_second: dict[str, int]
    answered_429: dict[str, int]
    limits: LimitsCheck
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def floor_ratio(self) -> float:
        return self.wall_seconds / self.limits.floor.seconds if self.limits.floor.seconds else float("nan")


class Upstreams:
    """The fakes a run talks to, by API name, each with an arrival log, under `conditions`."""

    def __init__(self, fakes: dict[str, FakeService], conditions: Conditions) -> None:
        self.fakes = fakes
        self.conditions = conditions
        self.logs = {name: ArrivalLog.of(fake) for name, fake in fakes.items()}

    def reset(self) -> None:
        """Forget what was counted so far (a benchmark's next phase)."""
        for name, fake in self.fakes.items():
            fake.reset_counters()
            self.logs[name].clear()

    def check(self, shape: Shape) -> LimitsCheck:
        """What the fakes saw since the last reset, against the limiters; the floor for a run shaped `shape`."""
        arrivals = {name: log.snapshot() for name, log in self.logs.items()}
        endpoint_requests = {name: _count_endpoints(entries) for name, entries in arrivals.items()}
        limits = self.conditions.limits
        uses = limiter_use(arrivals, limits)
        run_floor = floor(endpoint_requests, limits, self.conditions.latency, shape)
        answered_429 = sum(fake.rate_limited for fake in self.fakes.values())
        return LimitsCheck(
            endpoint_requests=endpoint_requests,
            limiters=uses,
            floor=Floor(
                round(run_floor.seconds, 3), run_floor.binding, {k: round(v, 3) for k, v in run_floor.terms.items()}
            ),
            answered_429=answered_429,
            within_limits=answered_429 == 0 and not any(use.exceeded for use in uses.values()),
        )


def _count_endpoints(entries: list[tuple[float, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, endpoint in entries:
        counts[endpoint] = counts.get(endpoint, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class SizeResult:
    items: int
    conditions: Conditions
    cold: CycleMeasurement
    warm: CycleMeasurement
    # Every period read back once, as after a billing period's close: its own job, timed apart from the cycles
    # (None: not run, `--no-read-back`).
    readback: CycleMeasurement | None
    naive_seconds: float | None = None
    naive_extrapolated: bool = False
    naive_agrees: bool | None = None  # None: the naive loop did not run at this size
    naive_limits: LimitsCheck | None = None  # None: not measured at this size

    @property
    def cold_floor_seconds(self) -> float:
        return self.cold.limits.floor.seconds

    @property
    def floor_ratio(self) -> float:
        return self.cold.floor_ratio

    @property
    def naive_ratio(self) -> float | None:
        return None if self.naive_seconds is None else self.naive_seconds / self.cold.wall_seconds

    @property
    def within_limits(self) -> bool:
        """Whether every run the product made here kept within every limiter, with no 429."""
        return all(c.limits.within_limits for c in self.product_runs)

    @property
    def product_runs(self) -> list[CycleMeasurement]:
        """Every run the product made at this size."""
        return [self.cold, self.warm, *([self.readback] if self.readback else [])]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cold_floor_seconds"] = self.cold_floor_seconds
        data["cold_floor_ratio"] = round(self.floor_ratio, 3)
        data["warm_floor_seconds"] = self.warm.limits.floor.seconds
        data["naive_speedup"] = None if self.naive_ratio is None else round(self.naive_ratio, 2)
        data["within_limits"] = self.within_limits
        return data


def apply_conditions(fake: FakeService, latency: float, per_second: float, window: float = 1.0) -> None:
    """The fake answers after `latency` seconds and refuses (429) requests above `per_second` × `window` in any
    `window` seconds."""
    fake.latency_seconds = latency
    fake.limit_rate(max(1, int(per_second * window)), window)


def apply_stripe_conditions(stripe: FakeStripe, conditions: Conditions) -> None:
    """Stripe's fake answers after the latency and enforces Stripe's limiter structure at the `conditions`' rates:
    the fake's own limiters (`limit_like_stripe`, live mode when meter events have a limit apart), each set to its
    rate here; a limiter these conditions do not name keeps Stripe's."""
    limits = conditions.stripe_limits
    stripe.latency_seconds = conditions.stripe_latency
    stripe.limit_like_stripe(live=limits.meter_events_per_second is not None)
    with stripe.lock:
        budgets = {}
        for name, (allowed, window) in stripe.budgets.items():
            if name == GLOBAL_LIMITER:
                allowed = max(1, int(limits.global_per_second * window))
            elif name.startswith("endpoint "):
                allowed = max(1, int(limits.endpoint_per_second * window))
            elif "meter events" in name and limits.meter_events_per_second is not None:
                allowed = max(1, int(limits.meter_events_per_second * window))
            budgets[name] = (allowed, window)
        stripe.budgets = budgets


def stripe_config(conditions: Conditions) -> dict[str, Any]:
    """The product's `stripe` settings for the conditions: the limiter structure at the fakes' rates (not 80% of
    them), and its requests in flight."""
    limits = conditions.stripe_limits
    settings: dict[str, Any] = {
        "limits": "sandbox" if limits.meter_events_per_second is None else "live",
        "max_requests_per_second": limits.global_per_second,
        "max_requests_per_second_per_endpoint": limits.endpoint_per_second,
    }
    if conditions.stripe_concurrency is not None:
        settings["max_concurrency"] = conditions.stripe_concurrency
    if limits.meter_events_per_second is not None:
        settings["max_meter_events_per_second"] = limits.meter_events_per_second
    return settings


def product_config(sandbox: Sandbox, database_url: str, conditions: Conditions) -> dict[str, Any]:
    raw = sandbox.config_dict(database_url, [{"stripe": EVENT_NAME, "openmeter": OPENMETER_METER}])
    raw["stripe"].update(stripe_config(conditions))
    raw["stripe"]["meter_events"] = conditions.meter_events
    raw["openmeter"]["max_requests_per_second"] = conditions.openmeter_per_second
    raw["openmeter"]["max_concurrency"] = conditions.openmeter_concurrency
    raw["balances"] = {"enabled": False}
    raw["logging"] = {"level": "INFO", "format": "json"}
    raw["stripe"]["summary_lag"] = "1s"  # the sandbox's summaries do not lag here: the read-back need not wait
    return raw


def readback_run(config_path: Path, database: Path, log_path: Path, upstreams: Upstreams) -> CycleMeasurement:
    """`reconciler read-back` with every period as if its billing period had just closed (final, invoice still
    open): one summary listing per period, which is what the read-back costs per billing period."""
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE usage_periods SET status = 'final'")
        newest = connection.execute("SELECT max(sent_at) FROM usage_reports").fetchone()[0]
    # No summary covers the minute in progress: wait until the newest report's minute has passed.
    sent = datetime.fromisoformat(newest).replace(tzinfo=UTC) if newest else datetime.now(UTC)
    readable_at = sent.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1)
    time.sleep(max(0.0, (readable_at - datetime.now(UTC)).total_seconds()))
    return product_cycle(config_path, log_path, upstreams, ONE_AT_A_TIME, "read-back")


def product_cycle(
    config_path: Path, log_path: Path, upstreams: Upstreams, shape: Shape, command_name: str = "sync-usage"
) -> CycleMeasurement:
    """One `reconciler <command_name>` in a child process, with its wall time, CPU time and peak RSS, and its
    requests against the limiters (its floor for a run shaped `shape`)."""
    upstreams.reset()
    fakes = upstreams.fakes
    command = [sys.executable, "-m", "reconciler", command_name, "--config", str(config_path), "--format", "json"]
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    started = time.perf_counter()
    with open(log_path, "ab") as log, open(log_path.with_suffix(".out"), "wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=log)  # our own CLI, no shell  # nosec B603
        peak_kib, status, usage = _wait_watching_peak(child.pid)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    try:
        summary = yaml.safe_load(log_path.with_suffix(".out").read_text()).get("summary", {})
    except (yaml.YAMLError, AttributeError):
        summary = {}
    return CycleMeasurement(
        wall_seconds=round(_cycle_seconds(log_path, log_offset, CYCLE_EVENTS[command_name]), 3),
        process_seconds=round(wall, 3),
        cpu_seconds=round(usage.ru_utime + usage.ru_stime, 3),
        peak_rss_mb=round(peak_kib / 1024, 1),
        exit_code=child.returncode,
        requests={name: len(fake.arrivals) for name, fake in fakes.items()},
        max_requests_in_one_second={name: fake.max_requests_in_any_window(1.0) for name, fake in fakes.items()},
        answered_429={name: fake.rate_limited for name, fake in fakes.items()},
        limits=upstreams.check(shape),
        summary=summary,
    )


def _wait_watching_peak(pid: int) -> tuple[int, int, Any]:
    """Wait for the child; return its peak RSS (KiB), exit status and resource usage. The peak is the child's own
    VmHWM, read while it runs: `ru_maxrss` would not do, as Linux carries the high-water mark of the image it was
    forked from (this process, holding the fakes) across exec."""
    peak = 0
    while True:
        peak = max(peak, peak_rss_kib(pid))
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return peak, status, usage
        time.sleep(0.1)


def peak_rss_kib(pid: int) -> int:
    """A running process's own peak RSS so far (its VmHWM, KiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _cycle_seconds(log_path: Path, offset: int, events: tuple[str, str]) -> float:
    """The time between the cycle's start and finish log lines (`events`)."""
    started, finished = events
    stamps = {}
    with open(log_path, "rb") as log:
        log.seek(offset)
        for line in log:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in events:
                stamps[event["event"]] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    if len(stamps) != 2:
        return float("nan")
    return (stamps[finished] - stamps[started]).total_seconds()


def _naive(sandbox: Sandbox, items: int, now: datetime, conditions: Conditions) -> tuple[float, bool, LimitsCheck]:
    """The naive loop on its own Stripe, seeded as the product's was (and the product's OpenMeter); its seconds,
    whether it billed the same, and its requests against the limiters."""
    stripe = FakeStripe(api_key=SANDBOX_STRIPE_KEY)
    apply_stripe_conditions(stripe, conditions)
    seed_stripe(stripe, items, now)
    upstreams = Upstreams({"stripe": stripe, "openmeter": sandbox.openmeter}, conditions)
    upstreams.reset()
    with LoopbackServer(stripe) as server:
        started = time.perf_counter()
        naive_cycle(
            stripe_base=server.url,
            stripe_key=SANDBOX_STRIPE_KEY,
            openmeter_url=sandbox.openmeter_server.url,
            openmeter_token=sandbox.openmeter.token,
            now=now,
        )
        seconds = time.perf_counter() - started
    return seconds, billed_totals(stripe) == billed_totals(sandbox.stripe), upstreams.check(ONE_AT_A_TIME)


def fresh_product(workdir: Path, name: str, config: Callable[[Path], dict[str, Any]]) -> tuple[Path, Path]:
    """A new, migrated database, its config file (`config` of the database's path) and an empty log, for one
    benchmark run called `name`; returns the config's and the log's paths."""
    database = workdir / f"{name}.db"
    database.unlink(missing_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config(database)))
    subprocess.run(  # our own CLI, no shell  # nosec B603
        [sys.executable, "-m", "reconciler", "db", "upgrade", "--config", str(config_path)],
        check=True,
        capture_output=True,
    )
    log_path = workdir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    return config_path, log_path


def seeded_sandbox(items: int, conditions: Conditions, now: datetime) -> Sandbox:
    """A sandbox under `conditions`, with `items` customers of one metered item each and their usage."""
    sandbox = Sandbox.start()
    apply_stripe_conditions(sandbox.stripe, conditions)
    apply_conditions(sandbox.openmeter, conditions.openmeter_latency, conditions.openmeter_per_second)
    seed_stripe(sandbox.stripe, items, now)
    seed_openmeter(sandbox.openmeter, items, now, every_hour=conditions.usage_every_hour)
    return sandbox


def run_size(
    items: int,
    conditions: Conditions,
    workdir: Path,
    *,
    naive: bool,
    naive_seconds_per_item: float | None,
    read_back: bool = True,
) -> SizeResult:
    """Benchmark `items` metered items; `naive` runs the baseline at this size, else its time is extrapolated
    from `naive_seconds_per_item` (when known); `read_back` runs the read-back after."""
    now = datetime.now(UTC)
    sandbox = seeded_sandbox(items, conditions, now)
    try:
        name = f"bench-{items}-{conditions.meter_events}"
        config_path, log_path = fresh_product(
            workdir, name, lambda db: product_config(sandbox, f"sqlite:///{db}", conditions)
        )
        upstreams = Upstreams({"stripe": sandbox.stripe, "openmeter": sandbox.openmeter}, conditions)
        cold = product_cycle(config_path, log_path, upstreams, conditions.usage_cycle_shape())
        warm = product_cycle(config_path, log_path, upstreams, conditions.usage_cycle_shape())
        naive_seconds, naive_agrees, naive_limits, extrapolated = None, None, None, False
        if naive:
            seconds, naive_agrees, naive_limits = _naive(sandbox, items, now, conditions)
            naive_seconds = round(seconds, 3)
        elif naive_seconds_per_item is not None:
            naive_seconds, extrapolated = round(naive_seconds_per_item * items, 3), True
        # After the naive loop, which the wait for the reports' minute to pass then mostly overlaps.
        readback = readback_run(config_path, workdir / f"{name}.db", log_path, upstreams) if read_back else None
        return SizeResult(
            items=items,
            conditions=conditions,
            cold=cold,
            warm=warm,
            readback=readback,
            naive_seconds=naive_seconds,
            naive_extrapolated=extrapolated,
            naive_agrees=naive_agrees,
            naive_limits=naive_limits,
        )
    finally:
        sandbox.stop()
