"""CI's smoke run of `reconciler bench`: a small N, checking that the product and the naive loop bill the same, that
the warm cycles make only the reads they must, for the usage sync and the balance job, and that every run reports
its floor, the limiter that binds it and each limiter's busiest second, and never exceeded one. Timings are the
benchmark's business, not a test's."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.helpers import reconciler

POSTGRES_URL = os.environ.get("RECONCILER_TEST_POSTGRES_URL")


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
        # Stripe's live structure (global 100/s, 25/s per endpoint), with meter events apart at 100/s, so that they
        # bind the cold cycle's floor.
        "--stripe-meter-events-per-second",
        "100",
        "--balance-customers",
        "40",
        "--moesif-latency-ms",
        "5",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    size, streamed = results["sizes"]  # v1 and v2_stream side by side, by default
    assert [s["conditions"]["meter_events"] for s in (size, streamed)] == ["v1", "v2_stream"]
    assert size["items"] == items and size["naive_agrees"] is True
    cold, warm = size["cold"], size["warm"]
    assert (cold["exit_code"], warm["exit_code"]) == (0, 0)
    assert cold["summary"]["reported"] == items and warm["summary"]["unchanged"] == items
    assert cold["requests"] == {"stripe": items + 2, "openmeter": 2}  # writes + 1 page + meters; listing + 1 query
    assert warm["requests"] == {"stripe": 2, "openmeter": 1}  # nothing changed: a page, the meters, one query
    assert cold["answered_429"] == warm["answered_429"] == {"stripe": 0, "openmeter": 0}
    readback = size["readback"]  # every period final: one summary listing each, and nothing else
    assert readback["exit_code"] == 0 and readback["summary"]["ok"] == items
    assert readback["requests"] == {"stripe": items, "openmeter": 0}
    assert cold["max_requests_in_one_second"]["stripe"] <= 100
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "agrees" in result.stdout

    # Against the limiters: each run's floor, the limiter that binds it, and every limiter's busiest second.
    assert size["within_limits"] is True and size["naive_limits"]["within_limits"] is True
    assert cold["limits"]["endpoint_requests"] == {
        "stripe": {"GET /v1/billing/meters": 1, "GET /v1/subscriptions": 1, "POST /v1/billing/meter_events": items},
        "openmeter": {"GET *": 1, "POST *": 1},  # the meters, then the query (a JSON body)
    }
    limiters = cold["limits"]["limiters"]
    assert {name: (use["requests"], use["allowed"]) for name, use in limiters.items()} == {
        "global": (2, 100),  # live: meter events are not counted against the global limit
        "endpoint GET /v1/billing/meters": (1, 25),
        "endpoint GET /v1/subscriptions": (1, 25),
        "meter events": (items, 100),
        "openmeter": (2, 50),
    }
    assert cold["limits"]["floor"]["binding"] == "meter events"
    assert cold["limits"]["floor"]["seconds"] == size["cold_floor_seconds"] == items / 100
    summaries = "endpoint GET /v1/billing/meters/{id}/event_summaries"
    assert readback["limits"]["floor"]["binding"] == summaries  # one summary listing per period, 25 a second
    assert readback["limits"]["floor"]["seconds"] == items / 25
    assert size["naive_limits"]["floor"]["binding"] == "openmeter"  # a query per item, 50 a second
    runs = [cold, warm, readback, size["naive_limits"]]
    for run in runs:
        checked = run.get("limits", run)
        floor = checked["floor"]
        assert floor["seconds"] == max(floor["terms"].values()) == floor["terms"][floor["binding"]]
        assert checked["answered_429"] == 0 and checked["within_limits"] is True
        for name, use in checked["limiters"].items():  # never over any limiter in any one-second window
            assert 0 < use["busiest"] <= use["allowed"] and use["exceeded"] is False, name
    assert "usage sync against the limiters" in result.stdout and "binding" in result.stdout

    # The v2 stream: the same items billed in one stream request (up to 100 events each) and a session, counted
    # against the stream's own live limiter, which no longer binds the cycle; the naive loop ran beside v1 only.
    cold, warm = streamed["cold"], streamed["warm"]
    assert cold["summary"]["reported"] == items and warm["summary"]["unchanged"] == items
    assert cold["limits"]["endpoint_requests"]["stripe"] == {
        "GET /v1/billing/meters": 1,
        "GET /v1/subscriptions": 1,
        "POST /v2/billing/meter_event_session": 1,
        "POST /v2/billing/meter_event_stream": 1,
    }
    assert cold["limits"]["limiters"]["meter event stream"]["requests"] == 1
    assert cold["limits"]["floor"]["binding"] not in ("meter events", "meter event stream")
    assert streamed["within_limits"] is True and streamed["naive_seconds"] is None
    assert streamed["readback"]["summary"]["ok"] == items
    assert "v2_stream" in result.stdout

    # The balance job: every Moesif balance read once, then none while nothing changes, then only the changed one's.
    (balances,) = results["balance_sizes"]
    assert balances["customers"] == 40 and balances["topped_up"] == 1
    cold, warm, changed = balances["cold"], balances["warm"], balances["changed"]
    assert [c["exit_code"] for c in (cold, warm, changed)] == [0, 0, 0]
    listings = 4  # one page each of subscriptions, PaymentIntents, InvoicePayments and refunds
    assert cold["requests"] == {"stripe": listings, "moesif": 40}
    assert warm["requests"] == {"stripe": listings, "moesif": 0}
    assert changed["requests"] == {"stripe": listings, "moesif": 2}  # the top-up's POST and its balance read
    assert (warm["summary"]["moesif_not_reread"], changed["summary"]["moesif_not_reread"]) == (40, 39)
    assert changed["summary"]["forwarded"] == 1 and changed["summary"]["in_sync"] == 40
    assert all(c["answered_429"] == {"stripe": 0, "moesif": 0} for c in (cold, warm, changed))
    assert balances["within_limits"] is True
    assert cold["limits"]["floor"]["binding"] == "moesif"  # 40 reads at 500 a minute
    assert cold["limits"]["limiters"]["moesif"] == {
        "requests": 40,
        "allowed": 500,
        "window_seconds": 60.0,
        "busiest": 40,
        "exceeded": False,
    }
    assert "changed reqs" in result.stdout  # the table, with its headers whole


@pytest.mark.postgres
def test_bench_replica_run_shares_one_cycle_between_two_replicas_and_bills_every_total(tmp_path):
    if not POSTGRES_URL:
        pytest.skip("RECONCILER_TEST_POSTGRES_URL is not set: the replica benchmark needs PostgreSQL")
    items = 300
    result = reconciler(
        *("bench", "--items", "0", "--balance-customers", "0", "--no-plot", "--out", str(tmp_path)),
        *("--replica-items", str(items), "--replicas", "2", "--meter-events", "v2_stream"),
        *("--postgres-url", POSTGRES_URL),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [run] = json.loads((tmp_path / "bench.json").read_text())["replica_sizes"]
    assert (run["items"], run["ok"], run["wrong_totals"]) == (items, True, 0)
    assert (run["pending_intents"], run["unfinished_items"]) == (0, 0)  # every acceptance recorded, every item done
    assert len(run["replicas"]) == 2
    for replica in run["replicas"]:
        assert replica["exit_code"] == 0 and replica["started"] and replica["finished"]
        assert replica["cpu_seconds"] > 0 and replica["peak_rss_mb"] > 0
    # One listing of Stripe (by the replica that planned the tick) and ⌈N/100⌉ stream batches, whoever sent them.
    stripe = run["limits"]["endpoint_requests"]["stripe"]
    assert stripe["GET /v1/subscriptions"] == 3 and stripe["POST /v2/billing/meter_event_stream"] <= items // 100 + 2
    assert "shared by replicas" in result.stdout
