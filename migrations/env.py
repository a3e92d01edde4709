"""Alembic environment: migrations run on the connection `reconciler.ledger.database` hands over."""

from alembic import context

from reconciler.ledger.schema import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # plain `alembic` command line: build an engine from sqlalchemy.url
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
