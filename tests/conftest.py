"""Shared fixtures: the sandbox fakes over real HTTP, a ledger database (SQLite and PostgreSQL), and a
harness that runs the real usage sync against them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.clock import utc_now
from reconciler.config import Config, parse_config
from reconciler.ledger.database import make_engine, upgrade
from reconciler.ledger.listing import ListingLedger
from reconciler.ledger.meter_cache import MeterCache
from reconciler.ledger.readback_ledger import ReadBackLedger, SentEventLog
from reconciler.ledger.runs import RunLog
from reconciler.ledger.unbilled import UnbilledLedger
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.usage.job import CycleResult, UsageSync
from reconciler.usage.readback import ReadBack
from reconciler.usage.stripe_view import StripeView
from reconciler_sandbox.httpserver import LoopbackServer
from reconciler_sandbox.moesif_fake import FakeMoesif
from reconciler_sandbox.openmeter_fake import FakeOpenMeter
from reconciler_sandbox.stripe_fake import FakeStripe

POSTGRES_URL = os.environ.get("RECONCILER_TEST_POSTGRES_URL")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault simulation first: it is the longest part of the suite and runs its seeds in processes of its own,
    so with `pytest -n` the rest of the suite runs beside it instead of after it."""
    items.sort(key=lambda item: "tests/simulation/" not in item.nodeid)


STRIPE_KEY = "sk_test_sandbox"
OPENMETER_TOKEN = "om_sandbox_token"
MOESIF_TOKEN = "moesif_sandbox_token"


@pytest.fixture(scope="session")
def _stripe_server() -> Iterator[tuple[FakeStripe, LoopbackServer]]:
    fake = FakeStripe(api_key=STRIPE_KEY)
    with LoopbackServer(fake) as server:
        yield fake, server


@pytest.fixture(scope="session")
def _openmeter_server() -> Iterator[tuple[FakeOpenMeter, LoopbackServer]]:
    fake = FakeOpenMeter(token=OPENMETER_TOKEN)
    with LoopbackServer(fake) as server:
        yield fake, server


@pytest.fixture(scope="session")
def _moesif_server() -> Iterator[tuple[FakeMoesif, LoopbackServer]]:
    fake = FakeMoesif(token=MOESIF_TOKEN)
    with LoopbackServer(fake) as server:
        yield fake, server


@pytest.fixture
def moesif_fake(_moesif_server) -> FakeMoesif:
    fake, _ = _moesif_server
    fake.reset()
    fake.visibility_delay_seconds = 0.0
    fake.dedupe_transaction_ids = True
    return fake


@pytest.fixture
def stripe_fake(_stripe_server) -> FakeStripe:
    fake, _ = _stripe_server
    fake.reset()
    fake.duplicate_identifier_response = "error"
    return fake


@pytest.fixture
def openmeter_fake(_openmeter_server) -> FakeOpenMeter:
    fake, _ = _openmeter_server
    fake.reset()
    return fake


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    """Every ledger test runs on SQLite and on PostgreSQL (each test in a schema of its own)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("RECONCILER_TEST_POSTGRES_URL is not set: PostgreSQL ledger tests skipped")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def sandbox_config(stripe_url: str, openmeter_url: str, database_url: str, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "database": {"url": database_url},
        "stripe": {"api_key": STRIPE_KEY, "api_base": stripe_url, "max_network_retries": 2},
        "openmeter": {"url": openmeter_url, "token": OPENMETER_TOKEN, "max_retries": 2},
        "usage": {
            "meters": [
                {"stripe": "api_calls", "openmeter": "api_requests"},
                {"stripe": "tokens", "openmeter": "tokens"},
                {"stripe": "price_legacy", "openmeter": "api_requests"},
            ]
        },
        "logging": {"level": "DEBUG", "format": "console"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_config(raw)


class Harness:
    """The real usage sync (real SDKs, real HTTP, real database) wired to the sandbox fakes."""

    def __init__(
        self, stripe: FakeStripe, stripe_url: str, openmeter: FakeOpenMeter, openmeter_url: str, database_url: str
    ):
        self.stripe = stripe
        self.openmeter = openmeter
        self.stripe_url = stripe_url
        self.openmeter_url = openmeter_url
        self.database_url = database_url
        self.engine = make_engine(database_url)
        upgrade(self.engine)
        self.configure()

    def configure(self, **sections: Any) -> None:
        self.config = sandbox_config(self.stripe_url, self.openmeter_url, self.database_url, **sections)
        self.ledger = UsageLedger(self.engine, utc_now)
        self.stripe_gateway = StripeGateway(self.config.stripe)
        self.runs = RunLog(self.engine, utc_now)
        self.sync = UsageSync(
            self.config,
            self.stripe_gateway,
            OpenMeterGateway(self.config.openmeter),
            self.ledger,
            self.runs,
            clock=utc_now,
            meter_cache=MeterCache(self.engine, utc_now),
            unbilled=UnbilledLedger(self.engine, utc_now),
            listings=ListingLedger(self.engine, utc_now),
        )
        self.read_back = ReadBack(
            self.config,
            StripeView(SentEventLog(self.engine), self.stripe_gateway),
            ReadBackLedger(self.engine, utc_now),
            self.runs,
            utc_now,
        )

    def cycle(self, **kwargs: Any) -> CycleResult:
        return self.sync.run_cycle(**kwargs)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params))


@pytest.fixture
def harness(stripe_fake, openmeter_fake, _stripe_server, _openmeter_server, database_url) -> Iterator[Harness]:
    h = Harness(stripe_fake, _stripe_server[1].url, openmeter_fake, _openmeter_server[1].url, database_url)
    yield h
    h.engine.dispose()


def ts(dt: datetime) -> int:
    return int(dt.timestamp())


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)
