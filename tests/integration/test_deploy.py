"""What ships for operators beside the product: Prometheus alert rules and a Grafana dashboard
(`deploy/`). The rules pass `promtool check rules`, and every metric they and the dashboard name is one a running
`reconciler run` exports on its operations listener."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import REPO_ROOT, customer_with_usage

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "reconciler.json"
# Sample names a family exports besides its own: counters' _total, histograms' series.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "unknown": ("",)}


def expressions() -> list[str]:
    rules = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    panels = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]
    return rules + panels


def test_promtool_accepts_the_alert_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_rules_and_the_dashboard_name_is_exported(sandbox, service_config, daemons):
    customer_with_usage(sandbox, "cus_metrics")
    daemon = daemons(service_config)
    daemon.wait_for("usage sync finished")
    exposition = httpx.get(daemon.ops_url("/metrics")).text
    assert daemon.stop() == 0
    exported = {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in SUFFIXES.get(family.type, ("",))
    }
    named = {name for expr in expressions() for name in re.findall(r"\breconciler_[a-z_]+", expr)}
    assert len(named) >= 10  # the rules and panels do name the product's metrics
    assert named - exported == set()
