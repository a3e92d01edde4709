"""One usage cycle shared by several `reconciler run` replicas on one PostgreSQL schema, as production scales out:
each replica a child process of its own (its CPU time and peak RSS its own), the cycle timed from the first
replica's "usage sync started" to the last one's "usage sync finished", and every customer's billed total checked
against what OpenMeter holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess  # runs this same Python on the product's own CLI  # nosec B404
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from sqlalchemy import create_engine, make_url, text

from reconciler_sandbox.bench.dataset import OPENMETER_METER, billed_totals
from reconciler_sandbox.bench.measure import (
    CYCLE_EVENTS,
    Conditions,
    LimitsCheck,
    Upstreams,
    fresh_product,
    peak_rss_kib,
    product_config,
    seeded_sandbox,
)
from reconciler_sandbox.openmeter_fake import FakeOpenMeter

# A replica's cycle, at most: far above a million items' (a replica that hangs fails the run, not the benchmark).
CYCLE_TIMEOUT_SECONDS = 4 * 3600
REPLICA_CONCURRENCY = 16  # Stripe requests in flight per replica, unless the conditions say


@dataclass
class ReplicaMeasurement:
    cpu_seconds: float
    peak_rss_mb: float
    exit_code: int
    started: str | None  # its "usage sync started" and "... finished" log lines' timestamps
    finished: str | None


@dataclass
class ReplicaRunResult:
    items: int
    conditions: Conditions
    replicas: list[ReplicaMeasurement]
    wall_seconds: float  # the first replica's cycle start to the last one's finish
    wrong_totals: int  # customers whose billed total is not what OpenMeter holds
    # The ledger after the cycle: intents Stripe accepted that it does not record as sent (the next cycle would
    # send them again), and planned items no replica completed.
    pending_intents: int
    unfinished_items: int
    limits: LimitsCheck

    @property
    def ok(self) -> bool:
        finished = all(r.finished is not None and r.exit_code == 0 for r in self.replicas)
        settled = self.pending_intents == self.unfinished_items == 0
        return finished and settled and self.wrong_totals == 0 and self.limits.within_limits

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def run_replicas(
    items: int, conditions: Conditions, workdir: Path, postgres_url: str, *, replicas: int = 2
) -> ReplicaRunResult:
    """Seed `items` metered items, then one cold cycle shared by `replicas` replicas on a fresh schema of
    `postgres_url` (dropped afterwards)."""
    if conditions.stripe_concurrency is None:
        # Every replica's connection pool must fit PostgreSQL's max_connections (100 by default): under lifted
        # budgets the product's own default (budget × latency, capped at 64 workers per replica) would not.
        conditions = replace(conditions, stripe_concurrency=REPLICA_CONCURRENCY)
    now = datetime.now(UTC)
    sandbox = seeded_sandbox(items, conditions, now)
    schema = f"bench_{items}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
        name = f"replicas-{items}-{conditions.meter_events}"

        def config(_: Path) -> dict[str, Any]:
            raw = product_config(sandbox, url.render_as_string(hide_password=False), conditions)
            raw["server"] = {"enabled": False}
            # One scheduled cycle per day: the first runs at start, on every replica, under the same tick key.
            raw["schedule"] = {"usage_sync": "24h", "readback": "off"}
            return raw

        config_path, _ = fresh_product(workdir, name, config)
        upstreams = Upstreams({"stripe": sandbox.stripe, "openmeter": sandbox.openmeter}, conditions)
        upstreams.reset()
        logs = [workdir / f"{name}-{replica}.log" for replica in range(replicas)]
        measured = _run_until_cycle_done(config_path, logs)
        starts = [datetime.fromisoformat(m.started) for m in measured if m.started]
        ends = [datetime.fromisoformat(m.finished) for m in measured if m.finished]
        wall = (max(ends) - min(starts)).total_seconds() if starts and len(ends) == replicas else float("nan")
        billed = billed_totals(sandbox.stripe)
        expected = measured_totals(sandbox.openmeter)
        wrong = sum(1 for customer in expected.keys() | billed.keys() if billed.get(customer) != expected.get(customer))
        ledger = create_engine(url)
        with ledger.connect() as connection:
            pending = connection.execute(text("SELECT count(*) FROM usage_reports WHERE state = 'pending'")).scalar()
            unfinished = connection.execute(text("SELECT count(*) FROM work_items WHERE state != 'done'")).scalar()
        ledger.dispose()
        return ReplicaRunResult(
            items=items,
            conditions=conditions,
            replicas=measured,
            wall_seconds=round(wall, 3),
            wrong_totals=wrong,
            pending_intents=int(pending or 0),
            unfinished_items=int(unfinished or 0),
            limits=upstreams.check(conditions.usage_cycle_shape()),
        )
    finally:
        sandbox.stop()
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def measured_totals(openmeter: FakeOpenMeter) -> dict[str, Decimal]:
    """What OpenMeter holds for each customer: the benchmark seeds every event inside its customer's current
    period and before the current hour, so this is what each customer's period must be billed."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    with openmeter.lock:
        for event in openmeter.events[OPENMETER_METER]:
            if isinstance(event.value, Decimal):
                totals[event.subject] += event.value
    return dict(totals)


def _run_until_cycle_done(config_path: Path, logs: list[Path]) -> list[ReplicaMeasurement]:
    """Start a `reconciler run` per log, wait until each has logged its first cycle's end, stop them all (SIGTERM,
    as an orchestrator would), and measure each one."""
    command = [sys.executable, "-m", "reconciler", "run", "--config", str(config_path)]
    files: list[IO[bytes]] = []
    children: list[subprocess.Popen[bytes]] = []
    cycle_logs = [CycleLog(log) for log in logs]
    peaks = [0] * len(logs)
    usages: list[Any] = [None] * len(logs)
    try:
        for log in logs:
            files.append(open(log, "wb"))  # noqa: SIM115 (closed below, after the child exits)
            children.append(subprocess.Popen(command, stdout=files[-1], stderr=subprocess.STDOUT))  # nosec B603
        deadline = time.monotonic() + CYCLE_TIMEOUT_SECONDS
        stopping = False
        while any(usage is None for usage in usages):
            for position, child in enumerate(children):
                if usages[position] is None:
                    peaks[position] = max(peaks[position], peak_rss_kib(child.pid))
                    reaped, status, usage = os.wait4(child.pid, os.WNOHANG)
                    if reaped:
                        child.returncode = os.waitstatus_to_exitcode(status)
                        usages[position] = usage
            for cycle_log in cycle_logs:
                cycle_log.read()
            if not stopping and (all(c.finished for c in cycle_logs) or time.monotonic() > deadline):
                for child in children:
                    child.send_signal(signal.SIGTERM)
                stopping = True
            time.sleep(0.5)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                child.wait()
        for file in files:
            file.close()
    return [
        ReplicaMeasurement(
            cpu_seconds=round(usage.ru_utime + usage.ru_stime, 3),
            peak_rss_mb=round(peak / 1024, 1),
            exit_code=child.returncode or 0,
            started=cycle_log.started,
            finished=cycle_log.finished,
        )
        for child, peak, usage, cycle_log in zip(children, peaks, usages, cycle_logs, strict=True)
    ]


class CycleLog:
    """A replica's JSON log, read as it grows: its first usage cycle's "started" and "finished" timestamps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.started: str | None = None
        self.finished: str | None = None

    def read(self) -> None:
        with open(self.path, "rb") as lines:
            lines.seek(self._offset)
            for line in lines:
                if not line.endswith(b"\n"):
                    break  # a line still being written: read it whole next time
                self._offset += len(line)
                if b"usage sync" in line and self.finished is None:
                    self._note(line)

    def _note(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        stamp = str(event.get("timestamp", "")).replace("Z", "+00:00")
        started, finished = CYCLE_EVENTS["sync-usage"]  # a replica's cycle logs as `reconciler sync-usage`'s does
        if event.get("event") == started and self.started is None:
            self.started = stamp
        elif event.get("event") == finished:
            self.finished = stamp
