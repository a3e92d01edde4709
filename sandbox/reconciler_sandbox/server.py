"""Both fakes on loopback, seeded, with a config that points the product at them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.errors import SetupError
from reconciler_sandbox.app_fake import SYNC_PATH, FakeApp
from reconciler_sandbox.httpserver import LoopbackServer
from reconciler_sandbox.moesif_fake import FakeMoesif
from reconciler_sandbox.openmeter_fake import FakeOpenMeter
from reconciler_sandbox.seed import DEMO_METERS, DEMO_PLANS
from reconciler_sandbox.stripe_fake import FakeStripe

# The sandbox's own credentials: they open nothing but the fakes on loopback.
SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_OPENMETER_TOKEN = "om_sandbox_token"  # nosec B105
SANDBOX_MOESIF_TOKEN = "moesif_sandbox_token"  # nosec B105
SANDBOX_APP_KEY = "app_sandbox_key"


@dataclass
class Sandbox:
    stripe: FakeStripe
    openmeter: FakeOpenMeter
    moesif: FakeMoesif
    app: FakeApp
    stripe_server: LoopbackServer
    openmeter_server: LoopbackServer
    moesif_server: LoopbackServer
    app_server: LoopbackServer
    meter_events_server: LoopbackServer  # the Stripe fake's v2 meter event stream host

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        stripe_port: int = 0,
        openmeter_port: int = 0,
        moesif_port: int = 0,
        app_port: int = 0,
    ) -> Sandbox:
        """Every fake served; a port in use is a SetupError naming it (and the servers already started stop)."""
        stripe = FakeStripe(api_key=SANDBOX_STRIPE_KEY)
        openmeter = FakeOpenMeter(token=SANDBOX_OPENMETER_TOKEN)
        moesif = FakeMoesif(token=SANDBOX_MOESIF_TOKEN)
        app = FakeApp(api_key=SANDBOX_APP_KEY)
        servers: list[LoopbackServer] = []
        for name, fake, port in (
            ("Stripe", stripe, stripe_port),
            ("OpenMeter", openmeter, openmeter_port),
            ("Moesif", moesif, moesif_port),
            ("app", app, app_port),
        ):
            try:
                servers.append(LoopbackServer(fake, host=host, port=port).start())
            except OSError as exc:
                for server in servers:
                    server.stop()
                raise SetupError(f"the fake {name} API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        # Stripe serves the v2 meter event stream from a host of its own: here, any free port.
        meter_events = LoopbackServer(stripe.meter_events_host(), host=host).start()
        return cls(stripe, openmeter, moesif, app, *servers, meter_events_server=meter_events)

    def stop(self) -> None:
        for server in (self.stripe_server, self.openmeter_server, self.moesif_server, self.app_server):
            server.stop()
        self.meter_events_server.stop()

    def config_dict(
        self, database_url: str, meters: list[dict[str, str]] = DEMO_METERS, *, plans: bool = False
    ) -> dict[str, Any]:
        """A raw config (as config.yaml would hold it) pointing at this sandbox; `plans` turns the plan sync on
        with the sandbox's plan prices."""
        raw: dict[str, Any] = {
            "database": {"url": database_url},
            "stripe": {
                "api_key": SANDBOX_STRIPE_KEY,
                "api_base": self.stripe_server.url,
                "meter_events_base": self.meter_events_server.url,
            },
            "openmeter": {"url": self.openmeter_server.url, "token": SANDBOX_OPENMETER_TOKEN},
            "usage": {"meters": meters},
            "moesif": {"url": self.moesif_server.url, "management_token": SANDBOX_MOESIF_TOKEN},
            "balances": {
                "enabled": True,
                "stripe_source": "credit_grants",
                "auto_correct": True,
                "max_auto_correction": {"usd": 100},
            },
        }
        if plans:
            raw["plans"] = {
                "enabled": True,
                "sync_url": f"{self.app_server.url}{SYNC_PATH}",
                "api_key": SANDBOX_APP_KEY,
                "price_to_plan": DEMO_PLANS,
                "rank": ["starter", "pro"],
                "default_plan": "free",
            }
        return raw
