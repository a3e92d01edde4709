"""Loading and validating config.yaml: key paths in every message, secrets from the environment only."""

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from reconciler.app import open_database
from reconciler.config import ConfigError, load_config, parse_config
from reconciler.ledger.database import make_engine, upgrade

REPO_ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"stripe": {"api_key": "sk_test_abc"}, "openmeter": {"token": "om_token"}}


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.problems


def test_the_documented_sample_is_valid(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_sample")
    monkeypatch.setenv("OPENMETER_API_TOKEN", "om_sample")
    monkeypatch.setenv("MOESIF_MANAGEMENT_TOKEN", "Bearer moesif_sample")
    monkeypatch.delenv("RECONCILER_DATABASE_URL", raising=False)
    config = load_config(REPO_ROOT / "config.yaml")
    assert config.database.url == "sqlite:///reconciler.db"
    assert config.stripe.api_key.get_secret_value() == "sk_test_sample"
    assert config.usage.window_size == "HOUR"
    assert config.usage.meters[0].openmeter == "api_requests"
    assert config.balances.enabled and config.balances.tolerance["jpy"] == 1
    assert config.moesif is not None and config.moesif.authorization == "Bearer moesif_sample"
    assert config.logging.format == "auto"


def test_log_format_is_auto_by_default_and_can_be_chosen():
    assert parse_config(MINIMAL).logging.format == "auto"
    assert parse_config({**MINIMAL, "logging": {"format": "console"}}).logging.format == "console"
    assert problems_of({**MINIMAL, "logging": {"format": "yaml"}})[0].startswith("logging.format")


def test_balances_without_a_moesif_section_or_with_nothing_to_compare_are_refused():
    assert problems_of({**MINIMAL, "balances": {"enabled": True}}) == [
        "moesif: required when balances.enabled is true (url, management_token)"
    ]
    raw = {
        **MINIMAL,
        "moesif": {"management_token": "m"},
        "balances": {"enabled": True, "stripe_source": "none", "auto_correct": True},
    }
    assert problems_of(raw)[0].startswith("balances.auto_correct: needs a Stripe balance to compare with")


def test_moesif_token_is_a_secret_and_never_doubles_its_bearer_prefix():
    bare = parse_config({**MINIMAL, "moesif": {"management_token": "m0esif_s3cret"}})
    prefixed = parse_config({**MINIMAL, "moesif": {"management_token": "Bearer m0esif_s3cret"}})
    assert bare.moesif.authorization == prefixed.moesif.authorization == "Bearer m0esif_s3cret"
    assert "m0esif_s3cret" in bare.secret_values()
    assert "m0esif_s3cret" not in yaml.safe_dump(bare.masked())


def test_wrong_enum_names_the_key_path_and_the_choices():
    raw = {**MINIMAL, "usage": {"window_size": "WEEK"}}
    assert problems_of(raw) == ["usage.window_size: must be one of MINUTE, HOUR, DAY"]


def test_unknown_key_and_wrong_type_are_reported_together():
    raw = {**MINIMAL, "usage": {"windowsize": "HOUR", "meters": [{"stripe": "a", "openmeter": "b", "rounding": 3}]}}
    problems = problems_of(raw)
    assert "usage.windowsize: unknown key" in problems
    assert any(p.startswith("usage.meters[0].rounding: must be one of ceil, round, floor") for p in problems)


def test_missing_secret_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("RECONCILER_TEST_UNSET_KEY", raising=False)
    raw = {"stripe": {"api_key": "${RECONCILER_TEST_UNSET_KEY}"}, "openmeter": {"token": "t"}}
    assert problems_of(raw) == ["stripe.api_key: environment variable RECONCILER_TEST_UNSET_KEY is not set"]


def test_missing_section_names_the_key():
    assert "openmeter: required key is missing" in problems_of({"stripe": {"api_key": "k"}})


def test_env_default_is_used_when_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv("RECONCILER_TEST_DB", raising=False)
    config = parse_config({**MINIMAL, "database": {"url": "${RECONCILER_TEST_DB:-sqlite:///x.db}"}})
    assert config.database.url == "sqlite:///x.db"
    monkeypatch.setenv("RECONCILER_TEST_DB", "postgresql+psycopg://u@h/db")
    config = parse_config({**MINIMAL, "database": {"url": "${RECONCILER_TEST_DB:-sqlite:///x.db}"}})
    assert config.database.url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ({"usage": {"grace_period": "half an hour"}}, None, "usage.grace_period: 'half an hour' is not a duration"),
        ({"usage": {"window_time_zone": "Mars/Olympus"}}, None, "usage.window_time_zone: 'Mars/Olympus' is not"),
        ({"usage": {"subject": "email"}}, None, "usage.subject: must be customer_id or metadata:<key>"),
        ({"schedule": {"usage_sync": "every so often"}}, None, "schedule.usage_sync: 'every so often' is neither"),
        ({"stripe": {"api_key": "k", "max_network_retries": "many"}}, None, "stripe.max_network_retries:"),
    ],
)
def test_invalid_values_name_their_key(section, value, expected):
    raw = {**MINIMAL, **section}
    assert any(p.startswith(expected) for p in problems_of(raw)), problems_of(raw)


def test_durations_and_schedules_parse():
    config = parse_config(
        {**MINIMAL, "usage": {"grace_period": "45m", "lookback": "10d"}, "schedule": {"usage_sync": "5m"}}
    )
    assert config.usage.grace_period.total_seconds() == 45 * 60
    assert config.usage.lookback.days == 10


def test_stripe_summary_lag_defaults_to_ten_minutes_and_parses_durations():
    assert parse_config(MINIMAL).stripe.summary_lag == timedelta(minutes=10)
    config = parse_config({**MINIMAL, "stripe": {"api_key": "k", "summary_lag": "90s"}})
    assert config.stripe.summary_lag == timedelta(seconds=90)
    assert config.masked()["stripe"]["summary_lag"] == "90s"  # the effective config prints it back as written
    for wrong in ("soon", "0s"):  # no lag at all would call a lagging summary's missing event lost
        raw = {**MINIMAL, "stripe": {"api_key": "k", "summary_lag": wrong}}
        assert any(p.startswith("stripe.summary_lag:") for p in problems_of(raw)), problems_of(raw)


def test_meter_events_go_through_v1_unless_the_v2_stream_is_chosen_with_its_own_host():
    """`stripe.meter_events`: `v1` by default, or `v2_stream` (https://docs.stripe.com/api/v2/billing/meter-event-stream/create),
    whose host is Stripe's meter events host unless `stripe.meter_events_base` names another (validated like
    `stripe.api_base`: a trailing slash is dropped)."""
    default = parse_config(MINIMAL).stripe
    assert default.meter_events == "v1" and default.meter_events_base == "https://meter-events.stripe.com"
    chosen = parse_config(
        {**MINIMAL, "stripe": {"api_key": "k", "meter_events": "v2_stream", "meter_events_base": "http://127.0.0.1:9/"}}
    ).stripe
    assert chosen.meter_events == "v2_stream" and chosen.meter_events_base == "http://127.0.0.1:9"
    assert parse_config(MINIMAL).masked()["stripe"]["meter_events"] == "v1"  # check-config shows it
    raw = {**MINIMAL, "stripe": {"api_key": "k", "meter_events": "v2"}}
    assert any(p.startswith("stripe.meter_events:") and "v2_stream" in p for p in problems_of(raw)), problems_of(raw)
    raw = {**MINIMAL, "stripe": {"api_key": "k", "max_meter_event_stream_requests_per_second": 0}}
    assert any(p.startswith("stripe.max_meter_event_stream_requests_per_second:") for p in problems_of(raw))


def test_secrets_are_masked_in_the_effective_config():
    config = parse_config(MINIMAL)
    dumped = yaml.safe_dump(config.masked())
    assert "sk_test_abc" not in dumped and "om_token" not in dumped
    assert "**********" in dumped
    assert "sk_test_abc" not in repr(config)


def test_grace_period_not_shorter_than_invoice_grace_is_warned_about():
    ok = parse_config(MINIMAL)
    risky = parse_config({**MINIMAL, "usage": {"grace_period": "2h"}})
    assert ok.warnings() == []
    assert "usage.grace_period" in risky.warnings()[0]


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stripe: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_path_falls_back_to_the_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "usage": {"window_size": "DAY"}}))
    monkeypatch.setenv("RECONCILER_CONFIG", str(path))
    assert load_config(None).usage.window_size == "DAY"


def test_a_database_url_that_is_not_one_is_named_and_its_password_is_a_secret():
    problems = problems_of({**MINIMAL, "database": {"url": "not a url"}})
    assert any(p.startswith("database.url: ") and "not a database URL" in p for p in problems), problems
    config = parse_config({**MINIMAL, "database": {"url": "postgresql+psycopg://app:pw_s3cret@db/reconciler"}})
    assert "pw_s3cret" in config.secret_values()
    assert "pw_s3cret" not in str(config.masked())


def test_a_top_up_filter_that_matches_every_payment_intent_is_warned_about():
    moesif = {"url": "http://127.0.0.1:9", "management_token": "t"}
    every = parse_config({**MINIMAL, "moesif": moesif, "balances": {"enabled": True}})
    named = parse_config(
        {
            **MINIMAL,
            "moesif": moesif,
            "balances": {"enabled": True, "topups": {"payment_intent_metadata": {"type": "credit_topup"}}},
        }
    )
    assert [w.split(" is empty")[0] for w in every.warnings()] == ["balances.topups.payment_intent_metadata"]
    assert named.warnings() == []


def test_the_webhook_body_limit_must_be_positive():
    assert parse_config(MINIMAL).server.max_body_bytes == 1024 * 1024
    for value in (0, -1):
        assert problems_of({**MINIMAL, "server": {"max_body_bytes": value}}) == [
            "server.max_body_bytes: Input should be greater than 0"
        ]


def test_the_operations_listener_is_loopback_unless_the_image_says_otherwise(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_sample")
    monkeypatch.setenv("OPENMETER_API_TOKEN", "om_sample")
    monkeypatch.setenv("MOESIF_MANAGEMENT_TOKEN", "moesif_sample")
    monkeypatch.delenv("RECONCILER_SERVER_OPS_HOST", raising=False)
    assert parse_config(MINIMAL).server.ops_host == "127.0.0.1"
    assert load_config(REPO_ROOT / "config.yaml").server.ops_host == "127.0.0.1"
    monkeypatch.setenv("RECONCILER_SERVER_OPS_HOST", "0.0.0.0")  # what the container image sets
    assert load_config(REPO_ROOT / "config.yaml").server.ops_host == "0.0.0.0"
    same = {"port": 8080, "ops_port": 8080}
    assert problems_of({**MINIMAL, "server": same}) == [
        "server.ops_port: must differ from server.port (the webhook listener) on the same host"
    ]


@pytest.mark.parametrize(
    ("stripe", "expected"),
    [
        # Live: meter events have 800/s of their own (80% of 1,000); at 50 ms each, 40 in flight fill it.
        pytest.param({"api_key": "sk_live_abc"}, 40, id="live key"),
        # A sandbox's meter events share the global 20/s: one in flight would do, but reads want a few more.
        pytest.param({"api_key": "sk_test_abc"}, 8, id="sandbox key"),
        pytest.param({"api_key": "sk_live_abc", "max_meter_events_per_second": 5000}, 64, id="capped"),
        pytest.param({"api_key": "sk_live_abc", "max_concurrency": 3}, 3, id="set"),
    ],
)
def test_requests_in_flight_are_sized_to_the_write_budget_times_latency(stripe, expected):
    config = parse_config({**MINIMAL, "stripe": stripe})
    assert config.stripe.concurrency() == expected


def test_the_database_pool_has_a_connection_for_every_thread_that_may_use_one(tmp_path):
    raw = {
        "stripe": {"api_key": "sk_live_abc"},
        "openmeter": {"token": "om_token", "max_concurrency": 6},
        "moesif": {"management_token": "m", "max_concurrency": 5},
        "database": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
    }
    config = parse_config(raw)
    assert config.connections_needed() == 40 + 6 + 5 + 4
    upgrade(make_engine(config.database.url))
    engine = open_database(config)  # the engine every command and the daemon use
    try:
        assert engine.pool.size() == config.connections_needed()  # type: ignore[attr-defined]
    finally:
        engine.dispose()
