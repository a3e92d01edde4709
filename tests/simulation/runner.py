"""Run seeds: each on a fresh database (SQLite, or PostgreSQL with `postgres_url`) against the process's fakes,
invariants checked, faults counted."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from reconciler.ledger.database import make_engine, upgrade
from reconciler_sandbox.server import Sandbox
from tests.simulation.invariants import check
from tests.simulation.scenario import generate
from tests.simulation.world import World, reset_fakes


@dataclass
class SeedResult:
    seed: int
    problems: list[str]
    hits: Counter[str] = field(default_factory=Counter)
    description: str = ""
    database_option: str = ""  # how `python -m tests.simulation` was told which database, for the replay

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"seed {self.seed} FAILED:", *(f"  - {p}" for p in self.problems[:20])]
        if len(self.problems) > 20:
            lines.append(f"  … and {len(self.problems) - 20} more")
        replay = f".venv/bin/python -m tests.simulation --seed {self.seed}{self.database_option} --verbose"
        lines += ["scenario and fault schedule:", self.description, f"replay: {replay}"]
        return "\n".join(lines)


class SqliteLedgers:
    """Each seed on its own copy of a migrated SQLite file in `directory`."""

    option = ""

    def __init__(self, directory: Path) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="worker-", dir=directory))
        self._template = self._directory / "template.db"
        engine = make_engine(f"sqlite:///{self._template}")
        upgrade(engine)
        engine.dispose()

    @contextmanager
    def fresh(self, seed: int) -> Iterator[str]:
        database = self._directory / f"seed-{seed}.db"
        shutil.copyfile(self._template, database)
        try:
            yield f"sqlite:///{database}"
        finally:
            database.unlink(missing_ok=True)


class PostgresLedgers:
    """Each seed in this worker's own migrated schema (`<prefix>_<pid>`), emptied before the seed."""

    def __init__(self, admin_url: str, prefix: str) -> None:
        self.option = f" --postgres '{make_url(admin_url)}'"  # the password hidden
        schema = f"{prefix}_{os.getpid()}"
        admin = create_engine(admin_url)
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
        self._url = url.render_as_string(hide_password=False)
        self._engine = make_engine(self._url)
        upgrade(self._engine)
        ledger_tables = [name for name in inspect(self._engine).get_table_names() if name != "alembic_version"]
        self._empty = text(f"TRUNCATE {', '.join(ledger_tables)} RESTART IDENTITY")

    @contextmanager
    def fresh(self, seed: int) -> Iterator[str]:
        with self._engine.begin() as connection:
            connection.execute(self._empty)
        yield self._url


def drop_worker_schemas(admin_url: str, prefix: str) -> None:
    engine = create_engine(admin_url)
    with engine.begin() as connection:
        schemas = connection.scalars(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :pattern"), {"pattern": f"{prefix}\\_%"}
        ).all()
        for schema in schemas:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


class SeedRunner:
    """Owns the fakes and its ledgers; runs any number of seeds, one by one."""

    def __init__(self, ledgers: SqliteLedgers | PostgresLedgers) -> None:
        self.fakes = Sandbox.start()
        self._ledgers = ledgers

    def run(self, seed: int) -> SeedResult:
        scenario = generate(seed)
        reset_fakes(self.fakes)
        with self._ledgers.fresh(seed) as database_url:
            world = World(scenario, self.fakes, database_url)
            try:
                problems = world.run(then=check)
            except Exception:
                problems = [f"the run itself crashed:\n{traceback.format_exc()}"]
        return SeedResult(seed, problems, world.hits, scenario.describe(), self._ledgers.option)


_worker_runner: SeedRunner | None = None


def _start_worker(directory: Path, postgres_url: str | None, schema_prefix: str) -> None:
    global _worker_runner
    ledgers = SqliteLedgers(directory) if postgres_url is None else PostgresLedgers(postgres_url, schema_prefix)
    _worker_runner = SeedRunner(ledgers)


def _run_in_worker(seed: int) -> SeedResult:
    assert _worker_runner is not None, "the pool's initializer starts the runner"
    return _worker_runner.run(seed)


def run_seeds(seeds: list[int], jobs: int, postgres_url: str | None = None) -> Iterator[SeedResult]:
    """Every seed's result, in completion order, from `jobs` worker processes (each with its own fakes and ledger:
    SQLite files, or with `postgres_url` a schema of its own in that database)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited sockets or clocks
    schema_prefix = f"simulation_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="reconciler-simulation-") as directory:
        pool = context.Pool(
            max(1, min(jobs, len(seeds))),
            initializer=_start_worker,
            initargs=(Path(directory), postgres_url, schema_prefix),
        )
        try:
            yield from pool.imap_unordered(_run_in_worker, seeds, chunksize=2)
        finally:
            pool.terminate()
            pool.join()
            if postgres_url is not None:
                drop_worker_schemas(postgres_url, schema_prefix)
