"""The benchmark's outputs: a table for the terminal, `bench.json`, and `bench.png` (time and memory against N)."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler_sandbox.bench.balances import BalanceSizeResult
from reconciler_sandbox.bench.measure import SizeResult

APIS = ("stripe", "openmeter")


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def write_json(results: list[SizeResult], balances: list[BalanceSizeResult], path: Path) -> None:
    document = {
        "machine": machine(),
        "sizes": [r.as_dict() for r in results],
        "balance_sizes": [r.as_dict() for r in balances],
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
                "cold s": f"{r.cold.wall_seconds:.1f}",
                "floor s": f"{r.cold_floor_seconds:.1f}",
                "/floor": f"{r.floor_ratio:.2f}",
                "naive s": naive,
                "speedup": "-" if r.naive_ratio is None else f"{r.naive_ratio:.1f}x",
                "warm s": f"{r.warm.wall_seconds:.1f}",
                "warm reqs": "/".join(str(r.warm.requests[api]) for api in APIS),
                "read-back s": f"{r.readback.wall_seconds:.1f}",
                "read-back reqs": str(r.readback.requests["stripe"]),
                "max/s": "/".join(str(r.cold.max_requests_in_one_second[api]) for api in APIS),
                "429s": str(sum(r.cold.answered_429.values()) + sum(r.warm.answered_429.values())),
                "RSS MB": f"{max(r.cold.peak_rss_mb, r.warm.peak_rss_mb):.0f}",
                "agrees": {None: "-", True: "yes", False: "NO"}[r.naive_agrees],
            }
        )
    return rows


def balance_rows(results: list[BalanceSizeResult]) -> list[dict[str, Any]]:
    """One row per balance size: each of the three cycles' wall time and stripe/moesif requests."""
    rows = []
    for r in results:
        row = {"customers": f"{r.customers:,}", "floor s": f"{r.cold_floor_seconds:.0f}"}
        for name, cycle in (("cold", r.cold), ("warm", r.warm), ("changed", r.changed)):
            row[f"{name} s"] = f"{cycle.wall_seconds:.1f}"
            row[f"{name} reqs"] = f"{cycle.requests['stripe']}/{cycle.requests['moesif']}"
        cycles = (r.cold, r.warm, r.changed)
        row["429s"] = str(sum(sum(c.answered_429.values()) for c in cycles))
        row["RSS MB"] = f"{max(c.peak_rss_mb for c in cycles):.0f}"
        rows.append(row)
    return rows


def write_plot(results: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.items for r in results]
    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    times.plot(sizes, [r.cold.wall_seconds for r in results], "o-", label="reconciler, cold cycle")
    times.plot(sizes, [r.warm.wall_seconds for r in results], "o-", label="reconciler, warm cycle")
    budgeted = [r for r in results if r.conditions.stripe_latency]  # lifted sizes have no meaningful floor
    times.plot(
        [r.items for r in budgeted], [r.cold_floor_seconds for r in budgeted], "k--", label="floor set by the budgets"
    )
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
    memory.plot(sizes, [max(r.cold.peak_rss_mb, r.warm.peak_rss_mb) for r in results], "o-", color="tab:purple")
    memory.set(xscale="log", xlabel="metered items (N)", ylabel="MB", title="Peak RSS of the product")
    memory.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
