"""The `reconciler` command line: a command parses its options (`reconciler.cli_options`), calls one application
service and shows the `View` its result's module makes. Exit codes: 0 all good, 1 some items failed, 2 configuration/
setup error (one line on stderr, see `main`), 3 something a person must act on (e.g. `--fail-on-drift`)."""

from __future__ import annotations

import sys
import traceback
from functools import partial
from pathlib import Path

import typer
from rich.console import Console

from reconciler import cli_options as opt
from reconciler.config import Config, ConfigError, load_config
from reconciler.errors import RefusedError, SetupError, one_line
from reconciler.logs import configure_logging
from reconciler.output import result_console, show

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG, EXIT_DRIFT = 0, 1, 2, 3
TABLE = opt.OutputFormat.table

HELP = "Keep usage-based billing honest: OpenMeter usage reported to Stripe with set semantics."
app = typer.Typer(
    name="reconciler", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
app.add_typer(db_app := typer.Typer(help="Database schema management.", no_args_is_help=True), name="db")
balances_app = typer.Typer(help="Balance transactions only a person can settle.", no_args_is_help=True)
app.add_typer(balances_app, name="balances")
out = result_console()
err = Console(stderr=True, soft_wrap=True)
_given: dict[str, Path | None] = {}
_debug = False  # the loaded config's logging.level is DEBUG: an operational error comes with its traceback


@app.callback()
def _main(config: opt.ConfigOption = None) -> None:
    _given["config"] = config  # `reconciler --config FILE <command>`


def _config_path(config: Path | None) -> Path | None:
    """The command's `--config`, else the one given before the command (else None: the environment/default)."""
    return config or _given.get("config")


def _load(config: Path | None) -> Config:
    """The config to use, with logging configured from it (one that cannot be used: ConfigError, see `main`)."""
    loaded = load_config(_config_path(config))
    configure_logging(loaded.logging.level, loaded.logging.format, loaded.secret_values())
    global _debug
    _debug = loaded.logging.level == "DEBUG"
    return loaded


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise SetupError(problem)


@app.command("check-config")
def check_config(config: opt.ConfigOption = None) -> None:
    """Validate the config and print the effective values, secrets masked."""
    import yaml

    loaded = _load(config)
    out.print(yaml.safe_dump(loaded.masked(), sort_keys=False).rstrip(), markup=False, highlight=False)
    for warning in loaded.warnings():
        err.print(f"warning: {warning}", markup=False, highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: opt.ConfigOption = None) -> None:
    """Create or migrate the ledger tables."""
    from reconciler.ledger.database import upgrade_database

    before, after = upgrade_database(_load(config).database.url)
    done = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    out.print(f"database {done} revision {after}")


@app.command("sync-usage")
def sync_usage(
    dry_run: opt.DryRunOption = False,
    customer: opt.CustomerOption = None,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    fail_on_unmapped: opt.FailOnUnmapped = False,
    config: opt.ConfigOption = None,
) -> None:
    """Run one usage sync cycle now and print a summary."""
    from reconciler.app import opened_app
    from reconciler.usage.render import cycle_view

    with opened_app(_load(config)) as application:
        result = application.usage_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()))
    show(cycle_view(result, dry_run), output_format, output, out)
    unmapped = fail_on_unmapped and result.summary.unmapped > 0
    raise typer.Exit(EXIT_OK if result.ok and not unmapped else EXIT_FAILURES)


@app.command("reconcile-balances")
def reconcile_balances(
    dry_run: opt.DryRunOption = False,
    customer: opt.CustomerOption = None,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    fail_on_drift: opt.FailOnDrift = False,
    config: opt.ConfigOption = None,
) -> None:
    """Forward top-ups and refunds to Moesif, compare balances, correct drift (one cycle)."""
    from reconciler.app import opened_app
    from reconciler.balances.render import exit_code, view

    loaded = _load(config)
    _require(
        loaded.balances.enabled, "balances.enabled is false: set it (and the moesif section) to reconcile balances"
    )
    with opened_app(loaded) as application:
        assert application.balance_sync is not None
        result = application.balance_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()))
    show(view(result), output_format, output, out)
    raise typer.Exit(exit_code(result, fail_on_drift=fail_on_drift))


@balances_app.command("resolve")
def balances_resolve(
    transaction_id: opt.TransactionId,
    applied: opt.Applied = None,
    note: opt.Note = None,
    by: opt.By = None,
    config: opt.ConfigOption = None,
) -> None:
    """Settle a Moesif transaction the balance job cannot: outcome unknown, held, marked, or an unsettled
    correction. Exit 0 done, 1 a balance cycle is running (try again) or the resend failed, 2 refused."""
    from reconciler.balances.resolve import resolve_transaction

    loaded = _load(config)
    _require(applied is not None, "say what Moesif shows: --applied or --not-applied")
    say = partial(out.print, markup=False, highlight=False)
    resolved = resolve_transaction(loaded, transaction_id, applied=bool(applied), by=by, note=note, tell=say)
    say("\n".join(resolved.lines()))
    raise typer.Exit(EXIT_FAILURES if resolved.resend_failed else EXIT_OK)


@app.command("sync-plans")
def sync_plans(
    dry_run: opt.DryRunOption = False,
    customer: opt.CustomerOption = None,
    full: opt.Full = False,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    config: opt.ConfigOption = None,
) -> None:
    """Send the app each user's plan and status as Stripe has them: only the changes, unless --full."""
    from reconciler.app import opened_app
    from reconciler.plans.render import view

    loaded = _load(config)
    _require(loaded.plans.enabled, "plans.enabled is false: set it (with plans.sync_url and plans.price_to_plan)")
    with opened_app(loaded) as application:
        assert application.plan_sync is not None
        result = application.plan_sync.run_cycle(dry_run=dry_run, customers=frozenset(customer or ()), full=full)
    show(view(result, dry_run), output_format, output, out)
    raise typer.Exit(EXIT_FAILURES if result.failed else EXIT_OK)


@app.command("backfill")
def backfill(
    since: opt.BackfillFrom,
    until: opt.BackfillTo,
    customer: opt.CustomerOption = None,
    meter: opt.Meter = None,
    dry_run: opt.DryRunOption = False,
    yes: opt.Yes = False,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    config: opt.ConfigOption = None,
) -> None:
    """Re-drive past periods: report what Stripe can still bill, list what is out of reach (exit 3)."""
    from reconciler.app import open_backfill, opened_app
    from reconciler.usage.backfill import command_key
    from reconciler.usage.render import backfill_progress, backfill_view

    loaded = _load(config)
    customers, meters = frozenset(customer or ()), frozenset(meter or ())
    with opened_app(loaded) as application:
        runner = open_backfill(application)
        units, key = runner.plan(since, until, customers, meters), command_key(since, until, customers, meters)
        if not dry_run and not yes:
            _confirm(runner.reports_planned(units, key), loaded.backfill.confirm_above)
        with backfill_progress(out, len(units)) as progress:
            result = runner.run(units, key, dry_run=dry_run, progress=progress)
    if result.resumed_from:
        err.print(
            f"resumed backfill run: {result.resumed_from} of {len(units)} periods were already done", markup=False
        )
    show(backfill_view(result, dry_run), output_format, output, out)
    raise typer.Exit(EXIT_FAILURES if result.failures else EXIT_DRIFT if result.attention else EXIT_OK)


def _confirm(planned: int, confirm_above: int) -> None:
    """Ask before sending more reports than backfill.confirm_above (without a terminal to ask on: refuse)."""
    if planned > confirm_above:
        _require(sys.stdin.isatty(), f"{planned} reports exceed backfill.confirm_above; rerun with --yes")
        if not typer.confirm(f"This backfill would send {planned} reports to Stripe. Continue?"):
            raise typer.Exit(EXIT_OK)


@app.command("verify")
def verify(
    since: opt.VerifyFrom = None,
    until: opt.VerifyTo = None,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    config: opt.ConfigOption = None,
) -> None:
    """Read Stripe's own totals back and compare them with the ledger and OpenMeter (exit 3: a person must act)."""
    from reconciler.verify import NEEDS_A_PERSON, verify
    from reconciler.verify_render import view

    lines = verify(_load(config), since, until)
    show(view(lines), output_format, output, out)
    raise typer.Exit(EXIT_DRIFT if any(line.finding in NEEDS_A_PERSON for line in lines) else EXIT_OK)


@app.command("read-back")
def read_back(
    output_format: opt.FormatOption = TABLE, output: opt.OutputOption = None, config: opt.ConfigOption = None
) -> None:
    """Read Stripe's summaries back for the periods due (what `run` does on schedule.readback), resend what
    Stripe's error reports explain, and show what needs a person (exit 3)."""
    from reconciler.app import opened_app
    from reconciler.usage.render import readback_view

    with opened_app(_load(config)) as application:
        result = application.read_back_and_resend()
    show(readback_view(result), output_format, output, out)
    raise typer.Exit(EXIT_DRIFT if result.needs_a_person else EXIT_FAILURES if result.failures else EXIT_OK)


@app.command("report")
def report(
    since: opt.ReportFrom = None,
    until: opt.ReportTo = None,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    audit: opt.Audit = False,
    fail_on_drift: opt.ReportFailOnDrift = False,
    config: opt.ConfigOption = None,
) -> None:
    """Measured, reported and corrected per customer and period, balance drift, and every write we made."""
    from reconciler.report import report_for
    from reconciler.report_render import view

    built, since, until = report_for(_load(config), since, until)
    show(view(built, since, until, audit=audit), output_format, output, out)
    raise typer.Exit(EXIT_DRIFT if fail_on_drift and built.needs_a_person else EXIT_OK)


@app.command("doctor")
def doctor(
    config: opt.ConfigOption = None,
    output_format: opt.FormatOption = TABLE,
    output: opt.OutputOption = None,
    max_items: opt.MaxItems = 10_000,
) -> None:
    """Check the database and the configured accounts before the first real cycle; reads only. Exit 0: ready
    (warnings allowed), 1: something failed."""
    from reconciler.doctor import diagnose

    diagnosis = diagnose(_load(config), max_items=max_items)
    show(diagnosis.view(), output_format, output, out)
    raise typer.Exit(EXIT_OK if diagnosis.healthy else EXIT_FAILURES)


@app.command("run")
def run(config: opt.ConfigOption = None) -> None:
    """Run the scheduler and the operations server until SIGTERM/SIGINT (the service's main process)."""
    from reconciler.config import resolve_config_path
    from reconciler.daemon import run_daemon

    loaded = _load(config)
    raise typer.Exit(run_daemon(loaded, resolve_config_path(_config_path(config))))


@app.command("healthcheck")
def healthcheck(config: opt.ConfigOption = None) -> None:
    """Exit 0 if the local `reconciler run` answers /healthz on its operations listener (the container's
    HEALTHCHECK)."""
    from reconciler.service.healthcheck import health_problem

    problem = health_problem(_load(config).server)
    if problem:
        err.print(f"unhealthy: {problem}", markup=False)
        raise typer.Exit(EXIT_FAILURES)
    out.print("healthy")


@app.command("status")
def status(
    output_format: opt.FormatOption = TABLE, output: opt.OutputOption = None, config: opt.ConfigOption = None
) -> None:
    """Jobs with their last and next runs, pending and failed items, from the ledger."""
    from reconciler.status import current_status, view

    show(view(current_status(_load(config))), output_format, output, out)


def _add_installed_commands() -> None:
    """Commands other installed distributions offer (the sandbox's `demo`, `sandbox` and `bench`): absent from a
    production install, which has none."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group="reconciler.commands"):
        entry_point.load()(app)


def operational_problem(exc: BaseException) -> str | None:
    """The one line for an error of the environment, None for anything else (a bug keeps its traceback)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, RefusedError):
        return f"refused: {exc}"
    if isinstance(exc, SetupError | ConfigError):
        return str(exc)
    if isinstance(exc, OperationalError | InterfaceError):
        # The database went away mid-command (it was reached when the command started).
        return f"database error: {one_line(exc.orig)}"
    return None


def main() -> None:
    """The one place operational errors become one line on stderr and an exit code (2; 1 for a busy balance
    job, see `SetupError.exit_code`), with the traceback only at logging.level DEBUG, whichever command raised."""
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
        sys.exit(getattr(exc, "exit_code", EXIT_CONFIG))


_add_installed_commands()
