"""The layering the architecture relies on (docs/architecture.md), read from the import statements: the pure cores
import no I/O, the usage, balance and plan domains import no ledger (they reach it through their ports), and the
product never imports the sandbox."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"

# Decide, never read or write: their inputs are values and their outputs are values.
PURE_CORES = [
    "usage/decide.py",
    "usage/streams.py",
    "usage/periods.py",
    "usage/rounding.py",
    "usage/history.py",
    "balances/drift.py",
    "balances/accounts.py",
    "balances/sweep.py",
    "balances/invoices.py",
    "balances/money.py",
    "plans/desired.py",
]
IO = ("reconciler.ledger", "reconciler.upstream", "sqlalchemy", "httpx", "requests", "stripe", "openmeter")

# The domains that reach the ledger through Protocol ports only (usage/ports.py, balances/ports.py, plans/ports.py;
# the values the ledger stores and loads are declared in usage/model.py and balances/model.py). Every usage module
# is one: the ledger's adapters, the backfill's checkpoints (ledger/backfill_checkpoints.py) and the reads of what
# was sent (ledger/readback_ledger.py SentEventLog) included, are wired in by reconciler/app.py. The one exception
# is resolve.py, the `balances resolve` command's service, which works on the ledger's rows themselves.
PORTED_DOMAINS = [
    path
    for domain in ("usage", "balances", "plans")
    for path in sorted((PACKAGE / domain).glob("*.py"))
    if path.name != "resolve.py"
]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported(path) if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", PURE_CORES)
def test_a_pure_core_imports_no_io(module):
    assert offending(PACKAGE / module, IO) == []


@pytest.mark.parametrize("path", PORTED_DOMAINS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_usage_balance_and_plan_domains_import_no_ledger(path):
    assert offending(path, ("reconciler.ledger",)) == []


def test_the_product_never_imports_the_sandbox():
    importing = [p for p in PACKAGE.rglob("*.py") if offending(p, ("reconciler_sandbox",))]
    assert importing == []


def test_the_checks_see_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from reconciler.ledger.schema import X\nimport sqlalchemy.orm\n")
    assert offending(module, IO) == ["reconciler.ledger.schema", "sqlalchemy.orm"]
