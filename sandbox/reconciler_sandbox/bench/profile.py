"""Profile the product's usage cycle: seed the sandbox with N metered items (no latency, lifted budgets, as the
benchmark's CPU runs), run a cold and a warm `reconciler sync-usage` under cProfile in a child process, and write
each profile's summary (the functions taking the most CPU, by own time and with callees) beside the raw profiles.

    python -m reconciler_sandbox.bench.profile --items 100000 --out docs/bench

The product runs with one worker (`stripe.max_concurrency: 1`): cProfile sees only the thread it started in, and
with one worker every item is measured, decided, recorded and sent in that thread, by the same code the workers
run. cProfile's own overhead roughly doubles the time of a call-heavy path: read the summaries for where the time
goes, and `reconciler bench` for how long a cycle takes."""

from __future__ import annotations

import argparse
import io
import pstats
import subprocess  # runs this same Python on the product's own CLI  # nosec B404
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler_sandbox.bench.measure import Conditions, fresh_product, product_config, seeded_sandbox

TOP = 35  # functions per table
# `reconciler <args>` under cProfile timed by the process's CPU clock: the time the product spends waiting (for
# the fakes' answers, for the disk's fsync) is not its CPU, and the fakes share the machine's cores.
CPU_PROFILED = """
import cProfile, runpy, sys, time
sys.argv = ["reconciler", *sys.argv[1:]]
profile = cProfile.Profile(time.process_time)
try:
    profile.runcall(runpy.run_module, "reconciler", run_name="__main__")
except SystemExit as exit:
    if exit.code:
        raise
finally:
    profile.dump_stats({out!r})
"""


def profile_cycles(items: int, out: Path) -> list[Path]:
    """Profile a cold and a warm cycle over `items` items; returns the summaries written."""
    out.mkdir(parents=True, exist_ok=True)
    conditions = Conditions().lifted()
    sandbox = seeded_sandbox(items, conditions, datetime.now(UTC))
    try:
        workdir = out / f"profile-{items}"
        workdir.mkdir(exist_ok=True)

        def config(database: Path) -> dict[str, Any]:
            raw = product_config(sandbox, f"sqlite:///{database}", conditions)
            raw["stripe"]["max_concurrency"] = 1
            raw["openmeter"]["max_concurrency"] = 1
            return raw

        config_path, log_path = fresh_product(workdir, "product", config)
        summaries = []
        for run in ("cold", "warm"):
            raw = workdir / f"{run}.prof"
            command = [sys.executable, "-c", CPU_PROFILED.format(out=str(raw)), "sync-usage"]
            started = time.perf_counter()
            with open(log_path, "ab") as log:
                subprocess.run(  # our own CLI, no shell  # nosec B603
                    [*command, "--config", str(config_path), "--format", "json"],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    check=True,
                )
            seconds = time.perf_counter() - started
            summary = out / f"profile-{items}-{run}.txt"
            title = f"{run} cycle, {items:,} items, {seconds:.1f} s wall under cProfile; times below are CPU seconds"
            summary.write_text(_summary(raw, title))
            summaries.append(summary)
        return summaries
    finally:
        sandbox.stop()


def _summary(raw: Path, title: str) -> str:
    text = io.StringIO()
    text.write(f"# {title}\n")
    stats = pstats.Stats(str(raw), stream=text)
    stats.strip_dirs()
    for order in ("tottime", "cumulative"):
        text.write(f"\n## top {TOP} by {order}\n")
        stats.sort_stats(order).print_stats(TOP)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    for summary in profile_cycles(args.items, args.out):
        print(summary)


if __name__ == "__main__":
    main()
