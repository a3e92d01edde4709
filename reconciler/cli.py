"""The `reconciler` command line. Exit codes: 0 all good, 1 some items failed, 2 configuration/setup error (bad
config, database unreachable or not migrated, port in use: one line on stderr, see `main`), 3 uncorrected balance
drift (with `reconcile-balances --fail-on-drift`)."""

from __future__ import annotations

import getpass
import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Column

from reconciler.config import Config, ConfigError, load_config
from reconciler.errors import SetupError, one_line
from reconciler.ledger.database import check_reachable, make_engine, upgrade
from reconciler.logs import configure_logging
from reconciler.output import emit, result_console, table
from reconciler.usage.job import CycleResult

if TYPE_CHECKING:  # the app pulls in every SDK: imported only by the commands that run jobs
    from sqlalchemy import Engine

    from reconciler.app import App

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG, EXIT_DRIFT = 0, 1, 2, 3


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    html = "html"


app = typer.Typer(
    name="reconciler",
    help="Keep usage-based billing honest: OpenMeter usage reported to Stripe with set semantics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
balances_app = typer.Typer(help="Balance transactions only a person can settle.", no_args_is_help=True)
app.add_typer(balances_app, name="balances")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.yaml to use (default: $RECONCILER_CONFIG, else ./config.yaml)"),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; send and write nothing.")]
CustomerOption = Annotated[list[str] | None, typer.Option("--customer", help="Only this Stripe customer (repeatable).")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table, json, csv or html.")]
OutputOption = Annotated[Path | None, typer.Option("--output", help="Write the result to this file.")]
out = result_console()
err = Console(stderr=True, soft_wrap=True)
# logging.level of the loaded config: at DEBUG an operational error comes with its traceback (see `main`).
_debug = False


@app.callback()
def _main(ctx: typer.Context, config: ConfigOption = None) -> None:
    ctx.obj = {"config": config}


def _load(ctx: typer.Context, config: Path | None) -> Config:
    """The command's `--config`, else the one given before the command, else the environment/default."""
    path = config or (ctx.obj or {}).get("config")
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    configure_logging(loaded.logging.level, loaded.logging.format, loaded.secret_values())
    global _debug
    _debug = loaded.logging.level == "DEBUG"
    return loaded


def _build(loaded: Config) -> App:
    """The wired application (a database that is unreachable or not migrated: SetupError, see `main`)."""
    from reconciler.app import build_app

    return build_app(loaded)


@contextmanager
def _ledger(loaded: Config) -> Iterator[Engine]:
    """The migrated ledger's engine, disposed of afterwards."""
    from reconciler.app import open_database

    engine = open_database(loaded)
    try:
        yield engine
    finally:
        engine.dispose()


def _setup_error(message: str) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(EXIT_CONFIG)


@app.command("check-config")
def check_config(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Validate the config and print the effective values, secrets masked."""
    import yaml

    loaded = _load(ctx, config)
    out.print(yaml.safe_dump(loaded.masked(), sort_keys=False).rstrip(), markup=False, highlight=False)
    for warning in loaded.warnings():
        err.print(f"warning: {warning}", markup=False, highlight=False)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Create or migrate the ledger tables."""
    loaded = _load(ctx, config)
    engine = make_engine(loaded.database.url)
    try:
        check_reachable(engine)
        before, after = upgrade(engine)
    finally:
        engine.dispose()
    if before == after:
        out.print(f"database already at revision {after}")
    else:
        out.print(f"database upgraded from {before or 'empty'} to revision {after}")


@app.command("sync-usage")
def sync_usage(
    ctx: typer.Context,
    dry_run: DryRunOption = False,
    customer: CustomerOption = None,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    fail_on_unmapped: Annotated[
        bool, typer.Option("--fail-on-unmapped", help="Exit 1 when a metered item has no entry in usage.meters.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Run one usage sync cycle now and print a summary."""
    loaded = _load(ctx, config)
    application = _build(loaded)
    try:
        result = application.usage_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()))
    finally:
        application.close()

    def as_table(console: Console) -> None:
        if dry_run:
            print_plan(result, console)
        print_summary(result, console)

    rows = [
        {
            "customer": p.work.stream.customer_id,
            "stripe_target": p.work.stream.stripe_target,
            "period_start": p.work.period.start.isoformat(),
            "period_end": p.work.period.end.isoformat(),
            "reported": p.reported_total,
            "measured": p.decision.target,
            "action": p.decision.action.value,
            "quantity": p.decision.quantity,
        }
        for p in result.plan
    ] or [{**result.summary.as_dict(), "failures": "; ".join(result.summary.failures)}]
    payload = {
        "run_id": result.run_id,
        "dry_run": dry_run,
        "summary": result.summary.as_dict(),
        "failures": result.summary.failures,
        "plan": rows if result.plan else [],
    }
    emit(
        output_format,
        output,
        out,
        title="usage sync",
        rows=rows,
        as_json=lambda: json.dumps(payload, indent=2),
        as_table=as_table,
    )
    unmapped = fail_on_unmapped and result.summary.unmapped > 0
    raise typer.Exit(EXIT_OK if result.ok and not unmapped else EXIT_FAILURES)


@app.command("reconcile-balances")
def reconcile_balances(
    ctx: typer.Context,
    dry_run: DryRunOption = False,
    customer: CustomerOption = None,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    fail_on_drift: Annotated[
        bool, typer.Option("--fail-on-drift", help="Exit 3 when uncorrected drift remains.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Forward top-ups and refunds to Moesif, compare balances, correct drift (one cycle)."""
    from reconciler.balances.report import render_json, render_table

    loaded = _load(ctx, config)
    if not loaded.balances.enabled:
        raise _setup_error("balances.enabled is false: set it (and the moesif section) to reconcile balances")
    application = _build(loaded)
    assert application.balance_sync is not None
    try:
        result = application.balance_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()))
    finally:
        application.close()
    emit(
        output_format,
        output,
        out,
        title="balance reconcile",
        rows=[c.as_dict() for c in result.customers],
        as_json=lambda: render_json(result),
        as_table=lambda console: render_table(result, console),
    )
    if result.failed:
        raise typer.Exit(EXIT_FAILURES)
    if fail_on_drift and (result.uncorrected_drift or result.held):
        raise typer.Exit(EXIT_DRIFT)
    if result.held:  # money a person must place: as loud as a failure
        raise typer.Exit(EXIT_FAILURES)
    raise typer.Exit(EXIT_OK)


@balances_app.command("resolve")
def balances_resolve(
    ctx: typer.Context,
    transaction_id: Annotated[str, typer.Argument(help="The Moesif transaction_id (pi_…, re_…, reconciler-drift-…).")],
    applied: Annotated[
        bool | None,
        typer.Option(
            "--applied/--not-applied",
            help="Moesif has it (close it) / Moesif does not have it (resend it once, same transaction_id).",
        ),
    ] = None,
    note: Annotated[str | None, typer.Option("--note", help="Why, for the audit trail.")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who decided (default: the login name).")] = None,
    config: ConfigOption = None,
) -> None:
    """Settle a Moesif transaction the balance job cannot: outcome unknown, held, marked, or an unsettled
    correction. Exit 0 done, 1 a balance cycle is running (try again) or the resend failed, 2 refused."""
    from reconciler.balances.resolve import Resolver, ResolveRefusedError
    from reconciler.clock import utc_now
    from reconciler.ledger.balance_lock import BalanceJobBusyError
    from reconciler.upstream.moesif_api import MoesifGateway

    loaded = _load(ctx, config)
    if applied is None:
        raise _setup_error("say what Moesif shows: --applied or --not-applied")
    if loaded.moesif is None:
        raise _setup_error("no moesif section in the config: nothing to resolve against")
    moesif_config = loaded.moesif
    with _ledger(loaded) as engine:
        resolver = Resolver(loaded, engine, utc_now)
        try:
            stored = resolver.find(transaction_id)
            out.print(resolver.latest_comparison(stored.planned.account.customer_id), markup=False, highlight=False)
            resolved = resolver.resolve(
                transaction_id,
                applied=applied,
                by=by or _login_name(),
                note=note,
                moesif=lambda: MoesifGateway(moesif_config),
            )
        except ResolveRefusedError as exc:
            raise _setup_error(f"refused: {exc}") from None
        except BalanceJobBusyError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(EXIT_FAILURES) from None
    out.print(f"{resolved.transaction_id}: {resolved.action.replace('_', ' ')} (was {resolved.was})", markup=False)
    if resolved.resend:
        out.print(f"{resolved.transaction_id}: {resolved.resend}", markup=False, highlight=False)
    raise typer.Exit(EXIT_FAILURES if resolved.resend_failed else EXIT_OK)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no $USER/$LOGNAME and no passwd entry (a bare container)
        return "unknown"


@app.command("sync-plans")
def sync_plans(
    ctx: typer.Context,
    dry_run: DryRunOption = False,
    customer: CustomerOption = None,
    full: Annotated[bool, typer.Option("--full", help="Re-send every user's state (for an app that lost it).")] = False,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Send the app each user's plan and status as Stripe has them: only the changes, unless --full."""
    loaded = _load(ctx, config)
    if not loaded.plans.enabled:
        raise _setup_error("plans.enabled is false: set it (with plans.sync_url and plans.price_to_plan)")
    application = _build(loaded)
    assert application.plan_sync is not None
    try:
        result = application.plan_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()), full=full)
    finally:
        application.close()

    def as_table(console: Console) -> None:
        title = "plan sync" + (" (dry run: nothing sent or written)" if dry_run else f" run {result.run_id}")
        lines = table(title, "customer", "user", "plan", "status", "action", "reason")
        for line in result.lines:
            lines.add_row(
                line.customer_id, line.user_id or "", line.plan or "", line.status or "", line.action, line.reason
            )
        console.print(lines)
        console.print(", ".join(f"{k} {v}" for k, v in result.summary().items()) or "nothing to do", markup=False)

    rows = [asdict(line) for line in result.lines]
    payload = {"run_id": result.run_id, "dry_run": dry_run, "summary": result.summary(), "customers": rows}
    emit(
        output_format,
        output,
        out,
        title="plan sync",
        rows=rows,
        as_json=lambda: json.dumps(payload, indent=2),
        as_table=as_table,
    )
    raise typer.Exit(EXIT_FAILURES if result.failed else EXIT_OK)


@app.command("backfill")
def backfill(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--from", help="Start of the range (YYYY-MM-DD or ISO 8601).")],
    until: Annotated[str, typer.Option("--to", help="End of the range, exclusive.")],
    customer: CustomerOption = None,
    meter: Annotated[list[str] | None, typer.Option("--meter", help="Only this meter event_name / price.")] = None,
    dry_run: DryRunOption = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before sending many reports.")] = False,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-drive past periods: report what Stripe can still bill, list what is out of reach (exit 3)."""
    import structlog
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from reconciler.clock import utc_now
    from reconciler.ledger.runs import RunLog
    from reconciler.usage.backfill import Backfill, Checkpoints, command_key

    loaded = _load(ctx, config)
    window = (_parse_date(since, "--from"), _parse_date(until, "--to"))
    customers, meters = frozenset(customer or ()), frozenset(meter or ())
    application = _build(loaded)
    log = structlog.get_logger("reconciler.backfill")
    try:
        runner = Backfill(
            application.usage_sync, Checkpoints(application.engine, utc_now), RunLog(application.engine, utc_now)
        )
        units = runner.plan(*window, customers, meters)
        key = command_key(*window, customers, meters)
        if not dry_run and not yes:
            planned = runner.run(units, key, dry_run=True).count("would_report")
            if planned > loaded.backfill.confirm_above:
                question = f"This backfill would send {planned} reports to Stripe. Continue?"
                if not sys.stdin.isatty():
                    raise _setup_error(f"{planned} reports exceed backfill.confirm_above; rerun with --yes")
                if not typer.confirm(question):
                    raise typer.Exit(EXIT_OK)
        if sys.stdout.isatty():
            with Progress(
                *Progress.get_default_columns()[:1],
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=out,
            ) as bar:
                task = bar.add_task("backfill", total=len(units))
                result = runner.run(
                    units, key, dry_run=dry_run, progress=lambda done, total: bar.update(task, completed=done)
                )
        else:

            def log_progress(done: int, total: int) -> None:
                if done == total or done % 25 == 0:
                    log.info("backfill progress", done=done, total=total)

            result = runner.run(units, key, dry_run=dry_run, progress=log_progress)
    finally:
        application.close()
    if result.resumed_from:
        err.print(
            f"resumed backfill run: {result.resumed_from} of {len(units)} periods were already done", markup=False
        )

    def as_table(console: Console) -> None:
        periods = table(
            "backfill" + (" (dry run: nothing sent or written)" if dry_run else ""),
            *("customer", "meter / price", "period", "ledger", "measured", "action", "quantity", "amount"),
        )
        for line in result.lines:
            periods.add_row(
                line.customer,
                line.stripe_target,
                f"{line.period_start[:10]} → {line.period_end[:10]}",
                str(line.ledger_total),
                str(line.measured),
                line.action,
                "" if line.quantity is None else str(line.quantity),
                line.amount or "",
            )
        console.print(periods)
        for line in result.lines:
            if line.action == "out_of_reach":
                console.print(
                    f"out of reach: {line.customer} {line.stripe_target} {line.period_start[:10]}: "
                    f"{line.quantity} units ({line.amount or 'amount not estimated'}): {line.reason}",
                    markup=False,
                )

    emit(
        output_format,
        output,
        out,
        title="backfill",
        rows=[asdict(line) for line in result.lines],
        as_json=result.as_json,
        as_table=as_table,
    )
    if result.count("failed"):
        raise typer.Exit(EXIT_FAILURES)
    raise typer.Exit(EXIT_DRIFT if result.count("out_of_reach") else EXIT_OK)


def _parse_date(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _setup_error(f"{option}: {value!r} is not a date (YYYY-MM-DD or an ISO 8601 time)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("verify")
def verify(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--from", help="Periods ending after this date (default: lookback).")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="Periods starting before this date (default: now).")] = None,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Read Stripe's own totals back and compare them with the ledger and OpenMeter (exit 3: a person must act)."""
    from reconciler.clock import utc_now
    from reconciler.upstream.openmeter_api import OpenMeterGateway
    from reconciler.upstream.stripe_api import StripeGateway
    from reconciler.verify import NEEDS_A_PERSON, Verifier, render_json

    loaded = _load(ctx, config)
    window = (_parse_date(since, "--from"), _parse_date(until, "--to"))
    with (
        _ledger(loaded) as engine,
        closing(StripeGateway(loaded.stripe)) as stripe,
        closing(OpenMeterGateway(loaded.openmeter)) as openmeter,
    ):
        lines = Verifier(loaded, engine, stripe, openmeter, utc_now).run(*window)

    def as_table(console: Console) -> None:
        findings = table(
            "verify: Stripe's view against the ledger and OpenMeter",
            *("customer", "meter / price", "period start", "status", "measured", "reported", "Stripe"),
            *("finding", "note"),
        )
        for line in lines:
            findings.add_row(
                line.customer,
                line.stripe_target,
                line.period_start[:16],
                line.ledger_status,
                "" if line.measured is None else str(line.measured),
                str(line.reported),
                line.stripe or "",
                line.finding,
                line.note,
            )
        console.print(findings)

    emit(
        output_format,
        output,
        out,
        title="verify",
        rows=[asdict(line) for line in lines],
        as_json=lambda: render_json(lines),
        as_table=as_table,
    )
    raise typer.Exit(EXIT_DRIFT if any(line.finding in NEEDS_A_PERSON for line in lines) else EXIT_OK)


@app.command("read-back")
def read_back(
    ctx: typer.Context,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Read Stripe's summaries back for the periods due (what `run` does on schedule.readback), resend what
    Stripe's error reports explain, and show what needs a person (exit 3)."""
    loaded = _load(ctx, config)
    application = _build(loaded)
    try:
        result = application.read_back.run_cycle()
        if result.resent_customers:
            application.usage_sync.run_cycle(customers=result.resent_customers, include_legacy=False)
    finally:
        application.close()

    def as_table(console: Console) -> None:
        findings = table(
            f"read-back: {result.checked} read, {result.not_yet} not yet settled in Stripe",
            *("customer", "meter / price", "period start", "reported", "Stripe", "finding", "note"),
        )
        for line in result.lines:
            findings.add_row(
                line.customer,
                line.stripe_target,
                line.period_start[:16],
                str(line.reported),
                line.stripe or "",
                line.finding,
                line.note,
            )
        console.print(findings)
        for failure in result.failures:
            console.print(f"failed: {failure}", markup=False, highlight=False)

    payload = {
        "run_id": result.run_id,
        "summary": result.as_dict(),
        "failures": result.failures,
        "periods": [asdict(line) for line in result.lines],
    }
    emit(
        output_format,
        output,
        out,
        title="read-back",
        rows=[asdict(line) for line in result.lines],
        as_json=lambda: json.dumps(payload, indent=2),
        as_table=as_table,
    )
    exit_code = EXIT_DRIFT if result.needs_a_person else EXIT_FAILURES if result.failures else EXIT_OK
    raise typer.Exit(exit_code)


@app.command("report")
def report(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--from", help="Start (default: usage.lookback ago).")] = None,
    until: Annotated[str | None, typer.Option("--to", help="End, exclusive (default: now).")] = None,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    audit: Annotated[bool, typer.Option("--audit", help="CSV: the audit trail instead of the periods.")] = False,
    fail_on_drift: Annotated[
        bool,
        typer.Option("--fail-on-drift", help="Exit 3 when anything needs a person (see `status`), e.g. late drift."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Measured, reported and corrected per customer and period, balance drift, and every write we made."""
    from reconciler.clock import utc_now
    from reconciler.report import build_report, render_json, render_rows
    from reconciler.report_html import render_html

    loaded = _load(ctx, config)
    now = utc_now()
    window = (_parse_date(since, "--from") or now - loaded.usage.lookback, _parse_date(until, "--to") or now)
    with _ledger(loaded) as engine:
        built = build_report(engine, *window)

    def as_table(console: Console) -> None:
        periods = table(
            f"report {window[0]:%Y-%m-%d} → {window[1]:%Y-%m-%d}",
            *("customer", "meter / price", "period start", "status", "measured", "reported", "difference"),
        )
        for p in built.periods:
            periods.add_row(
                p.customer,
                p.stripe_target,
                p.period_start[:10],
                p.status,
                str(p.measured),
                str(p.reported),
                f"{p.difference:+}",
            )
        console.print(periods)
        console.print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in built.totals.items()), markup=False)
        if built.unbilled:
            unbilled = table(
                "metered items nobody bills",
                *("customer", "item", "meter / price", "why", "measured", "at risk", "reason"),
            )
            for u in built.unbilled:
                at_risk = f"{u.at_risk} {u.currency}" if u.at_risk is not None else "unknown"
                measured = "unknown" if u.measured is None else str(u.measured)
                unbilled.add_row(u.customer, u.item, u.stripe_target, u.why, measured, at_risk, u.reason)
            console.print(unbilled)
        if built.attention:
            needs = table("needs a person", "job", "reason", "customer", "item", "since", "detail")
            for i in built.attention:
                needs.add_row(i.job, i.reason, i.customer or "", i.key, f"{i.since:%Y-%m-%d %H:%M:%S}", i.detail)
            console.print(needs)

    if output_format is OutputFormat.html:  # the full report page, with its charts
        page = render_html(built)
        if output:
            output.write_text(page, encoding="utf-8")
        else:
            typer.echo(page)
    else:
        emit(
            output_format,
            output,
            out,
            title="report",
            rows=render_rows(built, audit=audit),
            as_json=lambda: render_json(built),
            as_table=as_table,
        )
    raise typer.Exit(EXIT_DRIFT if fail_on_drift and built.needs_a_person else EXIT_OK)


@app.command("doctor")
def doctor(
    ctx: typer.Context,
    config: ConfigOption = None,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    max_items: Annotated[
        int, typer.Option("--max-items", min=1, help="Metered items to read for unmapped prices and a Moesif sample.")
    ] = 10_000,
) -> None:
    """Check the database and the configured accounts before the first real cycle; reads only. Exit 0: ready
    (warnings allowed), 1: something failed."""
    from reconciler.doctor import diagnose

    diagnosis = diagnose(_load(ctx, config), max_items=max_items)
    emit(
        output_format,
        output,
        out,
        title="reconciler doctor",
        rows=[asdict(c) for c in diagnosis.checks],
        as_json=diagnosis.render_json,
        as_table=lambda console: console.print(diagnosis.render_lines(), markup=False, highlight=False),
    )
    raise typer.Exit(EXIT_OK if diagnosis.healthy else EXIT_FAILURES)


@app.command("run")
def run(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run the scheduler and the operations server until SIGTERM/SIGINT (the service's main process)."""
    from reconciler.config import resolve_config_path
    from reconciler.daemon import run_daemon

    loaded = _load(ctx, config)
    path = resolve_config_path(config or (ctx.obj or {}).get("config"))
    raise typer.Exit(run_daemon(loaded, path))


@app.command("healthcheck")
def healthcheck(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Exit 0 if the local `reconciler run` answers /healthz on its operations listener (the container's
    HEALTHCHECK)."""
    import httpx

    loaded = _load(ctx, config)
    host = loaded.server.ops_host
    # Not a bind: the probe reaches a server listening on all interfaces through loopback.
    if host in ("0.0.0.0", "::", ""):  # nosec B104
        host = "127.0.0.1"
    try:
        response = httpx.get(f"http://{host}:{loaded.server.ops_port}/healthz", timeout=5)
    except httpx.HTTPError as exc:
        err.print(f"unhealthy: {type(exc).__name__}", markup=False)
        raise typer.Exit(EXIT_FAILURES) from None
    if response.status_code != 200:
        err.print(f"unhealthy: HTTP {response.status_code} {response.text}", markup=False)
        raise typer.Exit(EXIT_FAILURES)
    out.print("healthy")


@app.command("status")
def status(
    ctx: typer.Context,
    output_format: FormatOption = OutputFormat.table,
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Jobs with their last and next runs, pending and failed items, from the ledger."""
    from reconciler.clock import utc_now
    from reconciler.status import read_status, render_json, render_table

    loaded = _load(ctx, config)
    with _ledger(loaded) as engine:
        current = read_status(loaded, engine, utc_now())
    emit(
        output_format,
        output,
        out,
        title="status",
        rows=[job.row() for job in current.jobs],
        as_json=lambda: render_json(current),
        as_table=lambda console: render_table(current, console),
    )


def print_summary(result: CycleResult, console: Console) -> None:
    summary = result.summary
    counts = table(
        "usage sync" + (" (dry run)" if result.run_id is None else f" run {result.run_id}"),
        *(
            Column(name, justify="right")
            for name in ("seen", "reported", "unchanged", "unmapped", "failed", "finalized", "late drift")
        ),
    )
    counts.add_row(*(str(v) for v in summary.as_dict().values()))
    console.print(counts)
    for failure in summary.failures:
        console.print(f"failed: {failure}", markup=False, highlight=False)
    if result.interrupted:
        console.print("interrupted: stopped before every item was synced", markup=False)


def print_plan(result: CycleResult, console: Console) -> None:
    plan = table(
        "dry run: what would be sent",
        *("customer", "meter / price", "period", "reported", "measured", "action", "send"),
    )
    for planned in result.plan:
        work, decision = planned.work, planned.decision
        send = "" if decision.quantity is None else f"{decision.quantity} @ {decision.timestamp:%Y-%m-%d %H:%M:%S}"
        plan.add_row(
            work.stream.customer_id,
            work.stream.stripe_target,
            f"{work.period.start:%Y-%m-%d %H:%M} → {work.period.end:%Y-%m-%d %H:%M}",
            str(planned.reported_total),
            str(decision.target),
            decision.action.value + (" (final)" if decision.final else ""),
            send,
        )
    console.print(plan)


def _add_installed_commands() -> None:
    """Commands other installed distributions offer (the sandbox's `demo`, `sandbox` and `bench`): absent from a
    production install, which has none."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group="reconciler.commands"):
        entry_point.load()(app)


def operational_problem(exc: BaseException) -> str | None:
    """The one line for an error of the environment, None for anything else (a bug keeps its traceback)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, SetupError):
        return str(exc)
    if isinstance(exc, OperationalError | InterfaceError):
        # The database went away mid-command (it was reached when the command started).
        return f"database error: {one_line(exc.orig)}"
    return None


def main() -> None:
    """The one place operational errors become exit 2 and one line on stderr (with the traceback only at
    logging.level DEBUG), whichever command raised them."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        problem = operational_problem(exc)
        if problem is None:
            raise
        if _debug:
            traceback.print_exc()
        err.print(f"error: {problem}", markup=False, highlight=False)
        sys.exit(EXIT_CONFIG)


_add_installed_commands()
