"""The sandbox's commands, `reconciler demo`, `reconciler sandbox` and `reconciler bench`: the product's CLI adds
them when this distribution is installed (the `reconciler.commands` entry point), and only then."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reconciler.cli import EXIT_FAILURES, EXIT_OK, err, out
from reconciler.output import table

commands = typer.Typer()


def register(app: typer.Typer) -> None:
    """Entry point `reconciler.commands`: add this distribution's commands to the product's CLI."""
    app.registered_commands += commands.registered_commands


@commands.command("demo")
def demo() -> None:
    """Start the built-in Stripe and OpenMeter sandbox, sync usage twice, and show what Stripe received."""
    from reconciler_sandbox.demo import run_demo

    raise typer.Exit(run_demo(out))


@commands.command("sandbox")
def sandbox(
    stripe_port: Annotated[int, typer.Option(help="Port for the fake Stripe API.")] = 12111,
    openmeter_port: Annotated[int, typer.Option(help="Port for the fake OpenMeter API.")] = 12112,
    moesif_port: Annotated[int, typer.Option(help="Port for the fake Moesif API.")] = 12113,
) -> None:
    """Serve the seeded Stripe and OpenMeter fakes on loopback until Ctrl-C, to try `reconciler run` locally."""
    import signal
    import threading

    from reconciler.clock import utc_now
    from reconciler_sandbox.seed import seed_sandbox
    from reconciler_sandbox.server import (
        SANDBOX_MOESIF_TOKEN,
        SANDBOX_OPENMETER_TOKEN,
        SANDBOX_STRIPE_KEY,
        Sandbox,
    )

    served = Sandbox.start(stripe_port=stripe_port, openmeter_port=openmeter_port, moesif_port=moesif_port)
    seed_sandbox(served.stripe, served.openmeter, served.moesif, utc_now())
    out.print("Sandbox running. Point config.yaml at it with:", markup=False)
    for name, value in (
        ("STRIPE_API_BASE", served.stripe_server.url),
        ("STRIPE_API_KEY", SANDBOX_STRIPE_KEY),
        ("STRIPE_METER_EVENTS_BASE", served.meter_events_server.url),  # the v2 stream's host: any free port
        ("OPENMETER_URL", served.openmeter_server.url),
        ("OPENMETER_API_TOKEN", SANDBOX_OPENMETER_TOKEN),
        ("MOESIF_URL", served.moesif_server.url),
        ("MOESIF_MANAGEMENT_TOKEN", SANDBOX_MOESIF_TOKEN),
    ):
        out.print(f"  export {name}={value}", markup=False, highlight=False)
    out.file.flush()  # it serves until stopped: whatever reads a pipe must see these now, not at exit
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()


@commands.command("bench")
def bench(
    items: Annotated[
        list[int] | None, typer.Option("--items", help="Metered items to benchmark (repeatable; 0: none).")
    ] = None,
    balance_customers: Annotated[
        list[int] | None,
        typer.Option("--balance-customers", help="Customers for the balance job benchmark (repeatable; 0: none)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where bench.json, bench.png and logs go.")] = Path(
        "bench-results"
    ),
    naive_up_to: Annotated[int, typer.Option(help="Run the naive loop at sizes up to this; extrapolate above.")] = 1000,
    lift_above: Annotated[
        int, typer.Option(help="Sizes above this run with no latency and lifted budgets (memory and CPU).")
    ] = 10_000,
    stripe_latency_ms: Annotated[float, typer.Option(help="Stripe fake's answer latency.")] = 40,
    openmeter_latency_ms: Annotated[float, typer.Option(help="OpenMeter fake's answer latency.")] = 60,
    moesif_latency_ms: Annotated[float, typer.Option(help="Moesif fake's answer latency.")] = 80,
    stripe_global_per_second: Annotated[
        float, typer.Option(help="Stripe's global limit, over every call but live meter events (live mode: 100).")
    ] = 100,
    stripe_endpoint_per_second: Annotated[
        float, typer.Option(help="Stripe's limit per endpoint (method and path template; Stripe's default: 25).")
    ] = 25,
    stripe_meter_events_per_second: Annotated[
        float,
        typer.Option(
            help="Stripe's live-mode limit of POST /v1/billing/meter_events, apart from the global one (1,000); "
            "0: meter events count against the global limit, as in a Stripe sandbox."
        ),
    ] = 1000,
    stripe_concurrency: Annotated[
        int | None, typer.Option(help="The product's stripe.max_concurrency (default: the product's own).")
    ] = None,
    openmeter_per_second: Annotated[float, typer.Option(help="OpenMeter request budget.")] = 50,
    moesif_per_minute: Annotated[float, typer.Option(help="Moesif request budget (its limit: 500).")] = 500,
    meter_events: Annotated[
        list[str] | None,
        typer.Option(
            "--meter-events",
            help="The product's stripe.meter_events paths to run side by side at each size (repeatable; "
            "default: v1 and v2_stream).",
        ),
    ] = None,
    usage_every_hour: Annotated[
        bool,
        typer.Option(
            help="Seed usage in every hour of each customer's period (as an API's customers have), not three events: "
            "OpenMeter's windowed answers then hold a row per customer per hour."
        ),
    ] = False,
    read_back: Annotated[
        bool, typer.Option(help="Time the read-back of every period after the cycles (summaries: 25 a second live).")
    ] = True,
    plot: Annotated[bool, typer.Option(help="Write bench.png (needs matplotlib).")] = True,
    replica_items: Annotated[
        list[int] | None,
        typer.Option(
            "--replica-items",
            help="Metered items for a cold cycle shared by --replicas `reconciler run` replicas on PostgreSQL, no "
            "latency, lifted budgets (repeatable; e.g. 1000000). Needs --postgres-url.",
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas sharing each --replica-items cycle.")] = 2,
    postgres_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL for the replica runs (each in a schema of its own, dropped after), e.g. "
            "postgresql+psycopg://postgres@127.0.0.1:5432/test.",
            envvar="RECONCILER_BENCH_POSTGRES_URL",
        ),
    ] = None,
) -> None:
    """Benchmark a usage sync cycle against the sandbox, with latency and Stripe's limiter structure enforced, side by
    side with the naive sequential loop, then the balance job; prints tables and writes bench.json and bench.png.
    Exits 1 if the product and the naive loop billed differently, a cycle failed, or a run of the product exceeded
    a limiter or was answered 429."""
    from reconciler_sandbox.bench.measure import Conditions
    from reconciler_sandbox.bench.report import (
        balance_limiter_rows,
        balance_rows,
        limiter_rows,
        replica_rows,
        table_rows,
    )
    from reconciler_sandbox.bench.suite import run_benchmark

    paths = meter_events or ["v1", "v2_stream"]
    unknown = sorted(set(paths) - {"v1", "v2_stream"})
    if unknown:
        raise typer.BadParameter(f"{', '.join(unknown)}: not v1 or v2_stream", param_hint="--meter-events")
    replica_sizes = [n for n in (replica_items or []) if n > 0]
    if replica_sizes and not postgres_url:
        raise typer.BadParameter("replica runs need a PostgreSQL database", param_hint="--postgres-url")
    conditions = Conditions(
        stripe_latency=stripe_latency_ms / 1000,
        openmeter_latency=openmeter_latency_ms / 1000,
        stripe_global_per_second=stripe_global_per_second,
        stripe_endpoint_per_second=stripe_endpoint_per_second,
        stripe_meter_events_per_second=stripe_meter_events_per_second or None,
        stripe_concurrency=stripe_concurrency,
        openmeter_per_second=openmeter_per_second,
        moesif_latency=moesif_latency_ms / 1000,
        moesif_per_minute=moesif_per_minute,
        usage_every_hour=usage_every_hour,
    )
    results, balances, replica_results = run_benchmark(
        [n for n in (items or [1000, 10_000, 100_000]) if n > 0],
        conditions,
        out_dir,
        naive_up_to=naive_up_to,
        lift_above=lift_above,
        balance_sizes=[n for n in (balance_customers or [10_000]) if n > 0],
        meter_events=paths,
        read_back=read_back,
        plot=plot,
        replica_sizes=replica_sizes,
        replicas=replicas,
        postgres_url=postgres_url,
        progress=lambda line: err.print(line, markup=False),
    )
    if results:
        _print_rows(f"usage sync ({out_dir / 'bench.json'})", table_rows(results))
        out.print("requests are stripe/openmeter; * naive time extrapolated from the smaller size", markup=False)
        _print_rows("usage sync against the limiters", limiter_rows(results))
    if balances:
        _print_rows("balance job", balance_rows(balances))
        out.print(
            "requests are stripe/moesif; changed: one customer in 100 topped up",
            markup=False,
        )
        _print_rows("balance job against the limiters", balance_limiter_rows(balances))
    if replica_results:
        _print_rows("usage sync shared by replicas on PostgreSQL", replica_rows(replica_results))
        out.print(
            "wrong totals: customers billed other than what OpenMeter holds; left pending: intents Stripe accepted "
            "that the ledger does not record as sent; unfinished: planned items no replica completed",
            markup=False,
        )
    out.print(
        "floor: the least time the limiters and the latency allow the run's requests; binding: the limiter or "
        "latency term that sets it; most in one window: the most requests any window of the limiter's length held",
        markup=False,
    )
    cycles = [c for r in results for c in (r.cold, r.warm)] + [c for r in balances for c in (r.cold, r.warm, r.changed)]
    # The product must keep within every limiter (the naive loop is only reported).
    over = [c for c in [*cycles, *(r.readback for r in results if r.readback)] if not c.limits.within_limits]
    if over:
        err.print("a run exceeded a limiter or was answered 429: see the tables and bench.json", markup=False)
    failed = (
        [r for r in results if r.naive_agrees is False]
        or [c for c in cycles if c.exit_code]
        or over
        or [r for r in replica_results if not r.ok]
    )
    raise typer.Exit(EXIT_FAILURES if failed else EXIT_OK)


def _print_rows(title: str, rows: list[dict[str, str]]) -> None:
    printed = table(title, *rows[0])
    for row in rows:
        printed.add_row(*(str(v) for v in row.values()))
    out.print(printed)
