"""Shared by the tests of the sandbox fakes: a settable clock, each module's `fake` served on loopback, and the
clients each provider's tests drive it with (the real SDK or HTTP client, never retrying by itself)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openmeter
import pytest
import stripe

from reconciler_sandbox.httpserver import LoopbackServer
from reconciler_sandbox.moesif_fake import FakeMoesif

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
MOESIF_TOKEN = "moesif_sandbox_token"
OPENMETER_TOKEN = "om_sandbox_token"


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


@contextmanager
def stripe_sdk(url: str) -> Iterator[stripe.StripeClient]:
    http = stripe.RequestsClient()
    try:
        yield stripe.StripeClient(
            "sk_test_sandbox", base_addresses={"api": url}, max_network_retries=0, http_client=http
        )
    finally:
        http.close()


@contextmanager
def openmeter_sdk(url: str) -> Iterator[openmeter.Client]:
    with openmeter.Client(
        endpoint=url, token=OPENMETER_TOKEN, retry_total=0, connection_timeout=5, read_timeout=5
    ) as client:
        yield client


@pytest.fixture
def moesif_fake(clock: Clock) -> FakeMoesif:
    fake = FakeMoesif(token=MOESIF_TOKEN, clock=clock)
    fake.add_subscription("sub_1", "cus_1", current_balance=10.0)
    return fake


@pytest.fixture
def moesif_client(moesif_fake: FakeMoesif) -> Iterator[httpx.Client]:
    with (
        LoopbackServer(moesif_fake) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {MOESIF_TOKEN}"}, timeout=5) as http,
    ):
        yield http
