"""The one place that reads the wall clock. Everything else receives `now` (freezegun patches this in tests)."""

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
