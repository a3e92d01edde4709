"""CI's smoke run of `reconciler bench`: a small N, checking that the product and the naive loop bill the same and
that the warm cycle makes only the reads it must. Timings are the benchmark's business, not a test's."""

from __future__ import annotations

import json

from tests.integration.helpers import reconciler


def test_bench_smoke_run_agrees_with_the_naive_loop_and_writes_its_results(tmp_path):
    items = 30
    result = reconciler(
        "bench",
        "--items",
        str(items),
        "--out",
        str(tmp_path),
        "--stripe-latency-ms",
        "5",
        "--openmeter-latency-ms",
        "5",
        "--stripe-per-second",
        "200",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (size,) = json.loads((tmp_path / "bench.json").read_text())["sizes"]
    assert size["items"] == items and size["naive_agrees"] is True
    cold, warm = size["cold"], size["warm"]
    assert (cold["exit_code"], warm["exit_code"]) == (0, 0)
    assert cold["summary"]["reported"] == items and warm["summary"]["unchanged"] == items
    assert cold["requests"] == {"stripe": items + 2, "openmeter": 2}  # writes + 1 page + meters; listing + 1 query
    assert warm["requests"] == {"stripe": 2, "openmeter": 2}  # nothing changed: the reads alone
    assert cold["answered_429"] == warm["answered_429"] == {"stripe": 0, "openmeter": 0}
    assert cold["max_requests_in_one_second"]["stripe"] <= 200
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "agrees" in result.stdout
