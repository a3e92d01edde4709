"""The benchmark's outputs: a table for the terminal, `bench.json`, and `bench.png` (time and memory against N)."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler_sandbox.bench.balances import BalanceSizeResult
from reconciler_sandbox.bench.measure import LimitsCheck, SizeResult
from reconciler_sandbox.bench.replicas import ReplicaRunResult

APIS = ("stripe", "openmeter")


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def write_json(
    results: list[SizeResult], balances: list[BalanceSizeResult], replicas: list[ReplicaRunResult], path: Path
) -> None:
    document = {
        "machine": machine(),
        "sizes": [r.as_dict() for r in results],
        "balance_sizes": [r.as_dict() for r in balances],
        "replica_sizes": [r.as_dict() for r in replicas],
    }
    path.write_text(json.dumps(document, indent=2))


def table_rows(results: list[SizeResult]) -> list[dict[str, Any]]:
    """One short row per size for the terminal; bench.json has everything."""
    rows = []
    for r in results:
        naive = "-" if r.naive_seconds is None else f"{r.naive_seconds:.1f}"
        if r.naive_extrapolated:
            naive += "*"
        rows.append(
            {
                "N": f"{r.items:,}",
                "meter events": r.conditions.meter_events,
                "cold s": f"{r.cold.wall_seconds:.1f}",
                "floor s": f"{r.cold_floor_seconds:.1f}",
                "/floor": f"{r.floor_ratio:.2f}",
                "binding": r.cold.limits.floor.binding,
                "naive s": naive,
                "speedup": "-" if r.naive_ratio is None else f"{r.naive_ratio:.1f}x",
                "warm s": f"{r.warm.wall_seconds:.1f}",
                "warm reqs": "/".join(str(r.warm.requests[api]) for api in APIS),
                "read-back s": f"{r.readback.wall_seconds:.1f}" if r.readback else "-",
                "read-back reqs": str(r.readback.requests["stripe"]) if r.readback else "-",
                "429s": str(sum(sum(c.answered_429.values()) for c in r.product_runs)),
                "RSS MB": f"{max(r.cold.peak_rss_mb, r.warm.peak_rss_mb):.0f}",
                "agrees": {None: "-", True: "yes", False: "NO"}[r.naive_agrees],
                "limits": "kept" if r.within_limits else "EXCEEDED",
            }
        )
    return rows


def limiter_rows(results: list[SizeResult]) -> list[dict[str, Any]]:
    """One row per run (cold, warm, read-back, naive) of every size: its time, its floor and the term that sets it,
    and each limiter's busiest window against its limit."""
    rows = []
    for r in results:
        runs: list[tuple[str, float | None, LimitsCheck]] = [
            ("cold", r.cold.wall_seconds, r.cold.limits),
            ("warm", r.warm.wall_seconds, r.warm.limits),
        ]
        if r.readback is not None:
            runs.append(("read-back", r.readback.wall_seconds, r.readback.limits))
        if r.naive_limits is not None:
            runs.append(("naive", r.naive_seconds, r.naive_limits))
        for name, seconds, check in runs:
            rows.append(run_row(f"{r.items:,}", f"{name}, {r.conditions.meter_events}", seconds, check))
    return rows


def run_row(size: str, name: str, seconds: float | None, check: LimitsCheck) -> dict[str, str]:
    run_floor = check.floor.seconds
    return {
        "N": size,
        "run": name,
        "s": "-" if seconds is None else f"{seconds:.1f}",
        "floor s": f"{run_floor:.2f}",
        "/floor": f"{seconds / run_floor:.2f}" if seconds is not None and run_floor else "-",
        "binding": check.floor.binding,
        "most in one window / limit": "\n".join(
            f"{limiter} {use.busiest}/{use.allowed}"
            + (f" per {use.window_seconds:g} s" if use.window_seconds != 1 else "")
            + (" OVER" if use.exceeded else "")
            for limiter, use in check.limiters.items()
        ),
        "429s": str(check.answered_429),
        "limits": "kept" if check.within_limits else "EXCEEDED",
    }


def replica_rows(results: list[ReplicaRunResult]) -> list[dict[str, Any]]:
    """One row per replica run: the shared cycle's time, and each replica's CPU and peak RSS."""
    return [
        {
            "N": f"{r.items:,}",
            "meter events": r.conditions.meter_events,
            "replicas": str(len(r.replicas)),
            "cold s": f"{r.wall_seconds:.1f}",
            "CPU s per replica": " / ".join(f"{m.cpu_seconds:.0f}" for m in r.replicas),
            "RSS MB per replica": " / ".join(f"{m.peak_rss_mb:.0f}" for m in r.replicas),
            "stripe/openmeter reqs": "/".join(
                str(sum(r.limits.endpoint_requests.get(api, {}).values())) for api in APIS
            ),
            "wrong totals": str(r.wrong_totals),
            "left pending / unfinished": f"{r.pending_intents} / {r.unfinished_items}",
            "limits": "kept" if r.limits.within_limits else "EXCEEDED",
            "ok": "yes" if r.ok else "NO",
        }
        for r in results
    ]


def balance_limiter_rows(results: list[BalanceSizeResult]) -> list[dict[str, Any]]:
    """One row per balance cycle, as `limiter_rows`."""
    return [
        run_row(f"{r.customers:,}", name, cycle.wall_seconds, cycle.limits)
        for r in results
        for name, cycle in (("cold", r.cold), ("warm", r.warm), ("changed", r.changed))
    ]


def balance_rows(results: list[BalanceSizeResult]) -> list[dict[str, Any]]:
    """One row per balance size: each of the three cycles' wall time and stripe/moesif requests."""
    rows = []
    for r in results:
        row = {
            "customers": f"{r.customers:,}",
            "floor s": f"{r.cold_floor_seconds:.0f}",
            "binding": r.cold.limits.floor.binding,
        }
        for name, cycle in (("cold", r.cold), ("warm", r.warm), ("changed", r.changed)):
            row[f"{name} s"] = f"{cycle.wall_seconds:.1f}"
            row[f"{name} reqs"] = f"{cycle.requests['stripe']}/{cycle.requests['moesif']}"
        cycles = (r.cold, r.warm, r.changed)
        row["429s"] = str(sum(sum(c.answered_429.values()) for c in cycles))
        row["RSS MB"] = f"{max(c.peak_rss_mb for c in cycles):.0f}"
        row["limits"] = "kept" if r.within_limits else "EXCEEDED"
        rows.append(row)
    return rows


def write_plot(results: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for events in dict.fromkeys(r.conditions.meter_events for r in results):
        runs = [r for r in results if r.conditions.meter_events == events]
        sizes = [r.items for r in runs]
        times.plot(sizes, [r.cold.wall_seconds for r in runs], "o-", label=f"reconciler, cold cycle, {events}")
        times.plot(sizes, [r.warm.wall_seconds for r in runs], "o-", label=f"reconciler, warm cycle, {events}")
        budgeted = [r for r in runs if r.conditions.stripe_latency]  # lifted sizes have no meaningful floor
        times.plot(
            [r.items for r in budgeted],
            [r.cold_floor_seconds for r in budgeted],
            "--",
            label=f"floor set by the limiters, {events}",
        )
        memory.plot(sizes, [max(r.cold.peak_rss_mb, r.warm.peak_rss_mb) for r in runs], "o-", label=events)
    for r in results:
        if not r.conditions.stripe_latency:
            times.annotate(
                "no latency,\nlifted budgets", (r.items, r.cold.wall_seconds), fontsize=7, ha="right", va="top"
            )
    naive = [(r.items, r.naive_seconds) for r in results if r.naive_seconds is not None]
    if naive:
        times.plot(*zip(*naive, strict=True), "s:", color="tab:red", label="naive loop (extrapolated beyond measured)")
    times.set(xscale="log", yscale="log", xlabel="metered items (N)", ylabel="seconds", title="Cycle wall time")
    times.legend(fontsize=8)
    memory.legend(fontsize=8)
    memory.set(xscale="log", xlabel="metered items (N)", ylabel="MB", title="Peak RSS of the product")
    memory.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
