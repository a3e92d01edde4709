"""Engines and migrations. SQLite is the embedded default; PostgreSQL (psycopg 3) is for production."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import reconciler.migrations
from reconciler.errors import SetupError, one_line

MIGRATIONS_DIR = Path(reconciler.migrations.__file__).parent


# Fail fast on a PostgreSQL host that drops packets (a refused port fails at once anyway); a URL's own
# connect_timeout wins.
CONNECT_TIMEOUT_SECONDS = 10


class DatabaseNotMigratedError(SetupError):
    """The database schema is missing or older than this version of reconciler."""


class DatabaseUnreachableError(SetupError):
    """The database cannot be connected to (server down, wrong port or credentials, SQLite directory missing)."""


def check_reachable(engine: Engine) -> None:
    """Connect once, so that a database that cannot be reached is named (password hidden) in one line."""
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        url = engine.url.render_as_string(hide_password=True)
        raise DatabaseUnreachableError(f"cannot reach the database {url}: {one_line(exc.orig)}") from exc


def connections_allowed(engine: Engine) -> int:
    """PostgreSQL's max_connections less those reserved for superusers: what all replicas' pools must fit in."""
    with engine.connect() as connection:
        allowed = int(connection.execute(text("SHOW max_connections")).scalar_one())
        return allowed - int(connection.execute(text("SHOW superuser_reserved_connections")).scalar_one())


# SQLAlchemy's QueuePool keeps 5 connections (and 10 more at a time of need); a pool smaller than the threads that
# use it makes workers wait for a connection (and fail after its 30 s timeout) instead of for Stripe.
DEFAULT_POOL_SIZE = 5


def make_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE) -> Engine:
    """An engine whose pool keeps `pool_size` connections, and as many again at a time of need."""
    parsed = make_url(url)
    pool = {"pool_size": pool_size, "max_overflow": pool_size}
    if parsed.get_backend_name() == "sqlite":
        # A file's pool (QueuePool) takes the sizes; `sqlite://` in memory has a pool of its own without them.
        sized = pool if parsed.database not in (None, "", ":memory:") else {}
        engine = create_engine(url, connect_args={"timeout": 30}, **sized)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # Write-ahead logging: a commit appends to one file and syncs it, where the default rollback journal
            # creates, syncs and deletes a journal per transaction (a third of a cold cycle's wall time went to
            # that); readers (status, probes) no longer wait for a writer. synchronous=FULL syncs the log at every
            # commit, so an intent stays durable across a power cut before its send. The mode is kept in the file.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply all migrations; returns (revision before, revision after)."""
    config = _alembic_config()
    with engine.begin() as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        after = MigrationContext.configure(connection).get_current_revision()
    return before, after or "head"


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_migrated(engine: Engine) -> None:
    """Refuse to work on a database that `reconciler db upgrade` has not brought up to date."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no reconciler tables" if current is None else f"is at revision {current}, not {head}"
        raise DatabaseNotMigratedError(
            f"the database {engine.url.render_as_string(hide_password=True)} {state}: run `reconciler db upgrade` first"
        )


def upgrade_database(url: str) -> tuple[str | None, str]:
    """`reconciler db upgrade`: reach the database, apply all migrations; (revision before, revision after)."""
    engine = make_engine(url)
    try:
        check_reachable(engine)
        return upgrade(engine)
    finally:
        engine.dispose()
