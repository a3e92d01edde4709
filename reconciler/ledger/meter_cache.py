"""OpenMeter's meters as last listed, kept between cycles (and between one-shot runs) so that a cycle does not
list them every time. Safe because queries then name a meter by its id: a meter deleted and made again under its
slug, perhaps with another aggregation, has a new id, so the old entry's query fails (and the entry is forgotten)
instead of summing windows of a meter that must not be summed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import sessionmaker

from reconciler.ledger.schema import OpenMeterMeter
from reconciler.usage.model import KnownMeter


class MeterCache:
    def __init__(self, engine: Engine, clock: Callable[[], datetime]):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def load(self) -> dict[str, KnownMeter]:
        with self._sessions() as session:
            rows = session.scalars(select(OpenMeterMeter)).all()
            return {row.slug: KnownMeter(row.meter_id, row.aggregation) for row in rows}

    def replace(self, meters: Mapping[str, KnownMeter]) -> None:
        now = self._clock()
        with self._sessions.begin() as session:
            session.execute(delete(OpenMeterMeter))
            session.add_all(
                OpenMeterMeter(slug=slug, meter_id=m.id, aggregation=m.aggregation, listed_at=now)
                for slug, m in meters.items()
            )

    def forget(self) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(OpenMeterMeter))
