"""Shared by the tests of the sandbox fakes: a settable clock and each module's `fake` served on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.sandbox.httpserver import LoopbackServer

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


class Clock:
    """A fake's clock that tests move by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def server(fake: Any) -> Iterator[LoopbackServer]:
    """The test module's `fake`, served over HTTP on loopback."""
    with LoopbackServer(fake) as srv:
        yield srv
