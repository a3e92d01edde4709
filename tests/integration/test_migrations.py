"""The Alembic migrations build exactly the schema the code describes, on SQLite and PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from reconciler.ledger.database import (
    DatabaseNotMigratedError,
    current_revision,
    head_revision,
    make_engine,
    require_migrated,
    upgrade,
)
from reconciler.ledger.schema import Base


def test_migrations_match_the_schema_and_are_idempotent(database_url):
    engine = make_engine(database_url)
    try:
        before, after = upgrade(engine)
        assert (before, after) == (None, head_revision())
        assert upgrade(engine) == (after, after)  # running it again changes nothing
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_an_unmigrated_database_is_refused(database_url):
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        with pytest.raises(DatabaseNotMigratedError, match="run `reconciler db upgrade` first"):
            require_migrated(engine)
        upgrade(engine)
        require_migrated(engine)
    finally:
        engine.dispose()
