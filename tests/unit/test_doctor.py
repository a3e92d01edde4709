"""The doctor's pure judgements: what Stripe answered about where its events go, and the config's own rules."""

from __future__ import annotations

import pytest

from reconciler.config import parse_config
from reconciler.doctor import (
    Outcome,
    assess_connections,
    assess_event_destination,
    assess_grace_periods,
    assess_stripe_key,
    assess_webhook_endpoint,
    key_mode,
)

BASE = {"stripe": {"api_key": "sk_test_abc"}, "openmeter": {"token": "om_token"}}
HOOKED = {
    "stripe": {"api_key": "sk_test_abc", "webhook_secret": "whsec_a", "thin_webhook_secret": "whsec_b"},
    "openmeter": {"token": "om_token"},
    "server": {"public_url": "https://billing.example.com/"},
}
USAGE_EVENTS = ["customer.subscription.updated", "customer.subscription.deleted", "invoice.created"]
OURS = "https://billing.example.com/webhooks/stripe"


def endpoint(url=OURS, events=USAGE_EVENTS, status="enabled", api_version=None, id="we_1"):
    return {"id": id, "url": url, "enabled_events": list(events), "status": status, "api_version": api_version}


@pytest.mark.parametrize(
    ("raw", "endpoints", "outcome", "says"),
    [
        (HOOKED, [endpoint()], Outcome.OK, "all subscribed"),
        (HOOKED, [endpoint(events=["*"])], Outcome.OK, "all subscribed"),
        (HOOKED, [endpoint(events=USAGE_EVENTS[:2])], Outcome.FAIL, "['invoice.created']"),
        (HOOKED, [endpoint(status="disabled")], Outcome.FAIL, "disabled"),
        (HOOKED, [endpoint(url="https://elsewhere.example.com/webhooks/stripe")], Outcome.FAIL, "no webhook endpoint"),
        (HOOKED, [], Outcome.FAIL, "no webhook endpoint posts to " + OURS),
        # Another, complete endpoint beside a stale one: ours is found.
        (HOOKED, [endpoint(events=["charge.failed"], id="we_old"), endpoint(id="we_new")], Outcome.OK, "we_new"),
        (HOOKED, [endpoint(api_version="2024-06-20")], Outcome.WARN, "renders events at API version 2024-06-20"),
        # balances on (the default with a moesif section) needs payment_intent.succeeded too.
        (
            {**HOOKED, "moesif": {"management_token": "m"}, "balances": {"enabled": True}},
            [endpoint()],
            Outcome.FAIL,
            "payment_intent.succeeded",
        ),
        ({**BASE}, [], Outcome.WARN, "webhook_secret is not set"),
        # Without server.public_url the path is checked and the host is said to be unchecked.
        (
            {**BASE, "stripe": HOOKED["stripe"]},
            [endpoint(url="https://anything.example.com/webhooks/stripe")],
            Outcome.OK,
            "set server.public_url",
        ),
    ],
)
def test_the_webhook_endpoint(raw, endpoints, outcome, says):
    raw = {"balances": {"enabled": False}, **raw}
    check = assess_webhook_endpoint(endpoints, parse_config(raw))
    assert check.outcome is outcome, check
    assert says in check.detail, check
    assert (check.fix is None) == (outcome is Outcome.OK)


def destination(url=OURS + "/thin", events=None, status="enabled", payload="thin", type="webhook_endpoint"):
    events = events or ["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"]
    return {
        "id": "ed_1",
        "type": type,
        "event_payload": payload,
        "status": status,
        "enabled_events": events,
        "webhook_endpoint": {"url": url, "signing_secret": None},
    }


@pytest.mark.parametrize(
    ("destinations", "outcome", "says"),
    [
        ([destination()], Outcome.OK, "meter error reports subscribed"),
        ([destination(events=["v1.billing.meter.no_meter_found"])], Outcome.FAIL, "error_report_triggered"),
        ([destination(status="disabled")], Outcome.FAIL, "is disabled"),
        ([destination(payload="snapshot")], Outcome.FAIL, "snapshot payload"),
        ([destination(type="amazon_eventbridge")], Outcome.FAIL, "no event destination"),
        ([destination(url=None)], Outcome.FAIL, "no event destination"),  # listed without `include`
        ([], Outcome.FAIL, "no event destination posts to " + OURS + "/thin"),
    ],
)
def test_the_thin_event_destination(destinations, outcome, says):
    check = assess_event_destination(destinations, parse_config({**HOOKED, "balances": {"enabled": False}}))
    assert check.outcome is outcome, check
    assert says in check.detail, check


def test_without_a_thin_secret_the_destination_is_a_warning_naming_the_read_back():
    check = assess_event_destination([], parse_config({**BASE, "balances": {"enabled": False}}))
    assert check.outcome is Outcome.WARN and "read-back" in check.detail


@pytest.mark.parametrize(
    ("key", "mode"),
    [("sk_test_1", "test"), ("rk_test_1", "test"), ("sk_live_1", "live"), ("rk_live_1", "live"), ("pk_live_1", None)],
)
def test_the_key_mode_is_read_from_its_prefix(key, mode):
    assert key_mode(key) == mode


def test_a_key_whose_mode_contradicts_the_limits_is_a_warning():
    contradicting = {**BASE, "stripe": {"api_key": "sk_live_1", "limits": "sandbox"}, "balances": {"enabled": False}}
    assert assess_stripe_key(parse_config(contradicting)).outcome is Outcome.WARN
    assert assess_stripe_key(parse_config({**BASE, "balances": {"enabled": False}})).outcome is Outcome.OK


@pytest.mark.parametrize(("grace", "outcome"), [("30m", Outcome.OK), ("1h", Outcome.FAIL), ("2h", Outcome.FAIL)])
def test_usage_grace_must_end_before_stripe_finalizes(grace, outcome):
    raw = {**BASE, "usage": {"grace_period": grace}, "balances": {"enabled": False}}
    assert assess_grace_periods(parse_config(raw)).outcome is outcome


def test_public_url_must_be_an_http_url():
    from reconciler.config import ConfigError

    with pytest.raises(ConfigError, match=r"server\.public_url"):
        parse_config({**BASE, "server": {"public_url": "billing.example.com"}})


def test_replicas_whose_connections_outgrow_postgresql_are_warned_with_what_to_change():
    fits = assess_connections(needed=28, replicas=3, available=97)
    assert fits.outcome is Outcome.OK and "3 live replica(s) × 28 = 84 of the 97" in fits.detail
    outgrown = assess_connections(needed=76, replicas=2, available=97)
    assert outgrown.outcome is Outcome.WARN
    assert "152 of the 97" in outgrown.detail and "room for 1 replicas" in outgrown.detail
    assert "stripe.max_concurrency" in outgrown.fix and "max_connections" in outgrown.fix
