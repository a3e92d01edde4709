"""`reconciler doctor`: a read-only preflight against the configured accounts, run before the first real cycle.

Each check reads (never writes) one thing the jobs rely on and says ok, warn (works, but something is lost or
unchecked) or fail (a cycle would fail or bill wrongly), with what to do. The `assess_*` functions are pure: they
judge what the upstreams answered; `diagnose` does the reading, and one upstream that cannot be read fails its
own checks and not the others'.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from reconciler.clock import utc_now
from reconciler.config import Config, MeterMapping
from reconciler.durations import format_duration
from reconciler.errors import one_line
from reconciler.output import View
from reconciler.usage.model import Meter, MeteredItem
from reconciler.webhooks.events import THIN_METER_ERROR_EVENTS, snapshot_events_needed

SNAPSHOT_PATH = "/webhooks/stripe"
THIN_PATH = "/webhooks/stripe/thin"


class Outcome(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str
    fix: str | None = None  # what to do, for warn and fail


@dataclass
class Diagnosis:
    checks: list[Check]

    @property
    def healthy(self) -> bool:
        return all(c.outcome is not Outcome.FAIL for c in self.checks)

    def render_lines(self) -> str:
        """One line per check: outcome, name, what was found, and for a problem what to do."""
        width = max((len(c.name) for c in self.checks), default=0)
        lines = []
        for c in self.checks:
            line = f"{c.outcome.value:<4}  {c.name:<{width}}  {c.detail}"
            lines.append(line + (f" -> {c.fix}" if c.fix else ""))
        verdict = "ready" if self.healthy else "not ready: fix what failed, then run `reconciler doctor` again"
        return "\n".join([*lines, verdict])

    def render_json(self) -> str:
        return json.dumps({"healthy": self.healthy, "checks": [asdict(c) for c in self.checks]}, indent=2)

    def view(self) -> View:
        return View(
            "reconciler doctor",
            [asdict(c) for c in self.checks],
            self.render_json,
            lambda console: console.print(self.render_lines(), markup=False, highlight=False),
        )


def ok(name: str, detail: str) -> Check:
    return Check(name, Outcome.OK, detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, Outcome.WARN, detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, Outcome.FAIL, detail, fix)


# -- pure assessments ------------------------------------------------------------------------------


def key_mode(api_key: str) -> str | None:
    """test or live from a Stripe secret or restricted key's prefix; None for a prefix Stripe does not use."""
    for prefix, mode in (("sk_test_", "test"), ("rk_test_", "test"), ("sk_live_", "live"), ("rk_live_", "live")):
        if api_key.startswith(prefix):
            return mode
    return None


def assess_stripe_key(config: Config) -> Check:
    name = "stripe key"
    mode = key_mode(config.stripe.api_key.get_secret_value())
    if mode is None:
        return warn(name, "the key is neither sk_/rk_ test nor live", "use a secret (sk_) or restricted (rk_) key")
    limits = config.stripe.limits
    if limits != "auto" and (limits == "live") != (mode == "live"):
        return warn(
            name,
            f"a {mode} mode key, but stripe.limits is {limits}",
            "set stripe.limits: auto, so the request budgets follow the key's mode",
        )
    return ok(name, f"{mode} mode key, request budgets for {'live' if config.stripe.live else 'sandbox'} limits")


def assess_grace_periods(config: Config) -> Check:
    usage, invoice = config.usage.grace_period, config.stripe.invoice_grace_period
    name = "grace periods"
    detail = f"usage.grace_period {format_duration(usage)}, stripe.invoice_grace_period {format_duration(invoice)}"
    if usage >= invoice:
        return fail(
            name,
            detail + ": a period's final sync would run after Stripe finalizes its invoice",
            "make usage.grace_period shorter than the account's invoice grace period",
        )
    # Stripe's API does not expose the account's setting: only the config can be compared.
    return ok(name, detail + " (compare the latter with Stripe's Billing settings: the API does not show it)")


def assess_stripe_target(
    mapping: MeterMapping, meters_by_event: Mapping[str, Meter], legacy_price: Callable[[str], dict[str, Any] | None]
) -> Check:
    """A mapping's Stripe side: an active meter we can keep a total on, or else a legacy metered price."""
    from reconciler.usage.streams import meter_problem  # the same rule the usage cycle refuses items by

    name = f"stripe target {mapping.stripe}"
    meter = meters_by_event.get(mapping.stripe)
    if meter is not None:
        problem = meter_problem(meter)
        if problem:
            return fail(name, problem, "map an active sum or last meter, or fix this one in Stripe")
        return ok(name, f"meter {meter.id}, {meter.formula}, active")
    price = legacy_price(mapping.stripe)
    if price is None:
        return fail(
            name,
            f"no Stripe meter has event_name {mapping.stripe!r} and no price has that id",
            "correct usage.meters[].stripe: a meter's event_name, or a legacy metered price id",
        )
    recurring = price.get("recurring") or {}
    if recurring.get("usage_type") != "metered":
        return fail(name, f"price {mapping.stripe} is not metered", "map a metered price")
    if not price.get("active", True):
        return warn(name, f"legacy price {mapping.stripe} is archived", "map the price your subscriptions use")
    return ok(name, "legacy metered price (usage records), read under stripe.legacy_api_version")


def assess_openmeter_meter(mapping: MeterMapping, aggregations: Mapping[str, str]) -> Check:
    name = f"openmeter meter {mapping.openmeter}"
    aggregation = aggregations.get(mapping.openmeter)
    if aggregation is None:
        return fail(name, "OpenMeter has no meter with this slug", "correct usage.meters[].openmeter")
    return ok(name, f"aggregation {aggregation}, feeds {mapping.stripe}")


def assess_unmapped(
    items: Iterable[MeteredItem], config: Config, meters: Mapping[str, Meter], limit: int
) -> tuple[Check, list[MeteredItem]]:
    """Metered prices on subscriptions that no usage.meters entry covers (their usage is never billed); returns
    the items read, for the Moesif sample."""
    name = "unmapped metered prices"
    read = list(itertools.islice(items, limit))
    unmapped: dict[str, int] = {}
    for item in read:
        meter = meters.get(item.meter_id) if item.meter_id else None
        target = meter.event_name if meter else (item.meter_id or item.price_id)
        if config.usage.mapping_for(target) is None:
            unmapped[target] = unmapped.get(target, 0) + 1
    scope = f"the first {limit:,} metered items" if len(read) == limit else f"{len(read):,} metered items"
    if unmapped:
        listed = ", ".join(f"{target} ({count} item{'s' * (count != 1)})" for target, count in sorted(unmapped.items()))
        return fail(name, f"in {scope}: {listed}", "map them in usage.meters, or they are never billed"), read
    return ok(name, f"none in {scope}"), read


def _path_matches(url: str | None, expected: str | None, path: str) -> bool:
    if not url:
        return False
    return url.rstrip("/") == expected if expected else url.rstrip("/").endswith(path)


def assess_webhook_endpoint(endpoints: list[dict[str, Any]], config: Config) -> Check:
    """The snapshot-payload endpoint that feeds POST /webhooks/stripe: there, enabled, subscribed to what the
    jobs that are on react to."""
    name = "stripe webhook endpoint"
    if config.stripe.webhook_secret is None:
        return warn(
            name,
            "stripe.webhook_secret is not set: POST /webhooks/stripe is off, so changes wait for the next cycle",
            "create an endpoint for <public url>/webhooks/stripe and set STRIPE_WEBHOOK_SECRET to its secret",
        )
    expected = f"{config.server.public_url}{SNAPSHOT_PATH}" if config.server.public_url else None
    needed = snapshot_events_needed(balances=config.balances.enabled, plans=config.plans.enabled)
    where = expected or f"a URL ending in {SNAPSHOT_PATH}"
    candidates = [e for e in endpoints if _path_matches(e.get("url"), expected, SNAPSHOT_PATH)]
    if not candidates:
        return fail(
            name,
            f"no webhook endpoint posts to {where}",
            f"create one (Developers > Webhooks) for {sorted(needed)}",
        )
    enabled = [e for e in candidates if e.get("status") == "enabled"]
    if not enabled:
        return fail(name, f"{candidates[0]['id']} posts to {candidates[0]['url']} but is disabled", "enable it")
    best = min(enabled, key=lambda e: len(needed - _subscribed(e, needed)))
    missing = needed - _subscribed(best, needed)
    if missing:
        return fail(name, f"{best['id']} does not subscribe to {sorted(missing)}", "add those events to it")
    version = best.get("api_version")
    if version and version != config.stripe.api_version:
        return warn(
            name,
            f"{best['id']} renders events at API version {version}, not {config.stripe.api_version}",
            "pin the endpoint to stripe.api_version, so that events look as the product reads them",
        )
    unchecked = "" if expected else " (set server.public_url to check the host too)"
    return ok(name, f"{best['id']} posts to {best['url']}, {len(needed)} events needed, all subscribed{unchecked}")


def _subscribed(endpoint: dict[str, Any], needed: frozenset[str]) -> frozenset[str]:
    events = set(endpoint.get("enabled_events") or [])
    return needed if "*" in events else needed & events


def assess_event_destination(destinations: list[dict[str, Any]], config: Config) -> Check:
    """The thin-payload destination that brings Stripe's meter error reports to POST /webhooks/stripe/thin."""
    name = "stripe thin event destination"
    if config.stripe.thin_webhook_secret is None:
        return warn(
            name,
            "stripe.thin_webhook_secret is not set: meter error reports are not received, and rejected meter "
            "events are found only by the read-back",
            "create a thin event destination for <public url>/webhooks/stripe/thin and set STRIPE_THIN_WEBHOOK_SECRET",
        )
    expected = f"{config.server.public_url}{THIN_PATH}" if config.server.public_url else None
    where = expected or f"a URL ending in {THIN_PATH}"
    candidates = [
        d
        for d in destinations
        if d.get("type") == "webhook_endpoint"
        and _path_matches((d.get("webhook_endpoint") or {}).get("url"), expected, THIN_PATH)
    ]
    if not candidates:
        return fail(
            name,
            f"no event destination posts to {where}",
            f"create a webhook destination with the thin payload for {sorted(THIN_METER_ERROR_EVENTS)}",
        )
    usable = [d for d in candidates if d.get("status") == "enabled" and d.get("event_payload") == "thin"]
    if not usable:
        first = candidates[0]
        return fail(
            name,
            f"{first['id']} is {first.get('status')} with the {first.get('event_payload')} payload",
            "enable it with the thin payload",
        )
    best = max(usable, key=lambda d: len(THIN_METER_ERROR_EVENTS & set(d.get("enabled_events") or [])))
    missing = THIN_METER_ERROR_EVENTS - set(best.get("enabled_events") or [])
    if missing:
        return fail(name, f"{best['id']} does not subscribe to {sorted(missing)}", "add those events to it")
    return ok(name, f"{best['id']} posts to {best['webhook_endpoint']['url']}, meter error reports subscribed")


# -- reading ---------------------------------------------------------------------------------------


def _stripe_problem(name: str, exc: Exception) -> Check:
    status = getattr(exc, "status", None)
    if status == 401:
        return fail(name, f"Stripe refused the API key: {one_line(exc)}", "check STRIPE_API_KEY (stripe.api_key)")
    if status == 403:
        return fail(name, one_line(exc), "a restricted key needs read access to this resource")
    if status == 400 and "version" in str(exc).lower():
        return fail(name, one_line(exc), "pin a Stripe API version the account accepts (stripe.api_version)")
    return fail(name, one_line(exc), "check stripe.api_base and the network")


def diagnose(config: Config, *, max_items: int = 10_000) -> Diagnosis:
    """Every check against the configured database and accounts; reads only."""
    checks = [_database_check(config)]
    connections = _connections_check(config)
    checks += [connections] if connections else []
    checks += [assess_stripe_key(config), assess_grace_periods(config)]
    checks += _stripe_checks(config, max_items)
    checks += _openmeter_checks(config)
    return Diagnosis(checks)


def _database_check(config: Config) -> Check:
    from reconciler.ledger.database import check_reachable, current_revision, head_revision, make_engine

    name = "database"
    engine = make_engine(config.database.url)
    try:
        check_reachable(engine)
        current, head = current_revision(engine), head_revision()
    except Exception as exc:  # whatever keeps us from reading it is the finding
        return fail(name, one_line(exc), "check database.url (RECONCILER_DATABASE_URL) and that the server runs")
    finally:
        engine.dispose()
    if current != head:
        state = "has no reconciler tables" if current is None else f"is at revision {current}, not {head}"
        return fail(name, f"the database {state}", "run `reconciler db upgrade`")
    return ok(name, f"reachable, at revision {head} (the latest)")


def assess_connections(needed: int, replicas: int, available: int) -> Check:
    """Whether `replicas` replicas, each opening up to `needed` connections (Config.connections_needed), fit in
    the `available` ones (PostgreSQL's max_connections less the superuser's reserved ones). Past it, a worker's
    connection is refused ("too many clients") and its item fails for the cycle."""
    name = "database connections"
    total = needed * replicas
    detail = (
        f"each replica may open {needed} connections (stripe.max_concurrency workers, OpenMeter queries, balance "
        f"workers and 4 more); {replicas} live replica(s) × {needed} = {total} of the {available} PostgreSQL allows "
        f"(room for {available // needed} replicas)"
    )
    if total > available:
        return warn(
            name,
            detail,
            "lower stripe.max_concurrency (and openmeter/moesif max_concurrency), run fewer replicas, or raise "
            "PostgreSQL's max_connections (or put a pooler such as PgBouncer in front)",
        )
    return ok(name, detail)


def _connections_check(config: Config) -> Check | None:
    """On PostgreSQL, `assess_connections` for the replicas live now (at least this one); None elsewhere."""
    from reconciler.ledger.coordination import Coordinator
    from reconciler.ledger.database import connections_allowed, make_engine

    engine = make_engine(config.database.url)
    try:
        if engine.dialect.name != "postgresql":
            return None
        available = connections_allowed(engine)
        live = Coordinator(engine, utc_now).live_replicas()  # at least 1: this one, about to run
    except Exception as exc:  # the database check names why it cannot be read
        return warn("database connections", f"could not be read: {one_line(exc)}", "see the database check")
    finally:
        engine.dispose()
    return assess_connections(config.connections_needed(), live, available)


def _stripe_checks(config: Config, max_items: int) -> list[Check]:
    from reconciler.upstream.errors import UpstreamError
    from reconciler.upstream.stripe_api import StripeGateway

    stripe = StripeGateway(config.stripe)
    checks: list[Check] = []
    try:
        try:
            meters = stripe.list_meters()
        except UpstreamError as exc:
            return [_stripe_problem("stripe api", exc)]  # the other Stripe checks would say the same
        checks.append(ok("stripe api", f"the key and API version {config.stripe.api_version} are accepted"))
        by_event = {m.event_name: m for m in meters.values() if m.status == "active"}
        by_event |= {m.event_name: m for m in meters.values() if m.event_name not in by_event}

        def legacy_price(price_id: str) -> dict[str, Any] | None:
            try:
                return stripe.price(price_id, legacy=True)
            except UpstreamError as exc:
                if exc.status == 404:
                    return None
                raise

        for mapping in config.usage.meters:
            try:
                checks.append(assess_stripe_target(mapping, by_event, legacy_price))
            except UpstreamError as exc:
                checks.append(_stripe_problem(f"stripe target {mapping.stripe}", exc))
        items: list[MeteredItem] = []
        try:
            listing = stripe.metered_items(with_customer=config.balances.enabled)
            check, items = assess_unmapped(listing, config, meters, max_items)
            checks.append(check)
        except UpstreamError as exc:
            checks.append(_stripe_problem("unmapped metered prices", exc))
        for name, read, assess in (
            ("stripe webhook endpoint", stripe.webhook_endpoints, assess_webhook_endpoint),
            ("stripe thin event destination", stripe.event_destinations, assess_event_destination),
        ):
            try:
                checks.append(assess(read(), config))  # type: ignore[operator]
            except UpstreamError as exc:
                checks.append(_stripe_problem(name, exc))
        checks.append(_moesif_check(config, items))
    finally:
        stripe.close()
    return checks


def _openmeter_checks(config: Config) -> list[Check]:
    from reconciler.upstream.errors import UpstreamError
    from reconciler.upstream.openmeter_api import OpenMeterGateway

    openmeter = OpenMeterGateway(config.openmeter)
    try:
        meters = openmeter.meters()
    except UpstreamError as exc:
        status = getattr(exc, "status", None)
        fix = "check OPENMETER_API_TOKEN" if status in (401, 403) else "check openmeter.url and the network"
        return [fail("openmeter api", one_line(exc), fix)]
    finally:
        openmeter.close()
    aggregations = {slug: meter.aggregation for slug, meter in meters.items()}
    checks = [ok("openmeter api", f"the token is accepted, {len(meters)} meters")]
    checks += [assess_openmeter_meter(mapping, aggregations) for mapping in config.usage.meters]
    return checks


def _moesif_check(config: Config, items: list[MeteredItem]) -> Check:
    """The token, by reading the Moesif subscription the balance job would read first."""
    from reconciler.balances.accounts import map_accounts
    from reconciler.clock import utc_now
    from reconciler.upstream.errors import UpstreamError
    from reconciler.upstream.moesif_api import MoesifGateway

    name = "moesif"
    if not config.balances.enabled or config.moesif is None:
        return ok(name, "not used (balances.enabled is false)")
    accounts = map_accounts(
        items, config.balances.subscription_metadata_key, utc_now() - config.balances.topups.lookback
    )
    if not accounts:
        return warn(name, "no Stripe customer with metered items to sample", "run doctor again once there is one")
    account = accounts[min(accounts)].account
    moesif = MoesifGateway(config.moesif)
    try:
        balance = moesif.balance(account.subscription_id)
    except UpstreamError as exc:
        if exc.status in (401, 403):
            return fail(name, f"Moesif refused the token: {one_line(exc)}", "check MOESIF_MANAGEMENT_TOKEN")
        if exc.status == 404:
            return warn(
                name,
                f"subscription {account.subscription_id} (customer {account.customer_id}) is unknown to Moesif",
                f"create it in Moesif, or name it in the customer's metadata "
                f"{config.balances.subscription_metadata_key!r}",
            )
        return fail(name, one_line(exc), "check moesif.url and the network")
    finally:
        moesif.close()
    return ok(
        name,
        f"the token reads subscription {account.subscription_id} (customer {account.customer_id}): "
        f"current_balance {balance.current_balance}",
    )
