"""The whole benchmark: each size in turn, the naive loop measured at the small sizes and extrapolated above."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reconciler.bench.measure import Conditions, SizeResult, run_size
from reconciler.bench.report import write_json, write_plot


def run_benchmark(
    sizes: list[int],
    conditions: Conditions,
    out_dir: Path,
    *,
    naive_up_to: int,
    lift_above: int,
    plot: bool = True,
    progress: Callable[[SizeResult], None] = lambda _: None,
) -> list[SizeResult]:
    """Benchmark every size; sizes above `lift_above` run under `conditions.lifted()`. Writes bench.json (and
    bench.png) to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[SizeResult] = []
    per_item: float | None = None
    for items in sorted(sizes):
        run_naive = items <= naive_up_to
        lifted = items > lift_above
        result = run_size(
            items,
            conditions.lifted() if lifted else conditions,
            out_dir,
            naive=run_naive,
            naive_seconds_per_item=None if lifted else per_item,
        )
        if run_naive and result.naive_seconds is not None:
            per_item = result.naive_seconds / items
        results.append(result)
        progress(result)
        write_json(results, out_dir / "bench.json")
    if plot:
        write_plot(results, out_dir / "bench.png")
    return results
