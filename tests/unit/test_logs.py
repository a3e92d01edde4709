"""Log lines: console for a person at a terminal, JSON for a pipe or a file, every JSON field a JSON value, and no
configured secret in any line."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import structlog

from reconciler.logs import chosen_format, configure_logging


@pytest.fixture
def restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_auto_is_console_on_a_terminal_and_json_elsewhere_and_explicit_formats_stay():
    assert chosen_format("auto", terminal=True) == "console"
    assert chosen_format("auto", terminal=False) == "json"
    for terminal in (True, False):
        assert chosen_format("json", terminal) == "json"
        assert chosen_format("console", terminal) == "console"


def test_json_lines_hold_json_values_never_python_reprs(capsys, restore_structlog):
    configure_logging("INFO", "json", secrets=["sk_live_secret"])
    structlog.get_logger().info(
        "values",
        at=datetime(2026, 3, 1, 12, 30, tzinfo=UTC),
        amount=Decimal("12.50"),
        customers={"cus_b", "cus_a"},
        jobs=["usage_sync", "balance_reconcile"],
        counts={"sent": 2},
        error=ValueError("no such price: sk_live_secret"),
        missing=None,
    )
    line = json.loads(capsys.readouterr().err)
    assert line["at"] == "2026-03-01T12:30:00+00:00"
    assert Decimal(line["amount"]) == Decimal("12.50")
    assert line["customers"] == ["cus_a", "cus_b"]
    assert line["jobs"] == ["usage_sync", "balance_reconcile"]
    assert line["counts"] == {"sent": 2}
    assert line["error"] == "no such price: **********"
    assert line["missing"] is None


def test_a_secret_is_scrubbed_wherever_it_sits_in_a_json_line(capsys, restore_structlog):
    secret = 'sk_"quoted\\secret'  # JSON escapes it: the escaped form is scrubbed too
    configure_logging("INFO", "json", secrets=[secret])
    structlog.get_logger().info(f"failed with {secret}", nested=[{"url": f"postgresql://u:{secret}@db"}])
    err = capsys.readouterr().err
    assert "quoted" not in err  # neither the raw nor the escaped secret, anywhere
    assert json.loads(err)["nested"] == [{"url": "postgresql://u:**********@db"}]


def test_auto_writes_console_lines_to_a_terminal():
    primary, secondary = pty.openpty()
    code = "import structlog; from reconciler.logs import configure_logging; configure_logging(); "
    code += "structlog.get_logger().info('hello', count=3)"
    with subprocess.Popen([sys.executable, "-c", code], stderr=secondary) as process:
        os.close(secondary)
        output = b""
        while chunk := _read(primary):
            output += chunk
    os.close(primary)
    assert process.returncode == 0
    line = output.decode().strip()
    assert "hello" in line and "count=3" in line and not line.startswith("{")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal's other end closed: Linux says EIO
        return b""
