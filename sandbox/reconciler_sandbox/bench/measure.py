"""Run one benchmark size: seed the sandbox, time the product's cold and warm cycles in a child process (so its peak
RSS is its own), time the naive loop on an identically seeded Stripe, and check both billed the same."""

from __future__ import annotations

import json
import math
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

from reconciler_sandbox.bench.dataset import EVENT_NAME, OPENMETER_METER, billed_totals, seed_openmeter, seed_stripe
from reconciler_sandbox.bench.naive import naive_cycle
from reconciler_sandbox.httpserver import FakeService, LoopbackServer
from reconciler_sandbox.server import SANDBOX_STRIPE_KEY, Sandbox
from reconciler_sandbox.stripe_fake import FakeStripe

SUBJECTS_PER_QUERY = 100  # OpenMeter: subjects in one query
PAGE_SIZE = 100  # Stripe: objects in one list page


@dataclass(frozen=True)
class Conditions:
    """What the upstream APIs look like in a run: answer latency and the request budgets, enforced by the fakes
    and configured in the product alike."""

    stripe_latency: float = 0.040
    openmeter_latency: float = 0.060
    stripe_per_second: float = 100
    openmeter_per_second: float = 50
    moesif_latency: float = 0.080
    moesif_per_minute: float = 500  # Moesif's Management API budget, and the most the product may be configured to

    def lifted(self) -> Conditions:
        """No latency and budgets far above the loopback's speed: measures memory and CPU, not waiting."""
        return replace(
            self, stripe_latency=0.0, openmeter_latency=0.0, stripe_per_second=5000, openmeter_per_second=1000
        )


# Each benchmarked command, and the log lines its cycle starts and finishes with.
CYCLE_EVENTS = {
    "sync-usage": ("usage sync started", "usage sync finished"),
    "read-back": ("read-back started", "read-back finished"),
    "reconcile-balances": ("balance reconcile started", "balance reconcile finished"),
}


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
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SizeResult:
    items: int
    conditions: Conditions
    cold: CycleMeasurement
    warm: CycleMeasurement
    # Every period read back once, as after a billing period's close: its own job, timed apart from the cycles.
    readback: CycleMeasurement
    cold_floor_seconds: float
    warm_floor_seconds: float
    naive_seconds: float | None = None
    naive_extrapolated: bool = False
    naive_agrees: bool | None = None  # None: the naive loop did not run at this size

    @property
    def floor_ratio(self) -> float:
        return self.cold.wall_seconds / self.cold_floor_seconds

    @property
    def naive_ratio(self) -> float | None:
        return None if self.naive_seconds is None else self.naive_seconds / self.cold.wall_seconds

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cold_floor_ratio"] = round(self.floor_ratio, 3)
        data["naive_speedup"] = None if self.naive_ratio is None else round(self.naive_ratio, 2)
        return data


def cold_floor_seconds(items: int, conditions: Conditions) -> float:
    """The least time the budgets allow for a cycle where every total is new: Stripe takes one write per item plus
    the subscription pages and one meter listing; OpenMeter one query per 100 subjects. The APIs work in parallel,
    so the slower of the two sets the floor."""
    stripe = items + math.ceil(items / PAGE_SIZE) + 1
    openmeter = math.ceil(items / SUBJECTS_PER_QUERY)
    return max(stripe / conditions.stripe_per_second, openmeter / conditions.openmeter_per_second)


def warm_floor_seconds(items: int, conditions: Conditions) -> float:
    """Nothing changed: only the reads are left."""
    stripe = math.ceil(items / PAGE_SIZE) + 1
    openmeter = math.ceil(items / SUBJECTS_PER_QUERY)
    return max(stripe / conditions.stripe_per_second, openmeter / conditions.openmeter_per_second)


def apply_conditions(fake: FakeService, latency: float, per_second: float, window: float = 1.0) -> None:
    """The fake answers after `latency` seconds and refuses (429) requests above `per_second` × `window` in any
    `window` seconds."""
    fake.latency_seconds = latency
    fake.limit_rate(max(1, int(per_second * window)), window)


def _config(sandbox: Sandbox, database: Path, conditions: Conditions) -> dict[str, Any]:
    raw = sandbox.config_dict(f"sqlite:///{database}", [{"stripe": EVENT_NAME, "openmeter": OPENMETER_METER}])
    # One budget for every Stripe call, as the fake enforces here: Stripe's own structure (per endpoint, live meter
    # events apart: upstream/stripe_budget.py) is not benchmarked yet.
    raw["stripe"].update(
        limits="sandbox",
        max_requests_per_second=conditions.stripe_per_second,
        max_requests_per_second_per_endpoint=conditions.stripe_per_second,
    )
    raw["openmeter"]["max_requests_per_second"] = conditions.openmeter_per_second
    raw["balances"] = {"enabled": False}
    raw["logging"] = {"level": "INFO", "format": "json"}
    raw["stripe"]["summary_lag"] = "1s"  # the sandbox's summaries do not lag here: the read-back need not wait
    return raw


def readback_run(config_path: Path, database: Path, log_path: Path, fakes: dict[str, FakeService]) -> CycleMeasurement:
    """`reconciler read-back` with every period as if its billing period had just closed (final, invoice still
    open): one summary listing per period, which is what the read-back costs per billing period."""
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE usage_periods SET status = 'final'")
        newest = connection.execute("SELECT max(sent_at) FROM usage_reports").fetchone()[0]
    # No summary covers the minute in progress: wait until the newest report's minute has passed.
    sent = datetime.fromisoformat(newest).replace(tzinfo=UTC) if newest else datetime.now(UTC)
    readable_at = sent.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1)
    time.sleep(max(0.0, (readable_at - datetime.now(UTC)).total_seconds()))
    return product_cycle(config_path, log_path, fakes, "read-back")


def product_cycle(
    config_path: Path, log_path: Path, fakes: dict[str, FakeService], command_name: str = "sync-usage"
) -> CycleMeasurement:
    """One `reconciler <command_name>` in a child process, with its wall time, CPU time and peak RSS."""
    for fake in fakes.values():
        fake.reset_counters()
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
        summary=summary,
    )


def _wait_watching_peak(pid: int) -> tuple[int, int, Any]:
    """Wait for the child; return its peak RSS (KiB), exit status and resource usage. The peak is the child's own
    VmHWM, read while it runs: `ru_maxrss` would not do, as Linux carries the high-water mark of the image it was
    forked from (this process, holding the fakes) across exec."""
    peak = 0
    while True:
        try:
            with open(f"/proc/{pid}/status") as status_file:
                for line in status_file:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return peak, status, usage
        time.sleep(0.1)


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


def _naive(sandbox: Sandbox, items: int, now: datetime, conditions: Conditions) -> tuple[float, bool]:
    """The naive loop on its own Stripe, seeded as the product's was; (seconds, whether it billed the same)."""
    stripe = FakeStripe(api_key=SANDBOX_STRIPE_KEY)
    apply_conditions(stripe, conditions.stripe_latency, conditions.stripe_per_second)
    seed_stripe(stripe, items, now)
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
    return seconds, billed_totals(stripe) == billed_totals(sandbox.stripe)


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


def run_size(
    items: int, conditions: Conditions, workdir: Path, *, naive: bool, naive_seconds_per_item: float | None
) -> SizeResult:
    """Benchmark `items` metered items; `naive` runs the baseline at this size, else its time is extrapolated
    from `naive_seconds_per_item` (when known)."""
    now = datetime.now(UTC)
    sandbox = Sandbox.start()
    try:
        apply_conditions(sandbox.stripe, conditions.stripe_latency, conditions.stripe_per_second)
        apply_conditions(sandbox.openmeter, conditions.openmeter_latency, conditions.openmeter_per_second)
        seed_stripe(sandbox.stripe, items, now)
        seed_openmeter(sandbox.openmeter, items, now)

        config_path, log_path = fresh_product(workdir, f"bench-{items}", lambda db: _config(sandbox, db, conditions))
        fakes: dict[str, FakeService] = {"stripe": sandbox.stripe, "openmeter": sandbox.openmeter}
        cold = product_cycle(config_path, log_path, fakes)
        warm = product_cycle(config_path, log_path, fakes)
        naive_seconds, naive_agrees, extrapolated = None, None, False
        if naive:
            seconds, naive_agrees = _naive(sandbox, items, now, conditions)
            naive_seconds = round(seconds, 3)
        elif naive_seconds_per_item is not None:
            naive_seconds, extrapolated = round(naive_seconds_per_item * items, 3), True
        # After the naive loop, which the wait for the reports' minute to pass then mostly overlaps.
        readback = readback_run(config_path, workdir / f"bench-{items}.db", log_path, fakes)
        return SizeResult(
            items=items,
            conditions=conditions,
            cold=cold,
            warm=warm,
            readback=readback,
            cold_floor_seconds=round(cold_floor_seconds(items, conditions), 3),
            warm_floor_seconds=round(warm_floor_seconds(items, conditions), 3),
            naive_seconds=naive_seconds,
            naive_extrapolated=extrapolated,
            naive_agrees=naive_agrees,
        )
    finally:
        sandbox.stop()
