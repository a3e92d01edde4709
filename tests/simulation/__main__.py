"""`python -m tests.simulation --seeds N`: run many seeds in parallel processes, print the fault classes they hit
and, for every failing seed, its problems, its fault schedule and the command that replays it."""

from __future__ import annotations

import argparse
import os
import subprocess  # asks git which commit is being tested  # nosec B404
import sys
import time
from collections import Counter
from pathlib import Path

from tests.simulation.runner import SeedResult, run_seeds
from tests.simulation.scenario import FAULT_CLASSES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation", description=__doc__)
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run (default 200)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="replay this one seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--verbose", action="store_true", help="print every seed's scenario and fault schedule")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run every seed on this PostgreSQL database (each worker in a schema of its own) instead of SQLite",
    )
    parser.add_argument(
        "--record",
        type=Path,
        help="append each finished seed, its outcome and the commit it ran on to this file, and skip seeds it records "
        "as passed: a long run stopped part way resumes where it left off",
    )
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(range(args.first, args.first + args.seeds))
    if args.record is not None:
        passed = _recorded_passes(args.record)
        print(f"{len(passed & set(seeds))} of these seeds already passed in {args.record}; running the rest")
        seeds = [seed for seed in seeds if seed not in passed]

    commit = _commit()
    started = time.monotonic()
    hits: Counter[str] = Counter()
    failed: list[SeedResult] = []
    for done, result in enumerate(run_seeds(seeds, args.jobs, args.postgres), start=1):
        hits.update({kind for kind, count in result.hits.items() if count})
        if args.record is not None:
            with args.record.open("a") as record:
                record.write(f"{result.seed}\t{'passed' if result.ok else 'failed'}\t{commit}\n")
        if args.verbose:
            print(result.description)
        if not result.ok:
            failed.append(result)
            print(result.report(), flush=True)
        if done % 100 == 0:
            print(f"{done}/{len(seeds)} seeds, {len(failed)} failed, {time.monotonic() - started:.0f} s", flush=True)

    elapsed = time.monotonic() - started
    print(f"\n{len(seeds)} seeds in {elapsed:.1f} s: {len(seeds) - len(failed)} passed, {len(failed)} failed")
    print("fault classes hit (number of seeds):")
    for kind in FAULT_CLASSES:
        print(f"  {kind:<32} {hits[kind]}")
    missing = [kind for kind in FAULT_CLASSES if not hits[kind]]
    if missing and args.seed is None:
        print(f"never hit: {', '.join(missing)}")
    if failed:
        print("failing seeds: " + " ".join(str(r.seed) for r in sorted(failed, key=lambda r: r.seed)))
    return 1 if failed else 0


def _recorded_passes(path: Path) -> set[int]:
    if not path.exists():
        return set()
    lines = (line.split("\t") for line in path.read_text().splitlines())
    return {int(fields[0]) for fields in lines if len(fields) >= 2 and fields[1] == "passed"}


def _commit() -> str:
    try:
        return subprocess.run(  # a fixed git command  # nosec B603 B607
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
