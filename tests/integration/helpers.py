"""Helpers for driving `reconciler` as an operator does: a subprocess per command or daemon."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler.clock import utc_now
from reconciler_sandbox.server import Sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous: a test may wait this long for what it expects, but never passes or fails by how fast the machine is.
PATIENCE_SECONDS = 120


def command_line(*args: str) -> list[str]:
    """`reconciler ARGS…` as a subprocess; started slowly on purpose with TESTS_SLOW_START_SECONDS (see
    `tests.integration.slow_start`)."""
    if float(os.environ.get("TESTS_SLOW_START_SECONDS", "0")) > 0:
        return [sys.executable, "-m", "tests.integration.slow_start", *args]
    return [sys.executable, "-m", "reconciler", *args]


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without our own settings (a command reads only what a test gives it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def reconciler(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = PATIENCE_SECONDS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command_line(*args), capture_output=True, text=True, env=command_env(env), cwd=cwd, timeout=timeout
    )


def wait_until(condition: Callable[[], object], timeout: float = PATIENCE_SECONDS, what: str = "") -> None:
    """Poll `condition` until it holds; fail (naming `what`) only after a generous timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s: {what or condition}")
        time.sleep(0.05)


def assert_ephemeral_port(config: Path) -> None:
    """A daemon under test binds port 0 (or nothing), never a fixed port a developer or a second CI may hold: both
    the webhook listener (server.port) and the operations one (server.ops_port)."""
    server = (yaml.safe_load(config.read_text()) or {}).get("server") or {}
    if server.get("enabled", True) is not False:
        assert server.get("port") == 0 and server.get("ops_port") == 0, (
            f"{config}: set server.port: 0 and server.ops_port: 0 in tests"
        )


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def customer_with_usage(sandbox: Sandbox, customer: str = "cus_cli", value: float = 42) -> None:
    now = utc_now()
    meter = next((m for m in sandbox.stripe.meters.values() if m["event_name"] == "api_calls"), None)
    meter = meter or sandbox.stripe.add_meter("api_calls", formula="sum")
    price = sandbox.stripe.add_price(meter=meter["id"])
    sandbox.stripe.add_customer(id=customer)
    sandbox.stripe.add_subscription(
        customer,
        [price["id"]],
        current_period_start=int((now - timedelta(days=3)).timestamp()),
        current_period_end=int((now + timedelta(days=27)).timestamp()),
    )
    if "api_requests" not in sandbox.openmeter.meters:
        sandbox.openmeter.add_meter("api_requests")
    sandbox.openmeter.ingest("api_requests", customer, now - timedelta(days=2), value)


class DaemonProcess:
    """`reconciler run` in a subprocess, its JSON log lines collected as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        assert_ephemeral_port(config)
        self.process = subprocess.Popen(
            command_line("run", "--config", str(config)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=command_env(env),
        )
        self.events: list[dict] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self._lines.put(line)

    def wait_for(self, event: str, timeout: float = PATIENCE_SECONDS, **fields) -> dict:
        deadline = time.monotonic() + timeout
        seen = [e for e in self.events if e.get("event") == event and fields.items() <= e.items()]
        if seen:
            return seen[0]
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None and self._lines.empty():
                    break
                continue
            record = self._record(line)
            if record.get("event") == event and fields.items() <= record.items():
                return record
        raise AssertionError(f"no {event!r} log line; saw {[e.get('event') for e in self.events][-20:]}")

    def webhook_url(self, path: str) -> str:
        """`path` on the webhook listener, at the port the daemon logged it bound."""
        port = self.wait_for("reconciler running")["webhook_port"]
        return f"http://127.0.0.1:{port}{path}"

    def ops_url(self, path: str) -> str:
        """`path` on the operations listener (/healthz, /readyz, /metrics)."""
        port = self.wait_for("reconciler running")["ops_port"]
        return f"http://127.0.0.1:{port}{path}"

    def _record(self, line: str) -> dict:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event": line.strip()}
        self.events.append(record)
        return record

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PATIENCE_SECONDS) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A daemon that will not stop: say where it got to (its last log lines), not only that it hung.
            while not self._lines.empty():
                self._record(self._lines.get_nowait())
            last = [e.get("event") for e in self.events][-30:]
            raise AssertionError(
                f"still running {timeout:.0f} s after {signal.Signals(sig).name}; its last log lines: {last}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")
