"""Engines and migrations. SQLite is the embedded default; PostgreSQL (psycopg 3) is for production."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

import reconciler.migrations

MIGRATIONS_DIR = Path(reconciler.migrations.__file__).parent


class DatabaseNotMigratedError(Exception):
    """The database schema is missing or older than this version of reconciler."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


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
