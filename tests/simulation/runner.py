"""Run seeds: each on a fresh database against the process's fakes, invariants checked, faults counted."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.ledger.database import make_engine, upgrade
from reconciler.sandbox.server import Sandbox
from tests.simulation.invariants import check
from tests.simulation.scenario import generate
from tests.simulation.world import World, reset_fakes


@dataclass
class SeedResult:
    seed: int
    problems: list[str]
    hits: Counter[str] = field(default_factory=Counter)
    description: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"seed {self.seed} FAILED:", *(f"  - {p}" for p in self.problems[:20])]
        if len(self.problems) > 20:
            lines.append(f"  … and {len(self.problems) - 20} more")
        lines += ["scenario and fault schedule:", self.description, f"replay: {replay_command(self.seed)}"]
        return "\n".join(lines)


def replay_command(seed: int) -> str:
    return f".venv/bin/python -m tests.simulation --seed {seed} --verbose"


class SeedRunner:
    """Owns the fakes and a migrated template database in `directory`; runs any number of seeds, one by one."""

    def __init__(self, directory: Path) -> None:
        self.fakes = Sandbox.start()
        self._directory = Path(tempfile.mkdtemp(prefix="worker-", dir=directory))
        self._template = self._directory / "template.db"
        engine = make_engine(f"sqlite:///{self._template}")
        upgrade(engine)
        engine.dispose()

    def run(self, seed: int) -> SeedResult:
        scenario = generate(seed)
        database = self._directory / f"seed-{seed}.db"
        shutil.copyfile(self._template, database)
        reset_fakes(self.fakes)
        world = World(scenario, self.fakes, f"sqlite:///{database}")
        try:
            problems = world.run(then=check)
        except Exception:
            problems = [f"the run itself crashed:\n{traceback.format_exc()}"]
        finally:
            database.unlink(missing_ok=True)
        return SeedResult(seed, problems, world.hits, scenario.describe())


_worker_runner: SeedRunner | None = None


def _start_worker(directory: Path) -> None:
    global _worker_runner
    _worker_runner = SeedRunner(directory)


def _run_in_worker(seed: int) -> SeedResult:
    assert _worker_runner is not None, "the pool's initializer starts the runner"
    return _worker_runner.run(seed)


def run_seeds(seeds: list[int], jobs: int) -> Iterator[SeedResult]:
    """Every seed's result, in completion order, from `jobs` worker processes (each with its own fakes)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited sockets or clocks
    with tempfile.TemporaryDirectory(prefix="reconciler-simulation-") as directory:
        pool = context.Pool(max(1, min(jobs, len(seeds))), initializer=_start_worker, initargs=(Path(directory),))
        try:
            yield from pool.imap_unordered(_run_in_worker, seeds, chunksize=2)
        finally:
            pool.terminate()
            pool.join()
