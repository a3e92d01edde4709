"""The whole benchmark: each size in turn, the naive loop measured at the small sizes and extrapolated above."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from reconciler_sandbox.bench.balances import BalanceSizeResult, run_balance_size
from reconciler_sandbox.bench.measure import Conditions, SizeResult, run_size
from reconciler_sandbox.bench.replicas import ReplicaRunResult, run_replicas
from reconciler_sandbox.bench.report import write_json, write_plot


def run_benchmark(
    sizes: list[int],
    conditions: Conditions,
    out_dir: Path,
    *,
    naive_up_to: int,
    lift_above: int,
    balance_sizes: list[int] = [],  # noqa: B006 (never mutated)
    meter_events: Sequence[str] = ("v1",),
    read_back: bool = True,
    plot: bool = True,
    replica_sizes: Sequence[int] = (),
    replicas: int = 2,
    postgres_url: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[SizeResult], list[BalanceSizeResult], list[ReplicaRunResult]]:
    """Benchmark every usage size (sizes above `lift_above` run under `conditions.lifted()`) on each of the product's
    `meter_events` paths side by side (the naive loop, which has one path, beside the first), then the balance job
    at every balance size, then each replica size: one cold cycle shared by `replicas` replicas on PostgreSQL
    (`postgres_url`), lifted, on each path. Writes bench.json (and bench.png) to `out_dir` as it goes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[SizeResult] = []
    balance_results: list[BalanceSizeResult] = []
    replica_results: list[ReplicaRunResult] = []
    per_item: float | None = None
    for items in sorted(sizes):
        for path in meter_events:
            first = path == meter_events[0]
            run_naive = first and items <= naive_up_to
            lifted = items > lift_above
            path_conditions = replace(conditions, meter_events=path)
            result = run_size(
                items,
                path_conditions.lifted() if lifted else path_conditions,
                out_dir,
                naive=run_naive,
                naive_seconds_per_item=None if lifted or not first else per_item,
                read_back=read_back,
            )
            if run_naive and result.naive_seconds is not None:
                per_item = result.naive_seconds / items
            results.append(result)
            progress(f"usage sync, N={items:,}, {path}: cold {result.cold.wall_seconds:.1f} s")
            write_json(results, balance_results, replica_results, out_dir / "bench.json")
    for customers in sorted(balance_sizes):
        balance_results.append(run_balance_size(customers, conditions, out_dir))
        progress(f"balance job, N={customers:,}: cold {balance_results[-1].cold.wall_seconds:.1f} s")
        write_json(results, balance_results, replica_results, out_dir / "bench.json")
    for items in sorted(replica_sizes):
        if postgres_url is None:
            raise ValueError("replica runs need a PostgreSQL database (postgres_url)")
        for path in meter_events:
            lifted = replace(conditions, meter_events=path).lifted()
            replica_results.append(run_replicas(items, lifted, out_dir, postgres_url, replicas=replicas))
            progress(f"{replicas} replicas, N={items:,}, {path}: cold {replica_results[-1].wall_seconds:.1f} s")
            write_json(results, balance_results, replica_results, out_dir / "bench.json")
    if plot and results:
        write_plot(results, out_dir / "bench.png")
    return results, balance_results, replica_results
