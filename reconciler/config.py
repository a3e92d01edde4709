"""The one validated, immutable configuration object, loaded once at the entry point.

`load_config(path)` reads YAML, fills `${VAR}` / `${VAR:-default}` from the environment, and validates
with pydantic. Every problem is reported as `key.path: what is wrong`, all at once, as a `ConfigError`.
Secrets are `SecretStr`: they print as `**********` and are collected by `secret_values()` so the log
pipeline can scrub them from anything it writes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from reconciler.durations import format_duration, parse_duration
from reconciler.upstream.stripe_budget import StripeBudgets

DEFAULT_CONFIG_PATH = Path("config.yaml")
# What a Stripe write usually takes to answer, for sizing requests in flight to the budget (a meter event was
# answered in 40-60 ms from a nearby region in our measurements; Stripe publishes no latency figure).
ASSUMED_LATENCY_SECONDS = 0.05
CONFIG_ENV_VAR = "RECONCILER_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used. `problems` are `key.path: message` lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def _to_timedelta(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_to_timedelta), PlainSerializer(format_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    url: str = "sqlite:///reconciler.db"

    @field_validator("url")
    @classmethod
    def _a_database_url(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL (e.g. sqlite:///reconciler.db, postgresql+psycopg://…)") from None
        return value


class StripeConfig(_Section):
    api_key: SecretStr
    api_base: str = "https://api.stripe.com"
    legacy_api_version: str = "2025-02-24.acacia"
    # Pinned so that an SDK upgrade never silently changes the wire format we parse.
    api_version: str = "2026-10-28.endive"
    max_network_retries: int = Field(default=3, ge=0, le=10)
    invoice_grace_period: Duration = timedelta(hours=1)
    # How long Stripe's summaries (meter event summaries, legacy usage record summaries) may lag a report we sent.
    # Stripe says only that meter events are aggregated asynchronously and summaries are eventually consistent
    # (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api,
    # https://docs.stripe.com/api/billing/meter-event-summary); it gives no bound, so the default is generous.
    summary_lag: Duration = Field(default=timedelta(minutes=10), gt=timedelta(0))
    timeout_seconds: float = Field(default=30, gt=0)
    # Request budgets of this deployment (all replicas together), shaped like Stripe's limiters
    # (https://docs.stripe.com/rate-limits; upstream/stripe_budget.py): a global budget, one per endpoint, and in live
    # mode one for meter events apart. Unset: 80% of Stripe's limits for the key's mode (sk_live_/rk_live_: live),
    # leaving room for the account's other integrations: see `budgets()`.
    limits: Literal["auto", "live", "sandbox"] = "auto"
    max_requests_per_second: float | None = Field(default=None, gt=0)  # the global budget
    max_requests_per_second_per_endpoint: float | None = Field(default=None, gt=0)
    max_meter_events_per_second: float | None = Field(default=None, gt=0)  # live mode only: sandboxes share the global
    endpoint_budgets: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # "GET /v1/…": 10
    # How meter events reach Stripe: `v1` (POST /v1/billing/meter_events, one request each) or `v2_stream` (the
    # high-throughput v2 meter event stream, up to 100 events a request, authenticated by a 15-minute session:
    # https://docs.stripe.com/api/v2/billing/meter-event-stream/create,
    # https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api). Legacy usage records are not
    # meter events: they always take their v1 path.
    meter_events: Literal["v1", "v2_stream"] = "v1"
    meter_events_base: str = "https://meter-events.stripe.com"  # the stream's own host
    max_meter_event_stream_requests_per_second: float | None = Field(default=None, gt=0)  # live mode only
    # Requests in flight at once, per replica (each is a worker thread with a database connection at hand).
    # Unset: sized to fill the budget that writes count against at Stripe's usual latency (`concurrency()`).
    max_concurrency: int | None = Field(default=None, ge=1, le=128)
    # Signing secret of the webhook endpoint (`whsec_…`); unset or empty: POST /webhooks/stripe is off.
    webhook_secret: SecretStr | None = None
    # Signing secret of the thin-payload event destination (its own `whsec_…`): Stripe sends the meter error
    # reports (v1.billing.meter.error_report_triggered, v1.billing.meter.no_meter_found) only as thin events
    # (https://docs.stripe.com/api/v2/core/events/event-types). Unset or empty: POST /webhooks/stripe/thin is off.
    thin_webhook_secret: SecretStr | None = None

    @property
    def live(self) -> bool:
        if self.limits != "auto":
            return self.limits == "live"
        return self.api_key.get_secret_value().startswith(("sk_live_", "rk_live_"))

    def budgets(self) -> StripeBudgets:
        """Stripe's limits for the mode (live: 100/s global, 25/s per endpoint, 1,000 meter events/s apart; a
        sandbox: 25/s global, 25/s per endpoint, meter events counted in the global), 80% of each unless set."""
        live = self.live
        share = 0.8
        meter_events = self.max_meter_events_per_second or 1000 * share
        # The v2 stream: 10,000 requests/s live (https://docs.stripe.com/api/v2/billing/meter-event-stream/create);
        # no sandbox figure is documented, so there it shares the global budget like any endpoint.
        stream = self.max_meter_event_stream_requests_per_second or 10_000 * share
        return StripeBudgets(
            global_per_second=self.max_requests_per_second or (100 if live else 25) * share,
            endpoint_per_second=self.max_requests_per_second_per_endpoint or 25 * share,
            meter_events_per_second=meter_events if live else None,
            endpoints=dict(self.endpoint_budgets),
            meter_event_stream_per_second=stream if live else None,
        )

    def concurrency(self) -> int:
        """Requests in flight at once, per replica. Unset, budget × latency (Little's law): the meter events' budget
        (live: 800/s at 80%, outside the global one; a sandbox: the global 20/s) times ASSUMED_LATENCY_SECONDS, at
        least 8 (reads and legacy usage records count against the slower budgets) and at most 64 threads."""
        if self.max_concurrency is not None:
            return self.max_concurrency
        budgets = self.budgets()
        writes_per_second = budgets.meter_events_per_second or budgets.global_per_second
        return max(8, min(64, math.ceil(writes_per_second * ASSUMED_LATENCY_SECONDS)))

    @field_validator("webhook_secret", "thin_webhook_secret")
    @classmethod
    def _empty_means_off(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("api_base", "meter_events_base")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


class OpenMeterConfig(_Section):
    url: str = "https://openmeter.cloud"
    token: SecretStr
    timeout_seconds: float = Field(default=30, gt=0)
    max_requests_per_second: float = Field(default=10, gt=0)  # all replicas together
    max_concurrency: int = Field(default=4, ge=1, le=64)  # queries in flight at once, per replica
    max_retries: int = Field(default=3, ge=0, le=10)

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


Rounding = Literal["ceil", "round", "floor"]


class MeterMapping(_Section):
    """One Stripe billing target (meter `event_name`, or a legacy price id) fed by one OpenMeter meter."""

    stripe: str = Field(min_length=1)
    openmeter: str = Field(min_length=1)
    rounding: Rounding = "ceil"


class UsageConfig(_Section):
    window_size: Literal["MINUTE", "HOUR", "DAY"] = "HOUR"
    window_time_zone: str = "UTC"
    grace_period: Duration = timedelta(minutes=30)
    subject: str = "customer_id"
    lookback: Duration = timedelta(days=35)
    legacy_final_sync_before: Duration = timedelta(minutes=5)
    meters: list[MeterMapping] = Field(default_factory=list)

    @field_validator("window_time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("subject")
    @classmethod
    def _subject_form(cls, value: str) -> str:
        if value == "customer_id" or (value.startswith("metadata:") and len(value) > len("metadata:")):
            return value
        raise ValueError("must be customer_id or metadata:<key>")

    @field_validator("meters")
    @classmethod
    def _unique_targets(cls, value: list[MeterMapping]) -> list[MeterMapping]:
        seen: set[str] = set()
        for mapping in value:
            if mapping.stripe in seen:
                raise ValueError(f"{mapping.stripe!r} is mapped twice")
            seen.add(mapping.stripe)
        return value

    @property
    def subject_metadata_key(self) -> str | None:
        return self.subject.removeprefix("metadata:") if self.subject.startswith("metadata:") else None

    def mapping_for(self, stripe_target: str) -> MeterMapping | None:
        return next((m for m in self.meters if m.stripe == stripe_target), None)


class MoesifConfig(_Section):
    url: str = "https://api.moesif.com"
    management_token: SecretStr
    max_requests_per_minute: int = Field(default=250, gt=0, le=500)
    max_concurrency: int = Field(default=4, ge=1, le=64)  # customers the balance job works on at once
    timeout_seconds: float = Field(default=30, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10)
    # Moesif does not document what a repeated transaction_id does. Unless this says it is ignored, a POST whose
    # outcome is unknown is never sent again: it is flagged, and the balance comparison shows whether it landed.
    deduplicates_transaction_ids: bool = False

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def authorization(self) -> str:
        """The Authorization header value; a token pasted with its `Bearer ` prefix is not doubled."""
        token = self.management_token.get_secret_value().strip()
        return token if token.lower().startswith("bearer ") else f"Bearer {token}"


CurrencyAmounts = dict[str, Decimal]


def _lower_currency_keys(value: Any) -> Any:
    return {str(k).lower(): v for k, v in value.items()} if isinstance(value, dict) else value


class TopupsConfig(_Section):
    enabled: bool = True
    payment_intent_metadata: dict[str, str] = Field(default_factory=dict)
    # PaymentIntents that paid an invoice are never top-ups, unless every line of the invoice has one of these
    # prices (a company that sells prepaid credit through invoices names those prices here).
    invoice_prices: list[str] = Field(default_factory=list)
    lookback: Duration = timedelta(days=35)


class BalancesConfig(_Section):
    enabled: bool = False
    stripe_source: Literal["credit_grants", "customer_balance", "none"] = "credit_grants"
    moesif_balance_field: Literal["current_balance", "available_balance"] = "current_balance"
    tolerance: Annotated[CurrencyAmounts, BeforeValidator(_lower_currency_keys)] = Field(
        default_factory=lambda: {"usd": Decimal("0.01"), "eur": Decimal("0.01"), "jpy": Decimal("1")}
    )
    auto_correct: bool = False
    max_auto_correction: Annotated[CurrencyAmounts, BeforeValidator(_lower_currency_keys)] = Field(default_factory=dict)
    settle_delay: Duration = timedelta(minutes=10)
    full_sweep_interval: Duration = timedelta(hours=24)
    subscription_metadata_key: str | None = "moesif_subscription_id"
    topups: TopupsConfig = TopupsConfig()

    @field_validator("tolerance", "max_auto_correction")
    @classmethod
    def _non_negative(cls, value: CurrencyAmounts) -> CurrencyAmounts:
        for currency, amount in value.items():
            if amount < 0:
                raise ValueError(f"{currency}: must not be negative")
        return value


DEFAULT_STATUS_MAP = {
    "active": "active",
    "trialing": "active",
    "past_due": "past_due",
    "unpaid": "canceled",
    "canceled": "canceled",
    "incomplete_expired": "canceled",
    "paused": "canceled",
}


class PlansConfig(_Section):
    """Entitlements: the app's plan and status for each user, kept equal to what Stripe says."""

    enabled: bool = False
    sync_url: str = ""
    api_key: SecretStr | None = None
    api_key_header: str = "X-Internal-API-Key"
    user_id_from: str = "subscription_metadata:user_id"
    price_to_plan: dict[str, str] = Field(default_factory=dict)
    rank: list[str] = Field(default_factory=list)  # lowest first: with several live plans the highest wins
    status_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_STATUS_MAP))
    default_plan: str | None = None  # for customers with no live subscription, e.g. free
    timeout_seconds: float = Field(default=10, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10)

    @field_validator("user_id_from")
    @classmethod
    def _user_id_source(cls, value: str) -> str:
        kind, _, key = value.partition(":")
        if value == "customer_id" or (kind in ("subscription_metadata", "customer_metadata") and key):
            return value
        raise ValueError("must be customer_id, subscription_metadata:<key> or customer_metadata:<key>")


class ScheduleConfig(_Section):
    usage_sync: str = "*/15 * * * *"
    balance_reconcile: str = "0 * * * *"
    plan_sync: str = "*/10 * * * *"
    # The read-back (usage/readback.py): often enough to read a period back between its final sync and its
    # invoice's finalization; a run with nothing due costs one ledger query and no Stripe call. "off" disables it.
    readback: str = "*/5 * * * *"

    @field_validator("usage_sync", "balance_reconcile", "plan_sync", "readback")
    @classmethod
    def _valid_schedule(cls, value: str, info: ValidationInfo) -> str:
        from reconciler.schedule import parse_schedule  # local: keeps apscheduler out of config imports

        if value == "off" and info.field_name == "readback":
            return value
        parse_schedule(value)
        return value


class ServerConfig(_Section):
    """The HTTP listeners inside `reconciler run`: the webhook paths on host:port (public: Stripe must reach them),
    /healthz, /readyz and /metrics on ops_host:ops_port (private: kept off the public listener). Port 0: any free
    port, logged at start."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=8090, ge=0, le=65535)
    # A webhook body larger than this is refused with 413 before it is read: Stripe's events are a few KB, and
    # the endpoint is public, so an unsigned body must not make the process buffer it.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_cycle_age: Duration = timedelta(hours=2)  # /readyz turns unready when a job's last success is older
    # Where Stripe reaches the webhook listener from outside (e.g. https://billing.example.com): `reconciler doctor`
    # checks that the webhook endpoint and the thin event destination post there. Unset: only their paths are.
    public_url: str | None = None

    @field_validator("public_url")
    @classmethod
    def _public_url_form(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL, e.g. https://billing.example.com")
        return value.rstrip("/")

    shutdown_timeout: Duration = timedelta(seconds=30)


class LedgerConfig(_Section):
    retention: Duration = timedelta(days=400)  # closed ledger rows older than this are pruned by the daemon
    # PostgreSQL replicas: how long a claimed work item stays leased without a heartbeat before another
    # replica may take it over (a crashed replica's work waits at most this long).
    lease_ttl: Duration = timedelta(seconds=30)


class BackfillConfig(_Section):
    confirm_above: int = Field(default=100, ge=0)  # without --yes, more reports than this ask for confirmation


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, JSON in a pipe or a file


class Config(_Section):
    database: DatabaseConfig = DatabaseConfig()
    stripe: StripeConfig
    openmeter: OpenMeterConfig
    usage: UsageConfig = UsageConfig()
    moesif: MoesifConfig | None = None
    balances: BalancesConfig = BalancesConfig()
    plans: PlansConfig = PlansConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    server: ServerConfig = ServerConfig()
    ledger: LedgerConfig = LedgerConfig()
    backfill: BackfillConfig = BackfillConfig()
    logging: LoggingConfig = LoggingConfig()

    def connections_needed(self) -> int:
        """Database connections one replica may use at once: one per usage worker, per OpenMeter query and per
        balance worker in flight, and a few for the scheduler's jobs, the webhook worker, the probes and the
        heartbeat."""
        balance_workers = self.moesif.max_concurrency if self.moesif is not None else 0
        return self.stripe.concurrency() + self.openmeter.max_concurrency + balance_workers + 4

    def cross_field_problems(self) -> list[str]:
        """Combinations of valid values that cannot work together, as `key.path: message` lines."""
        problems = []
        balances = self.balances
        if balances.enabled and self.moesif is None:
            problems.append("moesif: required when balances.enabled is true (url, management_token)")
        if balances.enabled and balances.stripe_source == "none" and balances.auto_correct:
            # With no Stripe balance to compare against, every Moesif balance would look like drift.
            problems.append(
                "balances.auto_correct: needs a Stripe balance to compare with; with stripe_source: none the "
                "balance diff is off and forwarding every top-up exactly once is the reconciliation"
            )
        if balances.enabled and balances.stripe_source == "none" and not balances.topups.enabled:
            problems.append("balances.topups.enabled: with stripe_source: none, disabling top-ups leaves nothing to do")
        if self.plans.enabled and not self.plans.sync_url:
            problems.append("plans.sync_url: required when plans.enabled is true")
        if self.plans.enabled and not self.plans.price_to_plan:
            problems.append("plans.price_to_plan: map at least one Stripe price id to a plan")
        unranked = set(self.plans.price_to_plan.values()) - set(self.plans.rank)
        if self.plans.enabled and len(set(self.plans.price_to_plan.values())) > 1 and unranked:
            problems.append(
                f"plans.rank: must list every plan of price_to_plan (missing: {', '.join(sorted(unranked))})"
            )
        server = self.server
        if server.enabled and server.port and (server.host, server.port) == (server.ops_host, server.ops_port):
            problems.append("server.ops_port: must differ from server.port (the webhook listener) on the same host")
        longest_lookback = max(self.usage.lookback, balances.topups.lookback)
        if self.ledger.retention <= longest_lookback:
            # Pruning what a look-back still reads would forward a top-up twice or re-open a closed period.
            problems.append(
                f"ledger.retention: must be longer than the longest look-back ({format_duration(longest_lookback)})"
            )
        return problems

    def secret_values(self) -> list[str]:
        """Every secret in the config, so logs and errors can be scrubbed of them."""
        secrets = [self.stripe.api_key, self.openmeter.token]
        for webhook_secret in (self.stripe.webhook_secret, self.stripe.thin_webhook_secret):
            if webhook_secret is not None:
                secrets.append(webhook_secret)
        if self.moesif is not None:
            secrets.append(self.moesif.management_token)
        if self.plans.api_key is not None:
            secrets.append(self.plans.api_key)
        values = [s.get_secret_value() for s in secrets if s.get_secret_value()]
        database_password = make_url(self.database.url).password
        return [*values, str(database_password)] if database_password else values

    def warnings(self) -> list[str]:
        """Settings that are valid but likely to lose money; `check-config` prints them."""
        found = []
        if self.usage.grace_period >= self.stripe.invoice_grace_period:
            found.append(
                f"usage.grace_period ({format_duration(self.usage.grace_period)}) is not shorter than "
                f"stripe.invoice_grace_period ({format_duration(self.stripe.invoice_grace_period)}): the final "
                "sync of a period would run after Stripe finalizes its invoice, and late usage would be lost"
            )
        topups = self.balances.topups
        if self.balances.enabled and topups.enabled and not topups.payment_intent_metadata:
            found.append(
                "balances.topups.payment_intent_metadata is empty: every succeeded PaymentIntent that pays no "
                "invoice (one-off charges too) is credited to Moesif as a top-up; name the metadata your top-ups "
                "carry, e.g. {type: credit_topup}"
            )
        return found

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (the database URL's password too)."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = make_url(self.database.url).render_as_string(hide_password=True)
        return data


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _key_path(location: tuple[str | int, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _substitute_env(node: Any, location: tuple[str | int, ...], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {key: _substitute_env(value, (*location, key), problems) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute_env(value, (*location, i), problems) for i, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        problems.append(f"{_key_path(location)}: environment variable {name} is not set")
        return ""

    return _ENV_REFERENCE.sub(replace, node)


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return "must be one of " + ", ".join(choices)
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _iter_validation_problems(exc: ValidationError) -> Iterator[str]:
    for error in exc.errors():
        yield f"{_key_path(tuple(error['loc'])) or '(top level)'}: {_describe(error)}"


def parse_config(raw: Any) -> Config:
    """Validate an already-parsed YAML document (a dict)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of sections (database, stripe, openmeter, ...)"])
    problems: list[str] = []
    substituted = _substitute_env(raw, (), problems)
    try:
        config = Config.model_validate(substituted)
    except ValidationError as exc:
        # A variable that was unset already produced the clearer message; skip the echo of it.
        reported = {p.split(":", 1)[0] for p in problems}
        problems += [p for p in _iter_validation_problems(exc) if p.split(":", 1)[0] not in reported]
        raise ConfigError(problems) from None
    problems += config.cross_field_problems()
    if problems:
        raise ConfigError(problems)
    return config


def resolve_config_path(explicit: str | Path | None) -> Path:
    """`--config`, else `$RECONCILER_CONFIG`, else `./config.yaml`."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def load_config(path: str | Path | None = None) -> Config:
    config_path = resolve_config_path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{config_path}: config file not found (pass --config PATH or set {CONFIG_ENV_VAR})"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{config_path}: cannot read config file: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{config_path}: not valid YAML{where}"]) from None
    return parse_config(raw)
