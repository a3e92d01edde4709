"""Every job's ports are satisfied by the concrete adapters the app wires in: each method a port declares exists on
its adapter, with the same parameters (names, kinds, and whether they have a default). The adapters do not inherit
from the ports, so nothing else would notice a rename on one side until a cycle ran."""

from __future__ import annotations

import inspect
from typing import Protocol

import pytest

from reconciler.balances import ports as balance_ports
from reconciler.ledger.backfill_checkpoints import Checkpoints
from reconciler.ledger.balance_ledger import BalanceLedger
from reconciler.ledger.coordination import Coordinator
from reconciler.ledger.listing import ListingLedger
from reconciler.ledger.meter_cache import MeterCache
from reconciler.ledger.plan_ledger import PlanLedger
from reconciler.ledger.readback_ledger import ReadBackLedger, SentEventLog
from reconciler.ledger.runs import RunLog
from reconciler.ledger.unbilled import UnbilledLedger
from reconciler.ledger.usage_ledger import UsageLedger
from reconciler.plans import ports as plan_ports
from reconciler.upstream.app_api import EntitlementsGateway
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.upstream.stripe_api import StripeGateway
from reconciler.usage import job as usage_job
from reconciler.usage import ports as usage_ports
from reconciler.usage import recovery
from reconciler.usage.listing import MemoryListing

PAIRS = [
    (balance_ports.StripeBalanceReads, StripeGateway),
    (balance_ports.MoesifBalances, MoesifGateway),
    (balance_ports.BalanceBook, BalanceLedger),
    (balance_ports.Runs, RunLog),
    (plan_ports.StripeSubscriptions, StripeGateway),
    (plan_ports.EntitlementsApp, EntitlementsGateway),
    (plan_ports.PlanBook, PlanLedger),
    (plan_ports.Runs, RunLog),
    (usage_job.StripePort, StripeGateway),
    (usage_job.OpenMeterPort, OpenMeterGateway),
    (recovery.StripeSummaries, StripeGateway),
    (usage_ports.UsageBook, UsageLedger),
    (usage_ports.Runs, RunLog),
    (usage_ports.MeterStore, MeterCache),
    (usage_ports.UnbilledBook, UnbilledLedger),
    (usage_ports.ListingBook, ListingLedger),
    (usage_ports.ListingBook, MemoryListing),
    (usage_ports.ReadBackBook, ReadBackLedger),
    (usage_ports.SentEvents, SentEventLog),
    (usage_ports.Coordination, Coordinator),
    (usage_ports.BackfillCheckpoints, Checkpoints),
]


def members(port: type) -> list[str]:
    own = {name for klass in port.__mro__ if klass not in (Protocol, object) for name in vars(klass)}
    return sorted(name for name in own if not name.startswith("_") and callable(getattr(port, name)))


def shape(function) -> list[tuple[str, object, bool]]:
    return [
        (p.name, p.kind, p.default is not inspect.Parameter.empty)
        for p in inspect.signature(function).parameters.values()
    ]


@pytest.mark.parametrize(("port", "adapter"), PAIRS, ids=[f"{a.__name__} is a {p.__name__}" for p, a in PAIRS])
def test_the_adapter_has_every_method_of_the_port(port, adapter):
    assert members(port), f"{port.__name__} declares nothing"
    for name in members(port):
        assert callable(getattr(adapter, name, None)), f"{adapter.__name__} has no {name}"
        assert shape(getattr(adapter, name)) == shape(getattr(port, name)), f"{adapter.__name__}.{name}"
