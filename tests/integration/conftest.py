"""Fixtures for tests that run `reconciler` commands and daemons against a sandbox of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler_sandbox.server import Sandbox
from tests.integration.helpers import DaemonProcess, reconciler, write_config


@pytest.fixture
def sandbox():
    served = Sandbox.start()
    yield served
    served.stop()


@pytest.fixture
def service_config(sandbox, tmp_path) -> Path:
    raw = sandbox.config_dict(
        f"sqlite:///{tmp_path / 'ledger.db'}", meters=[{"stripe": "api_calls", "openmeter": "api_requests"}]
    )
    raw["balances"]["enabled"] = False
    raw["server"] = {"port": 0, "ops_port": 0, "shutdown_timeout": "20s"}
    raw["schedule"] = {"usage_sync": "1s"}
    raw["logging"] = {"level": "INFO", "format": "json"}
    path = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(path)).returncode == 0
    return path


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []
    yield lambda config: started.append(DaemonProcess(config)) or started[-1]
    for daemon in started:
        daemon.kill()
